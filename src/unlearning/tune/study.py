"""``unlearn tune``: an Optuna study whose trials are ordinary runs.

Layout under the runs root (``--output-dir``, the config's ``output_dir``, ``$UNLEARNING_RUNS`` or
``./runs``)::

    optuna.db                         Optuna's RDB storage (SQLite), every study of this root
    <study>/trial-0003/               a run directory (runner.run, same life cycle) + trial.json
    <study>/pareto.md, pareto.png     the Pareto set, written when the invocation ends

Optuna does all the searching (its default sampler, TPE, unless ``--sampler``); this module turns a
trial into a run config, runs it, and reads the objectives off its results. Each trial writes
``trial.json`` = ``{"study", "trial", "params", "state": complete|failed|pruned, ...}`` in its run
directory.

Failure and resumption:

* a trial whose run raises (a NaN loss is a ``NonFiniteLossError``) or whose objective is not a
  finite number is Optuna's FAIL with the one-line error in ``user_attrs["error"]`` and trial.json;
  the study goes on, and the failure counts towards ``--trials``;
* a killed trial stays RUNNING in the storage; its heartbeat stops (Optuna's heartbeat, every
  ``--heartbeat`` seconds), so after the grace period Optuna fails it and
  ``RetryHeartbeatStaleTrialCallback`` enqueues its parameters again. The retry continues in the
  killed trial's run directory (``--resume``: the run restarts from its checkpoint, bit-identical);
  a kill is not a failure of the parameters, so it does not count towards ``--trials``;
* running ``unlearn tune`` again with the same arguments loads the study (``load_if_exists``),
  waits out the grace period if a trial was left RUNNING, and runs the trials still missing.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from unlearning.core.config import from_dict, merge, param, read_yaml, to_dict
from unlearning.core.errors import ConfigError, UserError
from unlearning.core.io import read_json
from unlearning.core.paths import OPTUNA_DB, runs_root
from unlearning.core.rundir import COMPLETE, RunDir, config_changes, flatten, safe_name
from unlearning.preflight import FREE_ON_RESUME, preflight
from unlearning.runner import RunConfig
from unlearning.launch import SlurmSettings, executor
from unlearning.tune.launch import launch, worker_context
from unlearning.tune.report import write_report
from unlearning.tune.space import check_space, parse_objectives, parse_over
from unlearning.tune.trials import (StudyRef, optuna_module, retry_interrupted, run_trials, sampler, settle_killed,
                                    storage, trial_config, trials_missing)

log = logging.getLogger(__name__)


@dataclass
class TuneSettings:
    """``unlearn tune``'s options (the command adds its own; run-config keys given on the command
    line override the config file for every trial)."""
    config: str = param(positional=True, help="the run config YAML every trial starts from")
    over: list[str] = param(default_factory=list, many=True,
                            help="the keys to search: KEY=LOW:HIGH[:log] (the key's type says int or float) "
                                 "or KEY=A|B|C, comma-separated")
    trials: int = param(20, min=1, help="trials the study runs in all (a resumed study runs the ones missing; "
                                        "seeded rows do not count)")
    objective: list[str] | None = param(None, help="TASK:METRIC:min|max, comma-separated (default: the eval "
                                                   "tasks' hazard acc down, general and benign acc up)")
    name: str | None = param(None, help="study name, and its folder under the runs root (default: the config's "
                                        "file name)")
    output_dir: str | None = param(None, help="runs root (default: the config's output_dir, $UNLEARNING_RUNS, runs)")
    executor: Literal["local", "submitit"] = param("local", help="local: trials in this process (--jobs 1) or in "
                                                                 "--jobs worker processes; submitit: one job per trial")
    jobs: int = param(1, min=1, help="trials at once (worker processes sharing the Optuna storage, or submitit "
                                     "jobs in flight)")
    slurm: SlurmSettings = param(default_factory=SlurmSettings, help="where submitit jobs go (the sweep's "
                                 "--slurm.* keys: partition, account, gpus_per_node, timeout_min, cluster ...)")
    seed_from_sweep: str | None = param(None, help="add a sweep's complete rows as trials first: the grid's name "
                                                   "under the runs root, or the sweep's folder")
    enqueue_base: bool = param(False, help="run the config's own values of the searched keys as a trial first")
    sampler: Literal["tpe", "random", "nsga2", "grid"] = param(
        "tpe", help="Optuna sampler: tpe is Optuna's default (with the constant liar when --jobs > 1); grid: every "
                    "combination of A|B|C values")
    seed: int = param(0, help="sampler seed (each invocation and worker offsets it, so no two draw alike)")
    references: Literal["once", "every"] = param(
        "once", help="once: only the study's first trial evaluates the base model (eval.before) and the "
                     "reference (eval.reference), the same for every trial; every: each trial as its config says")
    heartbeat: int = param(10, min=1, help="seconds between a running trial's heartbeats in the storage")
    grace: int | None = param(None, min=1, help="seconds without a heartbeat before a trial counts as killed "
                                                "(default: twice --heartbeat)")
    max_retry: int = param(3, min=0, help="times a killed trial is run again")
    storage: str | None = param(None, help="Optuna RDB storage URL (default sqlite:///<runs root>/optuna.db; SLURM "
                                           "jobs on many nodes want a database server: SQLite locks poorly over NFS)")
    timeout: float | None = param(None, min=0, help="seconds after which no new trial starts (those under way "
                                                    "finish); the study can be resumed for the rest")


@dataclass
class TuneOutcome:
    study: Any  # optuna.Study
    folder: Path
    ran: int = 0
    lost_jobs: list[str] = field(default_factory=list)
    report: dict[str, Path] = field(default_factory=dict)


# -------------------------------------------------------------------------------------------- study

def base_config(settings: TuneSettings, overrides: dict[str, Any]) -> tuple[dict[str, Any], RunConfig]:
    if "name" in overrides:
        raise ConfigError("name: a study names its trials <study>/trial-NNNN; set the study's --name instead")
    data = merge(read_yaml(settings.config), overrides)
    data.pop("name", None)
    cfg = from_dict(RunConfig, data)
    cfg.method_config()
    return data, cfg


def prepare(settings: TuneSettings, overrides: dict[str, Any]) -> StudyRef:
    """Everything checked before any trial runs: the config, --over, --objective, the first trial's
    preflight (model, data, tasks, the output folder)."""
    data, cfg = base_config(settings, overrides)
    params = parse_over(settings.over, cfg.method)
    check_space(data, params)
    objectives = parse_objectives(settings.objective, cfg.eval.tasks)
    if settings.sampler == "grid" and any(p.kind != "categorical" for p in params):
        bad = next(p.key for p in params if p.kind != "categorical")
        raise ConfigError(f"sampler: grid needs A|B|C values for every --over key; {bad} is a range")
    root = runs_root(settings.output_dir or (data.get("output_dir") if "output_dir" in data else None))
    study = safe_name(settings.name or Path(settings.config).stem)
    data = {**to_dict(cfg), "output_dir": str(root)}
    data.pop("name", None)
    ref = StudyRef(settings.storage or f"sqlite:///{(root / OPTUNA_DB).absolute()}", study, str(root), data, params,
                   objectives, sampler=settings.sampler, seed=settings.seed, references=settings.references,
                   heartbeat=settings.heartbeat, grace=settings.grace or 2 * settings.heartbeat,
                   max_retry=settings.max_retry, jobs=settings.jobs)
    if settings.enqueue_base:
        base_values(ref)
    if settings.seed_from_sweep:
        sweep_rows(ref, settings.seed_from_sweep)
    first = {p.key: (p.choices[0] if p.kind == "categorical" else p.low) for p in params}
    # a name no trial has: preflight refuses a folder that holds a run, and trial folders may (resume)
    preflight(dataclasses.replace(trial_config(ref, first, 0, True), name=f"{study}/preflight"))
    return ref


def study_attrs(ref: StudyRef) -> dict[str, Any]:
    return {"space": [p.as_dict() for p in ref.params],
            "objectives": [{"label": o.label, "direction": o.direction, "role": o.role} for o in ref.objectives],
            "config": ref.base}


def create_or_load(ref: StudyRef) -> Any:
    """The study in the storage: created, or loaded after checking it searches the same thing."""
    optuna = optuna_module()
    Path(ref.root).mkdir(parents=True, exist_ok=True)
    st = storage(ref)
    attrs = study_attrs(ref)
    exists = ref.study in optuna.get_all_study_names(st)
    if exists:
        study = optuna.load_study(study_name=ref.study, storage=st)
        saved = study.user_attrs
        for key, flag in (("space", "--over"), ("objectives", "--objective")):
            if saved.get(key) != attrs[key]:
                raise ConfigError(f"{flag}: study {ref.study} in {ref.storage_url} was made with other {flag} "
                                  f"values; pass the same ones to resume it, or choose another --name")
        changes = config_changes(saved.get("config", {}), ref.base, FREE_ON_RESUME)
        if changes:
            raise ConfigError(f"config: study {ref.study} was made from another run config: {'; '.join(changes)}; "
                              f"pass the same config and overrides to resume it, or choose another --name")
        return study
    if ref.folder.exists() and any(ref.folder.glob("trial-*")):
        raise ConfigError(f"name: {ref.folder} holds trials of a study that {ref.root}/{OPTUNA_DB} does not know; "
                          f"choose another --name or remove the folder")
    study = optuna.create_study(study_name=ref.study, storage=st, directions=[o.direction for o in ref.objectives],
                                sampler=sampler(ref, 0), load_if_exists=True)
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    return study


def sweep_rows(ref: StudyRef, sweep: str) -> tuple[Path, list[Path]]:
    """The sweep's folder (``<runs root>/<name>`` or a path) and its complete rows; checked in :func:`prepare`."""
    folder = Path(ref.root) / sweep if (Path(ref.root) / sweep).is_dir() else Path(sweep)
    if not folder.is_dir():
        raise ConfigError(f"seed_from_sweep: no sweep {sweep!r}: neither {Path(ref.root) / sweep} nor {sweep} is a "
                          f"folder; give the grid's name (its rows are <runs root>/<name>/<row>) or the folder")
    rows = [d for d in sorted(folder.iterdir()) if d.is_dir() and RunDir(d, create=False).status() == COMPLETE]
    if not rows:
        raise ConfigError(f"seed_from_sweep: {folder} holds no complete run; run the sweep first")
    return folder, rows


