"""Where the project keeps its caches and its runs."""

from __future__ import annotations

import os
from pathlib import Path


def unlearning_home() -> Path:
    """``$UNLEARNING_HOME``, default ``~/.cache/unlearning``: organisms, masks, converted models."""
    return Path(os.environ.get("UNLEARNING_HOME", Path.home() / ".cache" / "unlearning")).expanduser()


# Optuna's own storage for `unlearn tune` (one SQLite file for every study under a runs root); the
# results store (results.db) sits beside it in the same folder.
OPTUNA_DB = "optuna.db"


def runs_root(output_dir: str | Path | None = None) -> Path:
    """The folder run directories go under, and where the results store and Optuna's storage live:
    ``output_dir``, else ``$UNLEARNING_RUNS``, else ``./runs`` (relative to the working directory)."""
    return Path(output_dir or os.environ.get("UNLEARNING_RUNS") or "runs").expanduser()
