"""Run directories: ``runs/<name>/`` with config.yaml, metrics.jsonl, log.txt and results.json.

Every file that holds a final result is written atomically (temp file, then rename), so a
killed run leaves either the previous complete file or none, never half of one.

The life cycle of a run lives in results.json's ``status``:

- ``running``: written when the run starts (with ``started_at``); a run that was killed, or is
  still going in another process, stays ``running``;
- ``failed``: an exception ended it; ``error`` holds its one-line message (log.txt the traceback);
- ``complete``: everything was written (``finished_at``).

:func:`start_mode` decides, without writing anything, what a new run of the same name does with
the folder it finds there (see its docstring); the runner calls it before any work starts.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Literal

from unlearning.core.config import ConfigError, flatten, read_yaml, to_dict
from unlearning.core.errors import UserError
from unlearning.core.io import atomic_write_json, atomic_write_yaml, read_json
from unlearning.core.logs import MetricsLogger, detach, setup_logging
from unlearning.core.paths import runs_root
from unlearning.core.provenance import PROVENANCE_FILE, provenance
from unlearning.core.runtime import is_main_process
from unlearning.core.store import STORE_FILE, record_quietly

RUNNING, FAILED, COMPLETE = "running", "failed", "complete"
StartMode = Literal["fresh", "replace", "resume", "complete"]


def default_run_name(prefix: str) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{prefix}-{stamp}"


def safe_name(name: str) -> str:
    """A name usable as one folder: ``EleutherAI/x`` -> ``EleutherAI_x``."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("_") or "run"


class RunDir:
    """One command's output folder."""

    def __init__(self, path: str | Path, *, create: bool = True, root: str | Path | None = None):
        """``root``: the runs root whose results store records this folder (a run's output_dir;
        default: the nearest ancestor holding a store, else the parent folder)."""
        self.path = Path(path)
        self.root = Path(root) if root is not None else _store_root(self.path)
        if create and is_main_process():
            self.path.mkdir(parents=True, exist_ok=True)

    @classmethod
    def for_command(cls, root: str | Path | None, name: str | None, prefix: str, *,
                    create: bool = True) -> "RunDir":
        root = Path(root) if root else runs_root()
        return cls(root / (name or default_run_name(prefix)), create=create, root=root)

    # paths
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def results_path(self) -> Path:
        return self.path / "results.json"

    def file(self, name: str) -> Path:
        return self.path / name

    # writers (main process only, so the same code runs under torchrun)
    def write_config(self, cfg: Any) -> None:
        """config.yaml, and provenance.json (the code's git commit) the first time: the config and
        the code that ran it are written together; a resumed run keeps its first provenance."""
        if is_main_process():
            data = cfg if isinstance(cfg, dict) else to_dict(cfg)
            atomic_write_yaml(self.config_path, data)
            if not self.file(PROVENANCE_FILE).exists():
                atomic_write_json(self.file(PROVENANCE_FILE), provenance())

    def write_results(self, results: dict[str, Any]) -> None:
        """results.json, then the folder's record in the results store (every status change of
        every kind of run passes here; a store failure is logged, the folder is already written)."""
        if is_main_process():
            atomic_write_json(self.results_path, results)
            record_quietly(self.path, self.root)

    def write_json(self, name: str, obj: Any) -> None:
        if is_main_process():
            atomic_write_json(self.file(name), obj)

    def read_results(self) -> dict[str, Any] | None:
        """results.json, or None when there is none; a partial or corrupt file is a one-line error."""
        if not self.results_path.exists():
            return None
        try:
            data = read_json(self.results_path)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            reason = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8 text"
            raise UserError(f"{self.results_path}: not valid JSON ({reason}): the file is partial or corrupt; "
                            f"pass --overwrite to start the run afresh (or delete the folder)") from None
        if not isinstance(data, dict):
            raise UserError(f"{self.results_path}: expected a JSON object, found {type(data).__name__}; "
                            f"pass --overwrite to start the run afresh (or delete the folder)")
        return data

    # life cycle
    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint"

    def is_run_dir(self) -> bool:
        return self.results_path.exists() or self.config_path.exists()

    def status(self) -> str | None:
        """running / failed / complete, or None when no run has started here.

        Results written before ``status`` existed count as complete when they hold ``after``."""
        results = self.read_results()
        if results is None:
            return RUNNING if self.config_path.exists() else None
        return results.get("status") or (COMPLETE if "after" in results else RUNNING)

    def reset(self) -> None:
        """Remove everything in the folder (a failed run, or --overwrite), leaving it empty."""
        if is_main_process():
            shutil.rmtree(self.path, ignore_errors=True)
            self.path.mkdir(parents=True, exist_ok=True)

    def begin(self, results: dict[str, Any]) -> dict[str, Any]:
        """Mark the run ``running`` (a resumed one keeps its ``started_at``) and write results.json."""
        stamp = utc_now()
        if "started_at" in results:
            results["resumed_at"] = stamp
        results.update(status=RUNNING, started_at=results.get("started_at", stamp))
        results.pop("error", None)
        self.write_results(results)
        return results

    def fail(self, results: dict[str, Any], error: str) -> None:
        results.update(status=FAILED, error=error, failed_at=utc_now())
        self.write_results(results)

    def complete(self, results: dict[str, Any]) -> None:
        results.update(status=COMPLETE, finished_at=utc_now())
        self.write_results(results)

    def metrics_logger(self, **kwargs: Any) -> MetricsLogger:
        return MetricsLogger(self.metrics_path, enabled=is_main_process(), **kwargs)

    def start_logging(self, level: str = "INFO") -> Any:
        """Log to stderr and log.txt; returns the file handler (for :func:`unlearning.core.logs.detach`)."""
        return setup_logging(level, self.file("log.txt") if is_main_process() else None)

    @contextlib.contextmanager
    def logging(self, level: str = "INFO") -> Iterator[None]:
        """log.txt receives this run's lines only: the file handler goes when the block ends."""
        handler = self.start_logging(level)
        try:
            yield
        finally:
            detach(handler)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"


