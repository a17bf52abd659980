"""``unlearn report RUN_DIR... --columns key,task:metric,train:metric@32``.

A table across run directories: a baseline row (the first run's model before unlearning), one row
per run, the reference.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass

from unlearning.core.cli import parse_command
from unlearning.core.config import param
from unlearning.reporting.report import report_table

DEFAULT_COLUMNS = ("organism_hazard_cloze:acc,organism_general_cloze:acc,organism_benign_bio_cloze:acc,"
                   "organism_hazard_cloze:correct_prob")


@dataclass
class ReportConfig:
    runs: list[str] = param(positional=True, many=True, help="run directories (globs allowed)")
    columns: list[str] = param(DEFAULT_COLUMNS.split(","),
                               help="comma-separated: config keys (sequential.remove_coef), eval metrics "
                                    "(task:metric), training metrics at a step (train:retain_kl_loss@32)")
    baseline: bool = param(True, help="a first row of the first run's model before unlearning (--no-baseline)")


def main(argv: list[str]) -> int:
    parsed = parse_command(ReportConfig, argv, prog="unlearn report", description=__doc__)
    if parsed is None:
        return 0
    cfg, _ = parsed
    runs = sorted({d for pattern in cfg.runs for d in (glob.glob(pattern) or [pattern])})
    print(report_table(runs, cfg.columns, baseline=cfg.baseline))
    return 0
