"""``attack.json``: one file per attack cell, the same shape for every kind of attack.

Every cell of an ``unlearn tamper`` grid (a fine-tuning run, a latent probe, an in-context
evaluation) writes ``<run>/attacks/<cell>/attack.json`` atomically; a results store reads these
files, so their shape is fixed here::

    {"format": "unlearning.attack/1", "kind": "finetune" | "probe" | "in_context",
     "name": cell folder name, "model": attacked model, "role": "model" | "filtered" | "base",
     "status": "running" | "complete" | "failed", "error": str | null, "seed": int,
     "task": evaluated task, "config": {settings that decide the numbers},
     "headline": {"metric": what the number is, "value": float | null},
     "result": {kind-specific numbers (see each attack's module)}}

``headline`` is the one number the methods x attacks table shows: a fine-tuning attack's highest
accuracy after step 0 (``max_acc``), a probe's best-layer held-out accuracy, an in-context attack's
accuracy at its largest k. ``role`` says why the model is in the grid: the model under test, the
filtered twin attacked the same way (the floor), or the base model (the ceiling).

A cell whose file says ``complete`` with the same ``config`` is not redone on ``--resume``; a
different ``config`` is a one-line error (as for a fine-tuning curve).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from unlearning.core.errors import ConfigError, DataError, UserError
from unlearning.core.io import atomic_write_json, read_json

log = logging.getLogger(__name__)

ATTACK_FORMAT = "unlearning.attack/1"
KINDS = ("finetune", "probe", "in_context")
ROLES = ("model", "filtered", "base")
RECORD_NAME = "attack.json"


def new_record(kind: str, name: str, model: str, role: str, *, seed: int, task: str,
               config: dict[str, Any], headline_metric: str) -> dict[str, Any]:
    if kind not in KINDS or role not in ROLES:
        raise ValueError(f"attack record: kind {kind!r} / role {role!r} not in {KINDS} / {ROLES}")
    return {"format": ATTACK_FORMAT, "kind": kind, "name": name, "model": model, "role": role,
            "status": "running", "error": None, "seed": seed, "task": task, "config": config,
            "headline": {"metric": headline_metric, "value": None}, "result": {}}


def write_record(folder: str | Path, record: dict[str, Any]) -> Path:
    return atomic_write_json(Path(folder) / RECORD_NAME, record)


def read_record(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / RECORD_NAME
    record = read_json(path)
    missing = [k for k in ("format", "kind", "model", "status", "config", "headline", "result") if k not in record]
    if missing or record.get("format") != ATTACK_FORMAT:
        raise DataError(f"{path}: not an attack record (format {record.get('format')!r}, missing {missing}); "
                        f"delete the attack's folder to redo it")
    return record


def resumable_record(folder: Path, config: dict[str, Any], resume: bool) -> dict[str, Any] | None:
    """The cell's earlier record when resuming it with the same settings; None when starting fresh.

    Not resuming over an existing record, or resuming with other settings, is a one-line error."""
    path = folder / RECORD_NAME
    if not path.exists():
        return None
    if not resume:
        raise ConfigError(f"{path}: an attack is already recorded here; pass --resume or choose another --name")
    record = read_record(path)
    changed = sorted(k for k in set(config) | set(record["config"]) if config.get(k) != record["config"].get(k))
    if changed:
        raise ConfigError(f"{path}: --resume with different settings ({', '.join(changed)} changed); "
                          f"resume with the same options or start under another --name")
    return record


def is_complete(record: dict[str, Any] | None, name: str) -> bool:
    """Whether a resumed cell has nothing left to do (it says so in the log)."""
    if record is not None and record["status"] == "complete":
        log.info("%s: already complete", name)
        return True
    return False


def record_failure(folder: Path, record: dict[str, Any], error: Exception, name: str, where: str = "") -> dict[str, Any]:
    """Call from an ``except`` block: the cell is written as failed with ``error`` (never as a number) and
    returned; a user error (bad input) still stops the command, so it is raised again."""
    record.update(status="failed", error=f"{where}{type(error).__name__}: {error}")
    write_record(folder, record)
    log.error("%s: failed: %s", name, record["error"])
    if isinstance(error, UserError):
        raise error
    return record
