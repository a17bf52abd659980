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
import multiprocessing
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from unlearning.core.config import from_dict, merge, param, read_yaml, to_dict
from unlearning.core.errors import ConfigError, UserError, one_line
from unlearning.core.io import atomic_write_json, read_json
from unlearning.core.paths import OPTUNA_DB, runs_root
from unlearning.core.rundir import COMPLETE, RunDir, config_changes, flatten, safe_name
from unlearning.preflight import FREE_ON_RESUME, preflight
from unlearning.runner import RunConfig, run
from unlearning.tune.report import write_report
from unlearning.tune.space import Objective, SearchParam, check_space, nested, parse_objectives, parse_over

log = logging.getLogger(__name__)

TRIAL_FILE = "trial.json"


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
    cluster: str | None = param(None, help="submitit cluster: slurm, local or debug (default: slurm if "
                                           "available, else local)")
    slurm: dict[str, Any] = param(default_factory=dict, help="submitit parameters (--slurm.timeout_min 60)")
    seed_from_sweep: str | None = param(None, help="add a sweep's complete rows as trials first: the grid's name "
                                                   "under the runs root, or the sweep's folder")
    enqueue_base: bool = param(False, help="run the config's own values of the searched keys as a trial first")
    sampler: Literal["default", "tpe", "random", "nsga2", "grid"] = param(
        "default", help="Optuna sampler (default: Optuna's default, TPE; grid: every combination of A|B|C values)")
    seed: int = param(0, help="sampler seed (each invocation and worker offsets it, so no two draw alike)")
    references: Literal["once", "every"] = param(
        "once", help="once: only the study's first trial evaluates the base model (eval.before) and the "
                     "reference (eval.reference), the same for every trial; every: each trial as its config says")
    heartbeat: int = param(10, min=1, help="seconds between a running trial's heartbeats in the storage")
    grace: int | None = param(None, min=1, help="seconds without a heartbeat before a trial counts as killed "
                                                "(default: twice --heartbeat)")
    max_retry: int = param(3, min=0, help="times a killed trial is run again")
    timeout: float | None = param(None, min=0, help="seconds after which no new trial starts (those under way "
                                                    "finish); the study can be resumed for the rest")


@dataclass
class StudyRef:
    """Everything a worker process (or submitit job) needs to run trials of the study: picklable."""
    storage_url: str
    study: str
    root: str
    base: dict[str, Any]
    params: list[SearchParam]
    objectives: list[Objective]
    sampler: str = "default"
    seed: int = 0
    references: str = "once"
    heartbeat: int = 10
    grace: int = 20
    max_retry: int = 3

    @property
    def folder(self) -> Path:
        return Path(self.root) / self.study


@dataclass
class TuneOutcome:
    study: Any  # optuna.Study
    folder: Path
    ran: int = 0
    lost_jobs: list[str] = field(default_factory=list)
    report: dict[str, Path] = field(default_factory=dict)


class TrialFailed(Exception):
    """A trial's run failed; the message is its one line (the traceback is in the run's log.txt)."""


# ------------------------------------------------------------------------------------------ storage

def _optuna() -> Any:
    import optuna  # optional (the tune extra): only `unlearn tune` needs it
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def storage(ref: StudyRef) -> Any:
    optuna = _optuna()
    return optuna.storages.RDBStorage(
        ref.storage_url, heartbeat_interval=ref.heartbeat, grace_period=ref.grace,
        # SQLite allows one writer at a time: workers wait for the lock rather than fail
        engine_kwargs={"connect_args": {"timeout": 120}},
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=ref.max_retry))


def sampler(ref: StudyRef, offset: int) -> Any:
    optuna = _optuna()
    seed = ref.seed + offset
    if ref.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if ref.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if ref.sampler == "grid":
        return optuna.samplers.GridSampler({p.key: list(p.choices) for p in ref.params}, seed=ref.seed)
    if ref.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return None  # optuna.create_study's default


def open_study(ref: StudyRef, offset: int = 0) -> Any:
    return _optuna().load_study(study_name=ref.study, storage=storage(ref), sampler=sampler(ref, offset))


# -------------------------------------------------------------------------------------------- trials

