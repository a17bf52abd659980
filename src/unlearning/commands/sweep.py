"""``unlearn sweep GRID.yaml [--executor local|slurm] [--slurm.key value ...] [--train.seed 3 ...]``.

Runs every row of a grid file (a base config + rows and/or a product grid), then prints a table.
Run-config keys given on the command line (``--train.seed 3``) apply to every row. SLURM options
go through submitit, one torchrun per node of each row's job: ``--slurm.nodes 2 --slurm.gpus_per_node 4
--slurm.timeout_min 120 --slurm.partition gpu --slurm.account lab`` (see ``--help``).
Running a sweep again resumes it (complete rows skipped, killed rows resumed from their
checkpoints, failed rows rerun with ``--retry-failed``); precedence is base <- row <- command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from unlearning.commands.report import ReportConfig, report
from unlearning.core.cli import parse_command
from unlearning.core.config import param
from unlearning.core.logs import setup_logging
from unlearning.core.store import Store
from unlearning.launch import SlurmSettings
from unlearning.reporting.report import report_table
from unlearning.runner import RunConfig
from unlearning.sweep import load_grid, row_config, run_grid


@dataclass
class SweepConfig:
    grid: str = param(positional=True, help="grid YAML: base config + rows and/or a product grid")
    executor: Literal["local", "slurm"] = param("local", help="run the rows here, one after another, or as a "
                                                              "SLURM job array (submitit)")
    output_dir: str | None = param(None, help="parent of the grid's run directories (default: the base config's)")
    columns: list[str] | None = param(None, help="report columns (see unlearn report --columns; default: the "
                                                 "report's tables of the sweep's rows)")
    dry_run: bool = param(False, help="validate and list the rows, run nothing")
    resume: bool = param(False, help="accepted for clarity: running a sweep again always resumes it (complete rows "
                                     "skipped, killed rows continued from their checkpoints)")
    retry_failed: bool = param(False, help="run again the rows whose run failed")
    slurm: SlurmSettings = field(default_factory=SlurmSettings)


def main(argv: list[str]) -> int:
    parsed = parse_command(SweepConfig, argv, prog="unlearn sweep", description=__doc__, config=RunConfig)
    if parsed is None:
        return 0
    opts, overrides = parsed
    setup_logging()
    grid = load_grid(opts.grid)
    if opts.dry_run:
        for row in grid.rows:
            cfg = row_config(grid, row, opts.output_dir, overrides)
            print(f"{cfg.output_dir}/{cfg.name}: {row.overrides}")
        return 0
    done = run_grid(grid, output_dir=opts.output_dir, executor=opts.executor, slurm=opts.slurm,
                    overrides=overrides, retry_failed=opts.retry_failed)
    if opts.executor == "local":
        complete = [o for o in done if o.status == "complete"]
        if opts.columns and complete:
            print(report_table([o.path for o in complete], opts.columns))
        elif done:  # the store's tables of every row, written beside the rows with the hazard-general plot
            root = row_config(grid, grid.rows[0], opts.output_dir, overrides).output_dir
            print(report(Store(root), ReportConfig(sweep=grid.name)), end="")
        for o in done:
            if o.status != "complete":
                print(f"{o.row.name}: {o.status}: {o.note}")
        return 1 if len(complete) < len(done) else 0
    return 0
