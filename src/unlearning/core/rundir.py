"""Run directories: ``runs/<name>/`` with config.yaml, metrics.jsonl and results.json.

Every file that holds a final result is written atomically (temp file, then rename), so a
killed run leaves either the previous complete file or none, never half of one.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from pathlib import Path
from typing import Any

from unlearning.core.config import to_dict
from unlearning.core.io import atomic_write_json, atomic_write_yaml, read_json
from unlearning.core.logs import MetricsLogger, setup_logging
from unlearning.core.runtime import is_main_process


def default_run_name(prefix: str) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{prefix}-{stamp}"


def safe_name(name: str) -> str:
    """A name usable as one folder: ``EleutherAI/x`` -> ``EleutherAI_x``."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("_") or "run"


class RunDir:
    """One command's output folder."""

    def __init__(self, path: str | Path, *, create: bool = True):
        self.path = Path(path)
        if create and is_main_process():
            self.path.mkdir(parents=True, exist_ok=True)

    @classmethod
    def for_command(cls, root: str | Path | None, name: str | None, prefix: str) -> "RunDir":
        root = Path(root or os.environ.get("UNLEARNING_RUNS", "runs"))
        return cls(root / (name or default_run_name(prefix)))

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
        if is_main_process():
            data = cfg if isinstance(cfg, dict) else to_dict(cfg)
            atomic_write_yaml(self.config_path, data)

    def write_results(self, results: dict[str, Any]) -> None:
        if is_main_process():
            atomic_write_json(self.results_path, results)

    def write_json(self, name: str, obj: Any) -> None:
        if is_main_process():
            atomic_write_json(self.file(name), obj)

    def read_results(self) -> dict[str, Any] | None:
        return read_json(self.results_path) if self.results_path.exists() else None

    def metrics_logger(self, **kwargs: Any) -> MetricsLogger:
        return MetricsLogger(self.metrics_path, enabled=is_main_process(), **kwargs)

    def start_logging(self, level: str = "INFO") -> None:
        setup_logging(level, self.file("log.txt") if is_main_process() else None)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"
