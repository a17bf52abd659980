"""Logging set-up and the per-step metrics logger (JSON lines, optional W&B / TensorBoard)."""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from unlearning.core.io import append_jsonl, atomic_write_text, dumps_json, read_jsonl

log = logging.getLogger("unlearning")


FILE_ONLY = "file_only"  # ``log.error(..., extra={FILE_ONLY: True})``: for log.txt, not the console


def _not_file_only(record: logging.LogRecord) -> bool:
    return not getattr(record, FILE_ONLY, False)


class ConsoleHandler(logging.StreamHandler):
    """Log lines to the current ``sys.stderr`` through ``tqdm.write``: a line printed while a progress
    bar runs goes above the bar instead of onto it, and a stderr replaced since the handler was made
    (a test's capture, a notebook) is the one written to, never a closed one."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # logging.StreamHandler.__init__ assigns it
        pass

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging's own policy: a failing handler reports, never raises
            self.handleError(record)


def setup_logging(level: str | int = "INFO", logfile: str | Path | None = None) -> logging.Handler | None:
    """Log to stderr (and to ``logfile`` when given) with one consistent format.

    Returns the file handler this call attached (None when there is no logfile or one is already
    attached for it), so a caller that runs several jobs in one process (a sweep) can
    :func:`detach` it when its job ends: otherwise the first job's log.txt collects every later
    job's lines too.
    """
    root = logging.getLogger("unlearning")
    root.setLevel(level if isinstance(level, int) else level.upper())
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    if not any(getattr(h, "_unlearning", False) for h in root.handlers):
        h = ConsoleHandler()
        h.setFormatter(fmt)
        h.addFilter(_not_file_only)  # tracebacks meant for log.txt; the CLI prints one line
        h._unlearning = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.propagate = False
    if logfile is None:
        return None
    path = str(Path(logfile).resolve())
    if any(getattr(h, "baseFilename", None) == path for h in root.handlers):
        return None
    fh = logging.FileHandler(path)
    fh.setFormatter(fmt)
    root.addHandler(fh)
    return fh


def detach(handler: logging.Handler | None) -> None:
    """Remove a handler :func:`setup_logging` attached, and close its file."""
    if handler is None:
        return
    logging.getLogger("unlearning").removeHandler(handler)
    handler.close()


class MetricsLogger:
    """Writes one JSON record per call to ``metrics.jsonl``; mirrors to W&B / TensorBoard if asked.

    Only the main process (rank 0) writes, so the same code runs under torchrun.
    """

    def __init__(self, path: str | Path, *, wandb_project: str | None = None,
                 tensorboard_dir: str | Path | None = None, run_name: str | None = None,
                 config: dict[str, Any] | None = None, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._wandb = None
        self._tb = None
        self._t0 = time.time()
        if not enabled:
            return
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError("logging.wandb_project is set but wandb is not installed: pip install wandb") from e
            self._wandb = wandb.init(project=wandb_project, name=run_name, config=config)
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError("logging.tensorboard is set but tensorboard is not installed: "
                                   "pip install tensorboard") from e
            self._tb = SummaryWriter(str(tensorboard_dir))

    def log(self, record: dict[str, Any], step: int | None = None) -> None:
        if not self.enabled:
            return
        rec = dict(record)
        if step is not None:
            rec.setdefault("step", step)
        rec.setdefault("time", round(time.time() - self._t0, 3))
        append_jsonl(self.path, rec)
        numeric = {k: v for k, v in rec.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if self._wandb is not None:
            self._wandb.log(numeric, step=rec.get("step"))
        if self._tb is not None:
            for k, v in numeric.items():
                if k != "step":
                    self._tb.add_scalar(k, v, rec.get("step", 0))

    def truncate_after(self, step: int) -> None:
        """Drop the records of steps after ``step``, atomically: a resumed run logs them again, so
        each step appears once."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(dumps_json(r, indent=None) + "\n" for r in kept))

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()
