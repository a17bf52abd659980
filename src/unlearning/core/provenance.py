"""Which code made a run: the git commit of the package's checkout (and whether it had local
changes), the package version, the start time. Written once per run directory as
``provenance.json`` so the results store can be rebuilt from run directories alone."""

from __future__ import annotations

import datetime as _dt
import functools
import importlib.metadata
import subprocess
from pathlib import Path
from typing import Any

PROVENANCE_FILE = "provenance.json"


@functools.lru_cache(maxsize=1)  # one look-up per process: a sweep's rows share it
def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout holding this package; (None, None) outside a git checkout
    (an installed wheel) or without git."""
    here = Path(__file__).resolve().parent
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None
    commit = git("rev-parse", "HEAD")
    if not commit:
        return None, None
    status = git("status", "--porcelain", "--untracked-files=no")  # tracked files only: fast, and runs/ is ignored
    return commit.strip(), (bool(status.strip()) if status is not None else None)


def _version() -> str | None:
    try:  # the installed distribution's metadata: core may not import the package's top level
        return importlib.metadata.version("unlearning")
    except importlib.metadata.PackageNotFoundError:
        return None


def provenance() -> dict[str, Any]:
    commit, dirty = git_state()
    return {"git_commit": commit, "git_dirty": dirty, "version": _version(),
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