def retry_history(trial: Any) -> list[int]:
    """The trials this one retries, first first ([] for a trial of its own). A live ``Trial`` has no
    system attributes in Optuna 5, so they are read from its frozen copy in the study."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    return _optuna().storages.RetryHeartbeatStaleTrialCallback.retry_history(frozen)


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
    optuna = _optuna()
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
    optuna = _optuna()
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
    optuna = _optuna()
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    for t in trials:
        if t.state.name == "FAIL" and t.user_attrs.get("interrupted") and t.number not in retried:
            optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=ref.max_retry)(study, t)


def settle_killed(study: Any, ref: StudyRef) -> None:
    """Fail (and so enqueue again) the trials a killed tune left RUNNING. A killed trial's heartbeat
    has stopped, so once the grace period has passed Optuna calls it stale; a trial still beating
    runs elsewhere (a submitit job) and is left to finish."""
    optuna = _optuna()
    optuna.storages.fail_stale_trials(study)
    running = [t.number for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"]
    if running:
        wait = ref.grace + ref.heartbeat
        log.info("study %s: trials %s were left running; waiting %ds for their heartbeat to tell killed from "
                 "still running", ref.study, ", ".join(map(str, running)), wait)
        time.sleep(wait)
        optuna.storages.fail_stale_trials(study)


# ---------------------------------------------------------------------------------------- executors

def submitit_executor(folder: Path, cluster: str | None, parameters: dict[str, Any]) -> Any:
    """The one place a trial job meets submitit (wp-dist's shared launch can replace it)."""
    try:
        import submitit  # optional: only --executor submitit needs it
    except ImportError as e:
        raise ConfigError("executor: submitit needs submitit: pip install 'unlearning[sweep]'") from e
    ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    if parameters:
        ex.update_parameters(**parameters)
    return ex


def worker_context() -> Any:
    """Worker processes forked from a fresh server that has imported the runner (torch, transformers)
    once: no CUDA state is inherited (fork after CUDA is initialised breaks it) and no worker pays the
    imports again (spawn would)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["unlearning.tune.study"])
    return ctx


def launch(executor: Any, calls: list[tuple[Any, ...]], jobs: int, poll: float = 1.0,
           deadline: float | None = None) -> tuple[int, list[str]]:
    """``run_trials(*call)`` for each call, at most ``jobs`` at once, on a ``concurrent.futures`` or
    submitit executor (both have ``submit``, ``done`` and ``result``); none starts after ``deadline``
    (``time.monotonic()``). Returns the calls not started and the lost jobs' errors."""
    pending, running, lost = list(calls), [], []
    while pending or running:
        if pending and deadline is not None and time.monotonic() > deadline:
            log.info("--timeout reached: %d trials not started (run the same command again for them)", len(pending))
            pending = []
        while pending and len(running) < jobs:
            try:
                running.append(executor.submit(run_trials, *pending.pop(0)))
            except Exception as e:  # a broken process pool takes no more work: the next round has a new one
                lost += [one_line(e)] * (len(pending) + 1)
                log.error("trial jobs could not be submitted: %s", one_line(e))
                pending = []
        finished = [j for j in running if j.done()]
        for job in finished:
            running.remove(job)
            try:
                job.result()
            except Exception as e:  # a killed worker: its trial's heartbeat stops, a later round retries it
                lost.append(one_line(e))
                log.error("a trial job was lost: %s", one_line(e))
        if not finished and running:
            time.sleep(poll)
    return len(pending), lost


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
    ref = StudyRef(f"sqlite:///{(root / OPTUNA_DB).absolute()}", study, str(root), data, params, objectives,
                   settings.sampler, settings.seed, settings.references, settings.heartbeat,
                   settings.grace or 2 * settings.heartbeat, settings.max_retry)
    if settings.enqueue_base:
        base_values(ref)
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
    optuna = _optuna()
    Path(ref.root).mkdir(parents=True, exist_ok=True)
    st = storage(ref)
    attrs = study_attrs(ref)
    exists = ref.study in {s.study_name for s in optuna.get_all_study_summaries(st, include_best_trial=False)}
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


def seed_from_sweep(study: Any, ref: StudyRef, sweep: str) -> int:
    """Add each complete row of a sweep as a finished trial (once); returns how many were added."""
    optuna = _optuna()
    folder = Path(ref.root) / sweep if (Path(ref.root) / sweep).is_dir() else Path(sweep)
    if not folder.is_dir():
        raise ConfigError(f"seed_from_sweep: no sweep {sweep!r}: neither {Path(ref.root) / sweep} nor {sweep} is a "
                          f"folder; give the grid's name (its rows are <runs root>/<name>/<row>) or the folder")
    rows = [d for d in sorted(folder.iterdir()) if d.is_dir() and RunDir(d, create=False).status() == COMPLETE]
    if not rows:
        raise ConfigError(f"seed_from_sweep: {folder} holds no complete run; run the sweep first")
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
                unstarted, lost = launch(pool, calls, settings.jobs, poll=0.2, deadline=deadline)
        else:
            unstarted, lost = launch(submitit_executor(ref.folder / "submitit", settings.cluster, settings.slurm),
                                     calls, settings.jobs, deadline=deadline)
        outcome.ran += missing - unstarted - len(lost)
        outcome.lost_jobs += lost
        if not lost:
            break
    outcome.report = write_report(study, ref)
    return outcome


def storage_note(ref: StudyRef) -> str:
    return f"storage {ref.storage_url}, heartbeat {ref.heartbeat}s, pid {os.getpid()}"
