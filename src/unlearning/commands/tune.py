"""``unlearn tune CONFIG.yaml --over KEY=LOW:HIGH[:log],KEY=A|B --trials N [--jobs K] [--objective ...]``.

Boundary search with Optuna: each trial is an ordinary run of CONFIG with the searched keys set
(``<runs root>/<study>/trial-NNNN``), and the study keeps hazard accuracy down and general (and
benign) accuracy up, or the ``--objective`` given. The study lives in Optuna's SQLite storage
``<runs root>/optuna.db``: running the same command again resumes it (trials a kill left running
are run again from their checkpoints). ``pareto.md`` and ``pareto.png`` in the study folder show
the Pareto set. Run-config keys given on the command line (``--train.seed 3``) apply to every trial.

Example: ``unlearn tune configs/organism_tiny.yaml --over sequential.remove_coef=1:100:log,
sequential.retain_coef=0.5:200:log,train.optimizer.lr=1e-5:1e-3:log --trials 24 --jobs 4``
"""

from __future__ import annotations

from dataclasses import dataclass

from unlearning.core.cli import parse_command
from unlearning.core.config import param
from unlearning.core.logs import setup_logging
from unlearning.runner import RunConfig
from unlearning.tune.study import TuneSettings, prepare, tune


@dataclass
class TuneConfig(TuneSettings):
    dry_run: bool = param(False, help="check the config, --over and --objective and print the space; run nothing")


def main(argv: list[str]) -> int:
    parsed = parse_command(TuneConfig, argv, prog="unlearn tune", description=__doc__, config=RunConfig)
    if parsed is None:
        return 0
    opts, overrides = parsed
    setup_logging()
    if opts.dry_run:
        ref = prepare(opts, overrides)
        print(f"study {ref.study} in {ref.storage_url}, trials under {ref.folder}")
        for p in ref.params:
            print(f"  {p.key}: {p.describe()}")
        for o in ref.objectives:
            print(f"  objective {o.label}: {o.direction}")
        return 0
    outcome = tune(opts, overrides)
    print((outcome.report["table"]).read_text())
    for name, path in outcome.report.items():
        print(f"{name}: {path}")
    if outcome.lost_jobs:
        print(f"{len(outcome.lost_jobs)} trial jobs were lost ({outcome.lost_jobs[0]}); run the same command "
              f"again to retry their trials")
        return 1
    return 0
