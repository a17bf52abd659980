"""Grids of runs: a base config plus a list of overrides (or a product of value lists).

A grid file::

    base: ../checkpoint_transfer_kl.yaml      # relative to the grid file
    name: kl_retain_cb_grid                   # runs go to <output_dir>/<name>/<row name>
    rows:                                     # explicit rows ...
      - {checkpoint_transfer.retain_coef: 1, checkpoint_transfer.remove_coef: 3}
    grid:                                     # ... and/or a product of value lists
      train.seed: [0, 1]

Each row's config is the grid's base <- the row's keys <- the command line's overrides (the user
typed those last, so they win over every row; a row's own ``name`` is always its own).

Runs execute one after another in this process (``executor: local``) or as a SLURM job array
through submitit (``executor: slurm``: one torchrun per node of each row's job, see
:mod:`unlearning.launch`). Every row is validated (preflight) before any runs. Each
run writes its own run directory with its status, so running the sweep again resumes it: rows
that are complete are skipped, an unfinished row (killed) resumes from its checkpoint, a failed
row is skipped with a note unless ``retry_failed`` (then it starts afresh). With the local executor
a row that fails does not stop the others; the summary names the rows that failed.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unlearning.core.config import from_dict, merge, nested, read_yaml
from unlearning.core.errors import ConfigError, UserError, one_line
from unlearning.core.faults import fault_point
from unlearning.core.io import atomic_write_json, dumps_json, read_json
from unlearning.core.rundir import COMPLETE, FAILED, RUNNING, RunDir, flatten, safe_name
from unlearning.core.run_records import SWEEP_FILE
from unlearning.launch import SlurmSettings, submit_runs
from unlearning.methods import METHODS, method_module
from unlearning.preflight import preflight
from unlearning.runner import RunConfig, run

log = logging.getLogger(__name__)


@dataclass
class GridRow:
    name: str
    overrides: dict[str, Any]  # dotted keys


@dataclass
class Grid:
    name: str
    base: dict[str, Any]
    rows: list[GridRow] = field(default_factory=list)


def row_name(overrides: dict[str, Any]) -> str:
    parts = [f"{k.split('.')[-1]}{v}" for k, v in overrides.items()]
    return safe_name("_".join(parts) or "base")


def load_grid(path: str | Path) -> Grid:
    path = Path(path)
    raw = read_yaml(path)
    unknown = set(raw) - {"base", "name", "rows", "grid", "description"}
    if unknown:
        raise ConfigError(f"{path}: unknown grid key {sorted(unknown)[0]!r}; allowed: base, name, rows, grid, description")
    base: dict[str, Any] = {}
    if raw.get("base"):
        base = read_yaml((path.parent / raw["base"]).resolve())
    rows = [dict(r) for r in raw.get("rows") or []]
    product = raw.get("grid") or {}
    if product:
        keys = list(product)
        combos = [dict(zip(keys, values)) for values in itertools.product(*(product[k] for k in keys))]
        rows = [{**r, **c} for r in (rows or [{}]) for c in combos]
    if not rows:
        rows = [{}]
    return Grid(raw.get("name") or path.stem, base, [GridRow(row_name(r), r) for r in rows])


@dataclass
class RowOutcome:
    """What happened to one row: ``status`` is complete, failed, skipped-failed or submitted."""
    row: GridRow
    path: Path
    status: str
    note: str = ""
    job: Any = None  # submitted: the submitit Job (its result() is the row's results.json)


def row_config(grid: Grid, row: GridRow, output_dir: str | None = None,
               overrides: dict[str, Any] | None = None) -> Any:
    """The validated RunConfig of one row: base <- row <- ``overrides`` (nested, from the command line)."""
    if overrides and "name" in overrides:
        raise ConfigError("name: a sweep names its rows <grid name>/<row name>; set the grid's name: instead")
    data = merge(merge(grid.base, nested(row.overrides)), overrides or {})
    data["name"] = f"{grid.name}/{row.name}"
    if output_dir:
        data["output_dir"] = output_dir
    cfg = from_dict(RunConfig, data)
    for m in METHODS:
        if getattr(cfg, m):
            from_dict(method_module(m).Config, getattr(cfg, m), prefix=f"{m}.")
    return cfg


def write_sweep_file(grid: Grid, output_dir: str | None, overrides: dict[str, Any] | None) -> None:
    """``<output_dir>/<grid name>/sweep.json``: the sweep's name and the keys its rows vary (those no
    command-line override pins), which the results store reads beside each row."""
    if not grid.rows:
        return
    cfg = row_config(grid, grid.rows[0], output_dir, overrides)
    pinned = set(flatten(overrides or {}))
    keys = sorted({k for row in grid.rows for k in row.overrides} - pinned)
    path = Path(cfg.output_dir) / grid.name / SWEEP_FILE
    content = {"name": grid.name, "keys": keys, "rows": {row.name: row.overrides for row in grid.rows}}
    if not path.exists() or read_json(path) != json.loads(dumps_json(content)):  # unchanged: keep its mtime
        atomic_write_json(path, content)


def _run_one(cfg: Any, resume: bool = False) -> dict[str, Any]:
    """One row (a module-level function: submitit pickles it for SLURM)."""
    return run(cfg, resume=resume)


def run_grid(grid: Grid, *, output_dir: str | None = None, executor: str = "local",
             slurm: SlurmSettings | None = None, overrides: dict[str, Any] | None = None,
             retry_failed: bool = False) -> list[RowOutcome]:
    """Run (or resume) every row; returns one outcome per row, in grid order."""
    if executor not in ("local", "slurm"):
        raise ConfigError(f"executor: {executor!r} is not known; choose local or slurm")
    outcomes: list[RowOutcome] = []
    todo: list[tuple[RowOutcome, Any, bool]] = []  # (outcome, config, resume)
    for row in grid.rows:  # validate every row before any runs
        try:
            cfg = row_config(grid, row, output_dir, overrides)
            rd = RunDir(Path(cfg.output_dir) / cfg.name, create=False)
            status = rd.status()
            outcome = RowOutcome(row, rd.path, status or "")
            outcomes.append(outcome)
            if status == COMPLETE:
                outcome.note = "complete, skipped"
            elif status == FAILED and not retry_failed:
                outcome.status, outcome.note = "skipped-failed", (
                    f"failed earlier ({(rd.read_results() or {}).get('error', 'see its log.txt')}); "
                    f"skipped: pass --retry-failed to run it again")
            else:
                resume = status == RUNNING  # killed: continue from its checkpoint
                preflight(cfg, resume=resume)
                todo.append((outcome, cfg, resume))
        except UserError as e:  # keeps its type (ConfigError, DataError...): the CLI prints one line
            raise type(e)(f"sweep {grid.name}, row {row.name}: {e}") from None
    write_sweep_file(grid, output_dir, overrides)
    for outcome in outcomes:
        if outcome.note:
            log.info("sweep %s: %s: %s", grid.name, outcome.row.name, outcome.note)
    if executor == "local":
        for outcome, cfg, resume in todo:
            log.info("sweep %s: %s %s", grid.name, "resuming" if resume else "running", outcome.row.name)
            try:
                _run_one(cfg, resume)
                outcome.status, outcome.note = COMPLETE, "resumed" if resume else "ran"
                fault_point("sweep_row")
            except Exception as e:  # recorded in the row's results.json and log.txt; the next row runs
                outcome.status, outcome.note = FAILED, one_line(e)
                log.error("sweep %s: %s failed: %s", grid.name, outcome.row.name, outcome.note)
        _log_summary(grid, outcomes)
    else:
        slurm = slurm or SlurmSettings()
        base = output_dir or (todo[0][1].output_dir if todo else "runs")
        folder = Path(slurm.folder or Path(base) / grid.name / "slurm")
        jobs = submit_runs([c for _, c, _ in todo], slurm, resume=[r for _, _, r in todo], folder=folder,
                           name=safe_name(grid.name)) if todo else []
        for (outcome, _, _), job in zip(todo, jobs):
            outcome.status, outcome.note, outcome.job = "submitted", f"job {job.job_id}", job
        log.info("submitted %d jobs: %s", len(jobs), ", ".join(j.job_id for j in jobs))
    return outcomes


def _log_summary(grid: Grid, outcomes: list[RowOutcome]) -> None:
    failed = [o for o in outcomes if o.status in (FAILED, "skipped-failed")]
    done = sum(o.status == COMPLETE for o in outcomes)
    log.info("sweep %s: %d of %d rows complete%s", grid.name, done, len(outcomes),
             f"; failed: {', '.join(f'{o.row.name} ({o.note})' for o in failed)}" if failed else "")
