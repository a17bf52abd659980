"""Trade-off figures: one point per run (hazard against general accuracy, say), the Pareto front
marked, reference points (the base model, the filtered twin) and chance drawn.

The caller decides what is on the front (an Optuna study's ``best_trials``, a sweep's
non-dominated rows); this module only draws. Matplotlib's Agg backend through the object-oriented
API, as :mod:`unlearning.reporting.plots` does.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from unlearning.core.io import atomic_write_bytes


@dataclass
class Point:
    x: float
    y: float
    label: str
    front: bool = False
    highlight: str | None = None  # a named point (e.g. "base config"): drawn as a star, in the legend


def tradeoff_plot(points: list[Point], path: str | Path, *, xlabel: str, ylabel: str, title: str,
                  references: dict[str, tuple[float, float]] | None = None,
                  chance: float | None = None, connect_front: bool = True) -> Path:
    """Write the figure as a PNG at ``path`` (atomically). ``references``: name -> (x, y)."""
    import matplotlib  # optional (the report extra), and seconds to import: only figures need it
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    if not points:
        raise ValueError("tradeoff_plot: no points to draw")
    fig = Figure(figsize=(7.0, 5.6), layout="constrained")
    ax = fig.subplots()
    rest = [p for p in points if not p.front]
    front = sorted((p for p in points if p.front), key=lambda p: p.x)
    ax.scatter([p.x for p in rest], [p.y for p in rest], s=28, color="0.6", label="trial", zorder=2)
    ax.scatter([p.x for p in front], [p.y for p in front], s=48, color="tab:red", label="Pareto front", zorder=3)
    if connect_front and len(front) > 1:
        ax.plot([p.x for p in front], [p.y for p in front], color="tab:red", linewidth=1, alpha=0.6, zorder=2)
    for p in front:
        ax.annotate(p.label, (p.x, p.y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for p in points:
        if p.highlight:
            ax.scatter([p.x], [p.y], marker="*", s=220, facecolor="none", edgecolor="black", linewidth=1.2,
                       label=f"{p.highlight} ({p.label})", zorder=4)
    markers = iter(["s", "D", "^", "v", "P"])
    for name, (x, y) in (references or {}).items():
        ax.scatter([x], [y], marker=next(markers, "o"), s=70, color="tab:blue", edgecolor="black",
                   label=f"{name}: ({x:.3f}, {y:.3f})", zorder=4)
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle="-.", linewidth=1, label=f"chance ({chance:g})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return atomic_write_bytes(path, buf.getvalue())
