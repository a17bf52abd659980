"""Where the project keeps its caches."""

from __future__ import annotations

import os
from pathlib import Path


def unlearning_home() -> Path:
    """``$UNLEARNING_HOME``, default ``~/.cache/unlearning``: organisms, masks, converted models."""
    return Path(os.environ.get("UNLEARNING_HOME", Path.home() / ".cache" / "unlearning")).expanduser()