def seed_from_sweep(study: Any, ref: StudyRef, sweep: str) -> int:
    """Add each complete row of a sweep as a finished trial (once); returns how many were added."""
    optuna = optuna_module()
    folder, rows = sweep_rows(ref, sweep)
    known = {t.user_attrs.get("seeded_from") for t in study.get_trials(deepcopy=False)}
    added = 0
    for row in rows:
        if str(row) in known:
            continue
        flat = flatten(read_yaml(row / "config.yaml"))
        values = {p.key: flat.get(p.key) for p in ref.params}
        outside = [f"{k}={v}" for p in ref.params for k, v in [(p.key, values[p.key])] if not p.contains(v)]
        if outside:
            log.warning("study %s: sweep row %s is outside the searched space (%s); not added", ref.study,
                        row.name, ", ".join(outside))
            continue
        try:
            scores = [o.value(read_json(row / "results.json")) for o in ref.objectives]
        except UserError as e:
            log.warning("study %s: sweep row %s not added: %s", ref.study, row.name, e)
            continue
        study.add_trial(optuna.trial.create_trial(
            params=values, distributions={p.key: p.distribution() for p in ref.params}, values=scores,
            user_attrs={"seeded_from": str(row), "run_dir": str(row)}))
        added += 1
    log.info("study %s: %d sweep rows of %s added as trials", ref.study, added, folder)
    return added


