"""``unlearn sweep GRID.yaml [--executor local|slurm] [--retry-failed] [--slurm.key value ...] [--dotted.key value ...]``.

Other ``--dotted.key value`` options override every row's config (base <- row <- command line).
Running a sweep again resumes it (complete rows skipped, killed rows resumed); ``--resume`` is
accepted and means just that.
"""

from __future__ import annotations

import argparse

from unlearning.core.config import parse_overrides
from unlearning.core.logs import setup_logging
from unlearning.reporting.report import report_table
from unlearning.sweep import load_grid, run_grid


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="unlearn sweep", description="Run every row of a grid file, then print a "
                                "table. SLURM options go through submitit: --slurm.gpus_per_node 4 "
                                "--slurm.timeout_min 120 --slurm.slurm_partition gpu.")
    p.add_argument("grid", help="grid YAML: base config + rows and/or a product grid")
    p.add_argument("--executor", choices=["local", "slurm"], default="local")
    p.add_argument("--output-dir", default=None)
    p.add_argument("--columns", default=None, help="report columns (see unlearn report)")
    p.add_argument("--dry-run", action="store_true", help="validate and list the rows, run nothing")
    p.add_argument("--resume", action="store_true", help="the default: rows already complete are skipped, "
                   "killed rows continue from their checkpoints")
    p.add_argument("--retry-failed", action="store_true", help="run rows that failed before again (afresh)")
    args, rest = p.parse_known_args(argv)
    setup_logging()
    overrides = parse_overrides(rest)
    slurm = overrides.pop("slurm", {})
    grid = load_grid(args.grid)
    if args.dry_run:
        from unlearning.sweep import row_config
        for row in grid.rows:
            cfg = row_config(grid, row, args.output_dir, overrides)
            print(f"{cfg.output_dir}/{cfg.name}: {row.overrides}")
        return 0
    done = run_grid(grid, output_dir=args.output_dir, executor=args.executor, slurm=slurm, overrides=overrides,
                    retry_failed=args.retry_failed)
    if args.executor == "local":
        complete = [o for o in done if o.status == "complete"]
        keys = sorted({k for o in done for k in o.row.overrides})
        from unlearning.commands.report import DEFAULT_COLUMNS
        columns = args.columns.split(",") if args.columns else keys + DEFAULT_COLUMNS.split(",")
        if complete:
            print(report_table([o.path for o in complete], columns))
        for o in done:
            if o.status != "complete":
                print(f"{o.row.name}: {o.status}: {o.note}")
        return 1 if len(complete) < len(done) else 0
    return 0
