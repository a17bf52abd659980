"""A results-store record read from one run directory's files alone (so the store can always be
rebuilt from them): what kind of folder it is, its config, status, timestamps, git commit, varied
keys, every evaluation number, its final loss terms and its tamper attacks (every cell of the grid). The columns are
described in :mod:`unlearning.core.store`."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from unlearning.core.config import flatten
from unlearning.core.errors import UserError
from unlearning.core.io import read_json, read_jsonl
from unlearning.core.provenance import PROVENANCE_FILE

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
TRIAL_FILE = "trial.json"
# metrics.jsonl bookkeeping, not loss terms
NOT_TERMS = {"step", "phase", "layer", "phase_step", "time"}
ATTACK_NUMBERS = ("base_acc", "step0_acc", "final_acc", "max_acc", "max_acc_step", "gap", "half_gap_step",
                  "recovery_auc", "mean_acc")
RUN_COLUMNS = ("run_dir", "kind", "status", "error", "method", "model", "reference_model", "sweep", "study",
               "trial", "trial_state", "started_at", "resumed_at", "finished_at", "failed_at", "git_commit",
               "git_dirty", "config", "varied", "mean_erank", "mean_srank", "signature")
# kind, role, metric and value (the cell's attack.json headline) came with schema 2: before it only
# fine-tuning summaries were recorded
ATTACK_COLUMNS = ("run_dir", "attack", "kind", "label", "model", "role", "target", "data", "status", "error", "task",
                  "metric", "value", *ATTACK_NUMBERS)


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return v


def _numbers(d: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """Every finite number in a nested mapping, as (dotted key, value)."""
    for k, v in d.items():
        if isinstance(v, Mapping):
            yield from _numbers(v, f"{prefix}{k}.")
        elif _number(v) is not None:
            yield f"{prefix}{k}", v


def run_kind(config: Mapping[str, Any], results: Mapping[str, Any]) -> str | None:
    """What wrote a folder, from its files: a tamper command (an ``attack`` recipe), a run (a
    ``method``), an evaluation (``model`` and ``tasks``), a rank report (``ranks`` only)."""
    if "attack" in config or "attacks" in results:
        return "tamper"
    if "method" in config:
        return "run"
    if "model" in config and "tasks" in config:
        return "eval"
    if "ranks" in results:
        return "ranks"
    return None


def _signature(files: Iterable[Path]) -> str:
    stats = {}
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        stats[f.name if f.parent.name else str(f)] = [st.st_size, st.st_mtime_ns]
    return json.dumps(stats, sort_keys=True)


def store_name(run_dir: Path, root: Path) -> str:
    try:
        return run_dir.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(run_dir.resolve())


def _mtime_iso(path: Path) -> str:
    stamp = _dt.datetime.fromtimestamp(path.stat().st_mtime, _dt.timezone.utc)
    return stamp.isoformat(timespec="seconds")


def _read_optional(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        log.warning("results store: %s is unreadable; recorded without it", path)
        return None


def _attack_target(model: str, root: Path) -> str | None:
    """The run directory (as a store name) an attack fine-tuned, when it is under ``root``: a model
    path is tried as written from the runs root's parent (``runs/x`` typed in the project folder),
    from the root, and as an absolute path."""
    path = Path(model).expanduser()
    for candidate in ([path] if path.is_absolute() else [root.parent / path, root / path]):
        if (candidate / "results.json").is_file():
            name = store_name(candidate, root)
            return None if Path(name).is_absolute() else name
    return None


def _tamper_attacks(results: Mapping[str, Any], run_dir: str, root: Path) -> list[dict[str, Any]]:
    """One attack row per cell of a tamper folder: ``results.json["attacks"]`` holds the fine-tuning
    curves' summaries, ``["records"]`` every cell's attack.json headline, those of the latent probe
    and in-context cells too (which have no curve). A folder from before the grid has no records:
    its attacks were all fine-tuning."""
    summaries, records = results.get("attacks") or {}, results.get("records") or {}
    grid_task = (results.get("grid") or {}).get("task")
    out = []
    for name in dict.fromkeys([*summaries, *records]):
        s, r = summaries.get(name) or {}, records.get(name) or {}
        headline = r.get("headline") or {}
        attack = dict.fromkeys(ATTACK_COLUMNS)
        attack.update({k: s.get(k) for k in ATTACK_COLUMNS if k in s})
        attack.update(run_dir=run_dir, attack=name, kind=r.get("kind", "finetune"), role=r.get("role"),
                      model=s.get("model", r.get("model")), status=s.get("status", r.get("status")),
                      error=s.get("error", r.get("error")), task=s.get("task", r.get("task", grid_task)),
                      metric=headline.get("metric"), value=_number(headline.get("value")))
        attack["target"] = _attack_target(str(attack["model"] or ""), root)
        out.append(attack)
    return out


def describe_run_dir(run_dir: str | Path, root: str | Path) -> dict[str, Any] | None:
    """The store's record of one folder, read from its files: ``{"run": {column: value},
    "metrics": [(section, task, metric, value)], "terms": [(at, key, value)], "attacks": [{...}]}``;
    None when the folder holds no results.json (a killed eval) or is no known kind."""
    run_dir, root = Path(run_dir), Path(root)
    results_path, config_path = run_dir / "results.json", run_dir / "config.yaml"
    if not results_path.is_file():
        return None
    results = read_json(results_path)
    config = (yaml.safe_load(config_path.read_text()) or {}) if config_path.is_file() else {}
    if not isinstance(results, dict) or not isinstance(config, dict):
        raise UserError(f"{run_dir}: results.json or config.yaml is not a mapping")
    kind = run_kind(config, results)
    if kind is None:
        return None
    read = [results_path, config_path, run_dir / PROVENANCE_FILE, run_dir / TRIAL_FILE,
            run_dir.parent / SWEEP_FILE]
    provenance = _read_optional(run_dir / PROVENANCE_FILE) or {}
    trial = _read_optional(run_dir / TRIAL_FILE) or {}
    sweep = _read_optional(run_dir.parent / SWEEP_FILE) or {}
    flat = flatten(config)
    varied = {k: flat.get(k) for k in sweep.get("keys", [])}
    varied.update(trial.get("params") or {})

    row: dict[str, Any] = dict.fromkeys(RUN_COLUMNS)
    row.update(run_dir=store_name(run_dir, root), kind=kind, config=json.dumps(config, sort_keys=True, default=str),
               varied=json.dumps(varied, sort_keys=True, default=str), sweep=sweep.get("name"),
               study=trial.get("study"), trial=trial.get("trial"), trial_state=trial.get("state"),
               git_commit=provenance.get("git_commit"), git_dirty=provenance.get("git_dirty"),
               mean_erank=_number(results.get("mean_erank")), mean_srank=_number(results.get("mean_srank")))
    for stamp in ("started_at", "resumed_at", "finished_at", "failed_at"):
        row[stamp] = results.get(stamp)
    row["started_at"] = row["started_at"] or provenance.get("created_at")
    metrics: list[tuple[str, str, str, float]] = []
    terms: list[tuple[str, str, float]] = []
    attacks: list[dict[str, Any]] = []

    def add_tasks(section: str, tasks: Any) -> None:
        for task, r in (tasks or {}).items():
            if isinstance(r, Mapping):
                metrics.extend((section, task, m, v) for m, v in _numbers(r))

    if kind == "run":
        row.update(status=results.get("status") or ("complete" if "after" in results else "running"),
                   error=results.get("error"), method=config.get("method"),
                   model=results.get("model") or config.get("model"), reference_model=results.get("reference_model"))
        for section in ("before", "after", "reference"):
            add_tasks(section, results.get(section))
        read.append(run_dir / "metrics.jsonl")
        steps = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "step" in r]
        if steps:
            terms += [("final", k, v) for k, v in steps[-1].items() if k not in NOT_TERMS and _number(v) is not None]
        terms += [("summary", k, v) for k, v in (results.get("train_summary") or {}).items()
                  if k not in NOT_TERMS and _number(v) is not None]
    elif kind == "eval":
        failed = results.get("status") == "failed"
        row.update(status="failed" if failed else "complete", error=results.get("error"), model=config.get("model"),
                   finished_at=None if failed else _mtime_iso(results_path))
        if not failed:
            add_tasks("eval", results)
    elif kind == "tamper":
        models = config.get("model") or []
        row["model"] = ",".join(models) if isinstance(models, list) else str(models)
        attacks += _tamper_attacks(results, row["run_dir"], root)
        statuses = {a["status"] for a in attacks}
        row.update(status="complete" if statuses == {"complete"} else ("failed" if "failed" in statuses else "running"),
                   error=next((a["error"] for a in attacks if a["error"]), None), finished_at=_mtime_iso(results_path))
    else:  # ranks of a model outside any run directory
        row.update(status="complete", model=(results.get("ranks") or {}).get("model"),
                   finished_at=_mtime_iso(results_path))
    row["signature"] = _signature(read)
    return {"run": row, "metrics": metrics, "terms": terms, "attacks": attacks}


def find_run_dirs(root: str | Path) -> list[Path]:
    """Every folder under ``root`` with a results.json, not descending into one (its model,
    checkpoint and attack folders are its own)."""
    found = []
    for here, dirs, files in os.walk(root):
        if "results.json" in files:
            found.append(Path(here))
            dirs[:] = []
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(found)
