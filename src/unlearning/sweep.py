"""Grids of runs: a base config plus a list of overrides (or a product of value lists).

A grid file::

    base: ../checkpoint_transfer_kl.yaml      # relative to the grid file
    name: kl_retain_cb_grid                   # runs go to <output_dir>/<name>/<row name>
    rows:                                     # explicit rows ...
      - {checkpoint_transfer.retain_coef: 1, checkpoint_transfer.remove_coef: 3}
    grid:                                     # ... and/or a product of value lists
      train.seed: [0, 1]

Runs execute one after another in this process (``executor: local``) or as a SLURM job array
through submitit (``executor: slurm``). Each run writes its own run directory, so a sweep that is
stopped resumes by skipping rows whose results are complete.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unlearning.core.config import from_dict, merge, read_yaml
from unlearning.core.errors import ConfigError
from unlearning.core.rundir import safe_name

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


def nest(dotted: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


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


def row_config(grid: Grid, row: GridRow, output_dir: str | None = None) -> Any:
    """The validated RunConfig of one row."""
    from unlearning.methods import METHODS, method_module
    from unlearning.runner import RunConfig
    data = merge(grid.base, nest(row.overrides))
    data["name"] = f"{grid.name}/{row.name}"
    if output_dir:
        data["output_dir"] = output_dir
    cfg = from_dict(RunConfig, data)
    for m in METHODS:
        if getattr(cfg, m):
            from_dict(method_module(m).Config, getattr(cfg, m), prefix=f"{m}.")
    return cfg


def _run_one(cfg: Any) -> dict[str, Any]:
    from unlearning.runner import run
    return run(cfg)


def run_grid(grid: Grid, *, output_dir: str | None = None, executor: str = "local",
             slurm: dict[str, Any] | None = None, skip_done: bool = True, overrides: dict[str, Any] | None = None,
             retry_failed: bool = False) -> list[tuple[GridRow, Path]]:
    """Run every row; returns (row, run directory) pairs.

    ``overrides`` (run-config keys for every row) and ``retry_failed``: passed by ``unlearn sweep``;
    applied by the sweep life cycle (until then the command merges ``overrides`` into the base).
    """
    from unlearning.core.rundir import RunDir
    configs = [(row, row_config(grid, row, output_dir)) for row in grid.rows]  # validate all before any runs
    todo, out = [], []
    for row, cfg in configs:
        rd = RunDir(Path(cfg.output_dir) / cfg.name, create=False)
        out.append((row, rd.path))
        results = rd.read_results() if rd.results_path.exists() else None
        if skip_done and results and "after" in results:
            log.info("%s: complete, skipped", row.name)
            continue
        todo.append(cfg)
    if executor == "local":
        for cfg in todo:
            log.info("sweep %s: running %s", grid.name, cfg.name)
            _run_one(cfg)
    elif executor == "slurm":
        try:
            import submitit
        except ImportError as e:
            raise ConfigError("executor: slurm needs submitit: pip install 'unlearning[sweep]'") from e
        folder = Path(output_dir or "runs") / grid.name / "slurm"
        ex = submitit.AutoExecutor(folder=str(folder))
        ex.update_parameters(**(slurm or {}))
        jobs = ex.map_array(_run_one, todo)
        log.info("submitted %d jobs: %s", len(jobs), ", ".join(j.job_id for j in jobs))
    else:
        raise ConfigError(f"executor: {executor!r} is not known; choose local or slurm")
    return out