def _store_root(path: Path) -> Path:
    """The runs root of a folder given without one (``unlearn ranks`` on a sweep row, ``unlearn eval
    --output-dir``): the nearest of its three ancestors that holds a results store, else its parent."""
    for ancestor in list(path.absolute().parents)[:3]:
        if (ancestor / STORE_FILE).exists():
            return ancestor
    return path.parent


def check_writable(folder: str | Path, key: str) -> None:
    """``folder`` exists as a writable folder or can be made: its nearest existing ancestor is a
    writable folder. Checked before any work, so an output path that cannot be written fails first."""
    folder = Path(folder).expanduser().absolute()
    ancestor = folder
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{key}: {folder} cannot be created: {ancestor} is a file; set {key} to a folder path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {folder} cannot be written: {ancestor} is not writable by this user; "
                          f"set {key} to a writable folder")


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any], free: Sequence[str] = ()) -> list[str]:
    """``key: old -> new`` for each dotted key that differs, except keys matching a ``free`` pattern.

    Keys the old config lacks are not changes: they are settings a newer version of the code added
    (with defaults), and the saved run could not have set them."""
    a, b = flatten(old), flatten(new)
    lines = []
    for key in sorted(a):
        if any(fnmatch(key, pattern) for pattern in free):
            continue
        if key not in b:
            lines.append(f"{key}: {json.dumps(a[key], default=str)} -> (unset)")
        elif a[key] != b[key]:
            lines.append(f"{key}: {json.dumps(a[key], default=str)} -> {json.dumps(b[key], default=str)}")
    return lines


def start_mode(rundir: RunDir, config: Mapping[str, Any], *, resume: bool = False, overwrite: bool = False,
               force: bool = False, free: Sequence[str] = ()) -> tuple[StartMode, list[str]]:
    """What a run named like an existing folder does, and the config changes a forced resume
    accepts; reads only, writes nothing.

    - no folder, or an empty one: ``fresh``;
    - a folder that is not a run directory (no results.json or config.yaml): refused, never deleted;
    - ``overwrite``: ``replace`` (the folder is emptied first);
    - a failed run: ``replace`` (a clean start, no flag needed), or ``resume`` with --resume when it
      left a checkpoint;
    - a complete run: refused, unless --resume (``complete``: nothing to do, its results stand);
    - an unfinished run (killed, or still running elsewhere): refused, unless --resume.

    Resuming with a config that differs from the saved config.yaml (other than keys matching
    ``free``) is refused with the list of changes, unless ``force``.
    """
    where = rundir.path
    if not where.exists() or (where.is_dir() and not any(where.iterdir())):
        return "fresh", []
    if not rundir.is_run_dir():
        raise ConfigError(f"name: {where} exists and is not a run directory (no results.json or config.yaml); "
                          f"choose another name or output_dir")
    if overwrite:
        return "replace", []
    status = rundir.status()
    if status == FAILED and not (resume and rundir.checkpoint_path.exists()):
        return "replace", []
    if not resume:
        if status == COMPLETE:
            raise ConfigError(f"name: {where} holds a complete run; pass --resume to return its results, "
                              f"--overwrite to start it afresh, or choose another name")
        raise ConfigError(f"name: {where} holds an unfinished run (killed, or still running elsewhere); pass "
                          f"--resume to continue it{' from its checkpoint' if rundir.checkpoint_path.exists() else ''}, "
                          f"--overwrite to start it afresh, or choose another name")
    changes = config_changes(read_yaml(rundir.config_path), config, free) if rundir.config_path.exists() else []
    if changes and not force:
        raise ConfigError(f"--resume: the config differs from {rundir.config_path}: {'; '.join(changes)}; "
                          f"pass --force to resume with the new values, or --overwrite to start afresh")
    return ("complete" if status == COMPLETE else "resume"), changes
