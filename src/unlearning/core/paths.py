"""Where the project keeps its caches and its runs."""

from __future__ import annotations

import os
from pathlib import Path


def unlearning_home() -> Path:
    """``$UNLEARNING_HOME``, default ``~/.cache/unlearning``: organisms, masks, converted models."""
    return Path(os.environ.get("UNLEARNING_HOME", Path.home() / ".cache" / "unlearning")).expanduser()


def runs_root() -> Path:
    """``$UNLEARNING_RUNS``, default ``runs`` (relative to the working directory): where run
    directories go when a command is given no output folder, and where the results store lives."""
    return Path(os.environ.get("UNLEARNING_RUNS", "runs")).expanduser()
