"""``unlearn sweep GRID.yaml [--executor local|slurm] [--slurm.key value ...]``."""

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
    args, rest = p.parse_known_args(argv)
    setup_logging()
    slurm = parse_overrides(rest).get("slurm", {})
    grid = load_grid(args.grid)
    if args.dry_run:
        from unlearning.sweep import row_config
        for row in grid.rows:
            cfg = row_config(grid, row, args.output_dir)
            print(f"{cfg.output_dir}/{cfg.name}: {row.overrides}")
        return 0
    done = run_grid(grid, output_dir=args.output_dir, executor=args.executor, slurm=slurm)
    if args.executor == "local":
        keys = sorted({k for row, _ in done for k in row.overrides})
        from unlearning.commands.report import DEFAULT_COLUMNS
        columns = args.columns.split(",") if args.columns else keys + DEFAULT_COLUMNS.split(",")
        print(report_table([d for _, d in done], columns))
    return 0
