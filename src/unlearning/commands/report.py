"""``unlearn report RUN_DIR... --columns key,task:metric,train:metric@32``."""

from __future__ import annotations

import argparse
import glob

from unlearning.reporting.report import report_table

DEFAULT_COLUMNS = ("organism_hazard_cloze:acc,organism_general_cloze:acc,organism_benign_bio_cloze:acc,"
                   "organism_hazard_cloze:correct_prob")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="unlearn report", description="A table across run directories: a baseline "
                                "row (the first run's model before unlearning), one row per run, the reference.")
    p.add_argument("runs", nargs="+", help="run directories (globs allowed)")
    p.add_argument("--columns", default=DEFAULT_COLUMNS,
                   help="comma-separated: config keys (sequential.remove_coef), eval metrics (task:metric), "
                        "training metrics at a step (train:retain_kl_loss@32)")
    p.add_argument("--no-baseline", action="store_true")
    args = p.parse_args(argv)
    runs = sorted({d for pattern in args.runs for d in (glob.glob(pattern) or [pattern])})
    print(report_table(runs, [c.strip() for c in args.columns.split(",") if c.strip()],
                       baseline=not args.no_baseline))
    return 0
