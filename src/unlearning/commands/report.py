"""``unlearn report [RUNS... | --sweep NAME | --study NAME] [--format md|csv|json] [--compare A B] [--rebuild]``.

The notebooks' tables from the results store (``<runs root>/results.db``): one table per method
family (the base model first, the filtered twin last; the varied keys, final loss terms, hazard /
benign / general accuracy, correct_prob, mean ranks and tamper summary when present; Pareto rows
marked: lowest hazard for their general accuracy), then evaluation-only, tamper-only and rank-only
folders in tables of their own. RUNS are run directories (globs allowed; a folder of runs, such as
a sweep's, stands for every run in it); none given: every run in the store. Markdown, CSV and JSON
carry the same values. ``--compare A B`` puts two runs' config differences and results side by
side. ``--rebuild`` recreates the store from the run directories (they are the source of truth).

With ``--output-dir`` (default: the folder of a ``--sweep`` or ``--study``) the table is also
written there as report.<format>, beside hazard_vs_general.png (runs, base model, filtered twin,
chance, the Pareto front) and tamper.png (the tamper curves of the chosen runs).
``--columns key,task:metric,train:metric@32`` prints instead one table of exactly those columns,
read from the folders' files.
"""

from __future__ import annotations

import glob
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from unlearning.core.cli import parse_command
from unlearning.core.config import param
from unlearning.core.errors import UserError
from unlearning.core.io import atomic_write_text
from unlearning.core.paths import runs_root
from unlearning.core.run_records import find_run_dirs
from unlearning.core.store import Store
from unlearning.reporting.report import compare_tables, render, report_table, store_tables, write_plots


@dataclass
class ReportConfig:
    runs: list[str] = param([], positional=True, many=True, help="run directories (globs allowed; a folder of runs "
                                                             "stands for each run in it); none: the whole store")
    sweep: str | None = param(None, help="the rows of this sweep (its grid's name)")
    study: str | None = param(None, help="the trials of this unlearn tune study")
    compare: list[str] | None = param(None, many=True, help="two run directories: config differences and results "
                                                            "side by side")
    format: Literal["md", "csv", "json"] = param("md", help="md (tables), csv (one file, a table column) or json")
    runs_root: str | None = param(None, help="the folder holding the runs and results.db "
                                             "(default $UNLEARNING_RUNS or runs)")
    rebuild: bool = param(False, help="recreate results.db from the run directories first")
    output_dir: str | None = param(None, help="also write report.<format> and the plots here (default: the "
                                              "sweep's or study's folder)")
    plot: bool = param(True, help="draw the plots beside a written report (--no-plot)")
    columns: list[str] | None = param(None, help="one table of exactly these columns, from the folders' files: "
                                                 "config keys (sequential.remove_coef), eval metrics (task:metric), "
                                                 "training metrics at a step (train:retain_kl_loss@32)")
    baseline: bool = param(True, help="with --columns: a first row of the first run's model before unlearning")


def expand_runs(patterns: list[str]) -> list[Path]:
    """Globs expanded; a folder that is not a run directory stands for the run directories in it."""
    out: list[Path] = []
    for pattern in patterns:
        for match in sorted(glob.glob(pattern)) or [pattern]:
            path = Path(match)
            if (path / "results.json").is_file():
                out.append(path)
            elif path.is_dir() and (found := find_run_dirs(path)):
                out += found
            else:
                raise UserError(f"{path}: no results.json here or below (not a run directory, or its run has not "
                                f"started); check the path")
    return list(dict.fromkeys(out))


def _check(cfg: ReportConfig) -> None:
    chosen = [name for name, given in (("RUNS", cfg.runs), ("--sweep", cfg.sweep), ("--study", cfg.study),
                                       ("--compare", cfg.compare)) if given]
    if len(chosen) > 1:
        raise UserError(f"{' and '.join(chosen)}: choose one of RUNS, --sweep, --study, --compare")
    if cfg.compare is not None and len(cfg.compare) != 2:
        raise UserError(f"compare: give two run directories (--compare RUN_A RUN_B), not {len(cfg.compare)}")


def select(store: Store, cfg: ReportConfig) -> list[dict[str, Any]]:
    """The records the report covers, fresh from their folders."""
    if cfg.runs or cfg.compare:
        dirs = expand_runs(cfg.compare or cfg.runs)
        for d in dirs:
            if not store.record(d):
                raise UserError(f"{d}: not a run, eval, tamper or ranks folder (its config.yaml says neither)")
        names = [store.name_of(d) for d in dirs]
        return store.records(run_dirs=names)
    store.sync()
    for key, value in (("sweep", cfg.sweep), ("study", cfg.study)):
        if value is not None:
            records = store.records(**{key: value})
            if not records:
                known = sorted({r[key] for r in store.query(f"SELECT DISTINCT {key} FROM runs WHERE {key} IS NOT NULL")})
                raise UserError(f"{key}: no {key} named {value!r} in {store.path}; known: "
                                f"{', '.join(known) or 'none'} (pass --runs-root for another folder)")
            return sorted(records, key=lambda r: (r["trial"] is None, r["trial"] or 0, r["run_dir"]))
    return store.records()


def default_output_dir(store: Store, cfg: ReportConfig, records: list[dict[str, Any]]) -> Path | None:
    """A sweep's or study's own folder: the runs' common parent (``reports/<study>`` when that is the root)."""
    if cfg.output_dir:
        return Path(cfg.output_dir)
    name = cfg.sweep or cfg.study
    if not name or not records:
        return None
    common = Path(os.path.commonpath([str((store.root / r["run_dir"]).parent.resolve()) for r in records]))
    return store.root / "reports" / name if common == store.root.resolve() else common


def report(store: Store, cfg: ReportConfig) -> str:
    """The report's text; its file and plots written when there is an output folder."""
    records = select(store, cfg)
    if cfg.compare:
        return render(compare_tables(*records), cfg.format)
    if not records:
        return f"(no runs recorded in {store.path})\n"
    tables = store_tables(store, records)
    text = render(tables, cfg.format)
    folder = default_output_dir(store, cfg, records)
    if folder is not None:
        atomic_write_text(folder / f"report.{cfg.format}", text)
        written = write_plots(store, tables, records, folder, title=cfg.sweep or cfg.study) if cfg.plot else []
        print(f"report: {folder / f'report.{cfg.format}'}" + "".join(f"\nplot: {p}" for p in written), file=sys.stderr)
    return text


def main(argv: list[str]) -> int:
    parsed = parse_command(ReportConfig, argv, prog="unlearn report", description=__doc__)
    if parsed is None:
        return 0
    cfg, _ = parsed
    _check(cfg)
    if cfg.columns:
        runs = [str(d) for d in expand_runs(cfg.runs)]
        print(report_table(runs, cfg.columns, baseline=cfg.baseline))
        return 0
    store = Store(cfg.runs_root or runs_root())
    if cfg.rebuild:
        print(f"rebuilt {store.path}: {store.rebuild()} run directories", file=sys.stderr)
        if not (cfg.runs or cfg.sweep or cfg.study or cfg.compare):
            return 0
    print(report(store, cfg), end="")
    return 0
