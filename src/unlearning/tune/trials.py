"""A trial of ``unlearn tune``: its run config, its run (through the runner), its objectives,
``trial.json``, and the bookkeeping of killed and interrupted trials (see :mod:`unlearning.tune.study`).

Everything here runs in whichever process runs the trial (this one, a worker process, a submitit
job): :class:`StudyRef` is all such a process is given.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unlearning.core.config import from_dict, merge, nested
from unlearning.core.errors import ConfigError, one_line
from unlearning.core.io import atomic_write_json
from unlearning.runner import RunConfig, run
from unlearning.tune.space import Objective, SearchParam

log = logging.getLogger(__name__)

TRIAL_FILE = "trial.json"

@dataclass
class StudyRef:
    """Everything a worker process (or submitit job) needs to run trials of the study: picklable."""
    storage_url: str
    study: str
    root: str
    base: dict[str, Any]
    params: list[SearchParam]
    objectives: list[Objective]
    sampler: str = "tpe"
    seed: int = 0
    references: str = "once"
    heartbeat: int = 10
    grace: int = 20
    max_retry: int = 3
    jobs: int = 1

    @property
    def folder(self) -> Path:
        return Path(self.root) / self.study


class TrialFailed(Exception):
    """A trial's run failed; the message is its one line (the traceback is in the run's log.txt)."""

# ------------------------------------------------------------------------------------------ storage

def optuna_module() -> Any:
    try:
        import optuna  # optional (the sweep extra): only `unlearn tune` needs it
    except ImportError as e:
        raise ConfigError("unlearn tune needs optuna (4.9 or later): pip install 'unlearning[sweep]'") from e
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def storage(ref: StudyRef) -> Any:
    optuna = optuna_module()
    return optuna.storages.RDBStorage(
        ref.storage_url, heartbeat_interval=ref.heartbeat, grace_period=ref.grace,
        # SQLite allows one writer at a time: workers wait for the lock rather than fail
        engine_kwargs={"connect_args": {"timeout": 120}},
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=ref.max_retry))


def sampler(ref: StudyRef, offset: int) -> Any:
    """The study's sampler, seeded with ``seed + offset`` (each invocation and worker its own stream)."""
    optuna = optuna_module()
    seed = ref.seed + offset
    if ref.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if ref.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if ref.sampler == "grid":
        return optuna.samplers.GridSampler({p.key: list(p.choices) for p in ref.params}, seed=ref.seed)
    # Optuna's default (TPE, multi-objective too); with trials at once, the constant liar counts the
    # running trials as bad so that workers asking together do not all propose the same point
    return optuna.samplers.TPESampler(seed=seed, constant_liar=ref.jobs > 1)


def open_study(ref: StudyRef, offset: int = 0) -> Any:
    return optuna_module().load_study(study_name=ref.study, storage=storage(ref), sampler=sampler(ref, offset))


# -------------------------------------------------------------------------------------------- trials