def base_values(ref: StudyRef) -> dict[str, Any]:
    """The config's own values of the searched keys (checked in :func:`prepare` for --enqueue-base)."""
    flat = flatten(ref.base)
    values = {p.key: flat.get(p.key) for p in ref.params}
    outside = [f"{p.key}={values[p.key]}" for p in ref.params if not p.contains(values[p.key])]
    if outside:
        raise ConfigError(f"enqueue_base: the config's {', '.join(outside)} lies outside --over; widen the range "
                          f"or drop --enqueue-base")
    return values


def enqueue_base(study: Any, ref: StudyRef) -> None:
    """The config's own values of the searched keys as a trial (once; ``skip_if_exists``)."""
    study.enqueue_trial(base_values(ref), user_attrs={"base_config": True}, skip_if_exists=True)


def tune(settings: TuneSettings, overrides: dict[str, Any]) -> TuneOutcome:
    ref = prepare(settings, overrides)
    study = create_or_load(ref)
    if settings.seed_from_sweep:
        seed_from_sweep(study, ref, settings.seed_from_sweep)
    if settings.enqueue_base:
        enqueue_base(study, ref)
    outcome = TuneOutcome(study, ref.folder)
    deadline = None if settings.timeout is None else time.monotonic() + settings.timeout
    for _ in range(ref.max_retry + 1):  # a round after one whose jobs were lost retries their trials
        settle_killed(study, ref)
        retry_interrupted(study, ref)
        missing = trials_missing(study, settings.trials)
        left = None if deadline is None else deadline - time.monotonic()
        if not missing or (left is not None and left <= 0):
            break
        offset = len(study.get_trials(deepcopy=False))  # a fresh sampler stream for each invocation
        log.info("study %s: %d trials to run (%s)", ref.study, missing, storage_note(ref))
        if settings.executor == "local" and settings.jobs == 1:
            outcome.ran += run_trials(ref, missing, offset, left)
            break
        calls = [(ref, 1, offset + i) for i in range(missing)]
        if settings.executor == "local":
            with concurrent.futures.ProcessPoolExecutor(settings.jobs, mp_context=worker_context()) as pool:
                unstarted, lost = launch(pool, calls, settings.jobs, poll=0.2, deadline=deadline,
                                         waiting=lambda: waiting_trials(study))
        else:
            folder = Path(settings.slurm.folder) if settings.slurm.folder else ref.folder / "submitit"
            unstarted, lost = launch(executor(folder, settings.slurm, name=safe_name(ref.study)),
                                     calls, settings.jobs, deadline=deadline)
        outcome.ran += missing - unstarted - len(lost)
        outcome.lost_jobs += lost
        if not lost:
            break
    outcome.report = write_report(study, ref)
    return outcome


def waiting_trials(study: Any) -> int:
    """Trials enqueued and not yet claimed by a worker (the retries of killed trials, seeded values)."""
    return sum(t.state.name == "WAITING" for t in study.get_trials(deepcopy=False))


def storage_note(ref: StudyRef) -> str:
    return f"storage {ref.storage_url}, heartbeat {ref.heartbeat}s, pid {os.getpid()}"
