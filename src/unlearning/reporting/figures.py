"""The one way a figure is made and written: matplotlib's Agg backend through the object-oriented
API (no pyplot state shared between figures), PNG at 120 dpi, written atomically."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from unlearning.core.io import atomic_write_bytes


def new_figure(width: float, height: float) -> Any:
    """An empty constrained-layout figure of ``width`` x ``height`` inches."""
    import matplotlib  # optional at import time, and seconds to import: a cheap command never waits for it
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), layout="constrained")


def save_png(fig: Any, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return atomic_write_bytes(path, buf.getvalue())