def retry_history(trial: Any) -> list[int]:
    """The trials this one retries, first first ([] for a trial of its own). A live ``Trial`` has no
    system attributes in Optuna 5, so they are read from its frozen copy in the study."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    return optuna_module().storages.RetryHeartbeatStaleTrialCallback.retry_history(frozen)


def trial_config(ref: StudyRef, values: dict[str, Any], number: int, references: bool) -> RunConfig:
    data = merge(merge(ref.base, nested(values)), {"name": f"{ref.study}/trial-{number:04d}",
                                                    "output_dir": ref.root})
    if not references:
        data = merge(data, {"eval": {"before": False, "reference": None}})
    cfg = from_dict(RunConfig, data)
    cfg.method_config()
    return cfg


def _measures_references(ref: StudyRef, trial: Any) -> bool:
    """Whether this trial evaluates the base model and the reference: with ``references: once``, only
    while no other trial (finished or under way) does. Kept in the trial, so a retry agrees."""
    if "references" in trial.user_attrs:
        return bool(trial.user_attrs["references"])
    optuna = optuna_module()
    live = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
    others = [t for t in trial.study.get_trials(deepcopy=False, states=live) if t.number != trial.number]
    refs = ref.references == "every" or not any(t.user_attrs.get("references") for t in others)
    trial.set_user_attr("references", refs)
    return refs


def write_trial_file(folder: Path, ref: StudyRef, trial: Any, params: dict[str, Any], state: str,
                     **extra: Any) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"study": ref.study, "trial": trial.number, "params": params, "state": state, **extra}
    if retry_history(trial):
        record["retry_of"] = retry_history(trial)
    atomic_write_json(folder / TRIAL_FILE, record)


def objective(ref: StudyRef, trial: Any) -> list[float]:
    """One trial: its run, through the runner, then the objectives off its results."""
    optuna = optuna_module()
    params = {p.key: p.suggest(trial) for p in ref.params}
    number = (retry_history(trial) or [trial.number])[0]  # a retry continues in its first trial's folder
    retry = number != trial.number
    cfg = trial_config(ref, params, number, _measures_references(ref, trial))
    folder = Path(cfg.output_dir) / cfg.name
    trial.set_user_attr("run_dir", str(folder))
    trial.set_user_attr("pid", os.getpid())  # which worker ran it (--jobs K: K processes share the storage)
    log.info("study %s: trial %d%s: %s", ref.study, trial.number, f" (retry of {number})" if retry else "",
             ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()))
    try:
        results = run(cfg, resume=retry)  # a retry continues the killed run from its checkpoint
        values = [o.value(results) for o in ref.objectives]
    except optuna.TrialPruned:
        write_trial_file(folder, ref, trial, params, "pruned")
        raise
    except Exception as e:
        error = one_line(e)
        trial.set_user_attr("error", error)
        write_trial_file(folder, ref, trial, params, "failed", error=error)
        raise TrialFailed(error) from None  # one line: the run's log.txt has the traceback
    except KeyboardInterrupt:
        trial.set_user_attr("interrupted", True)  # not the parameters' fault: retried on the next tune
        raise
    write_trial_file(folder, ref, trial, params, "complete",
                     values={o.label: v for o, v in zip(ref.objectives, values)})
    return values


def run_trials(ref: StudyRef, n: int, offset: int, timeout: float | None = None) -> int:
    """Run ``n`` trials of the study in this process (a worker's or a submitit job's function); with
    ``timeout``, no trial starts after that many seconds. Returns the trials run."""
    study = open_study(ref, offset)
    before = len(study.get_trials(deepcopy=False))
    study.optimize(lambda t: objective(ref, t), n_trials=n, timeout=timeout, catch=(TrialFailed,),
                   gc_after_trial=True)
    return n if timeout is None else min(n, len(study.get_trials(deepcopy=False)) - before)


# -------------------------------------------------------------------------------------- the budget

def counts_towards_budget(trial: Any) -> bool:
    """Finished by its own parameters: complete, pruned, or failed with an error (a kill is not)."""
    state = trial.state.name
    if trial.user_attrs.get("seeded_from"):
        return False
    return state in ("COMPLETE", "PRUNED") or (state == "FAIL" and "error" in trial.user_attrs)


def trials_missing(study: Any, total: int) -> int:
    trials = study.get_trials(deepcopy=False)
    running = sum(t.state.name == "RUNNING" for t in trials)
    return max(0, total - sum(map(counts_towards_budget, trials)) - running)


def retry_interrupted(study: Any, ref: StudyRef) -> None:
    """A trial stopped by Ctrl-C is FAIL without an error: enqueue its parameters again, once."""
    optuna = optuna_module()
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    for t in trials:
        if t.state.name == "FAIL" and t.user_attrs.get("interrupted") and t.number not in retried:
            optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=ref.max_retry)(study, t)


def settle_killed(study: Any, ref: StudyRef) -> None:
    """Fail (and so enqueue again) the trials a killed tune left RUNNING. A killed trial's heartbeat
    has stopped, so once the grace period has passed Optuna calls it stale; a trial still beating
    runs elsewhere (a submitit job) and is left to finish."""
    optuna = optuna_module()
    optuna.storages.fail_stale_trials(study)
    running = [t.number for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"]
    if running:
        wait = ref.grace + ref.heartbeat
        log.info("study %s: trials %s were left running; waiting %ds for their heartbeat to tell killed from "
                 "still running", ref.study, ", ".join(map(str, running)), wait)
        time.sleep(wait)
        optuna.storages.fail_stale_trials(study)
