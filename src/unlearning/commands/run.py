"""``unlearn run [CONFIG.yaml] [--dotted.key value ...] [--resume] [--overwrite] [--force]``."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from unlearning.core.cli import parse_command
from unlearning.core.config import param
from unlearning.core.runtime import is_main_process
from unlearning.reporting.tables import results_table
from unlearning.runner import RunConfig, load_run_config, run

DEFAULT_CONFIG = {False: "organism_tiny.yaml", True: "organism_small.yaml"}
DESCRIPTION = ("Unlearn with a method config, save the model, evaluate before/after. Every key of the run "
               "config can be set on the command line, over the config file: --train.optimizer.lr 2e-4 "
               "--sequential.layers '31->11:4' --eval.add-bos-token true.")


@dataclass
class RunOptions:
    """What ``unlearn run`` does with the config (not part of the config it saves)."""
    config: str | None = param(None, positional=True,
                               help="YAML run config (default: the shipped organism config, tiny on CPU, small "
                                    "with a GPU)")
    resume: bool = param(False, help="continue a killed run from its last finished phase")
    overwrite: bool = param(False, help="replace a finished run of the same name")
    force: bool = param(False, help="run even where a check would refuse (see the run life cycle)")


def default_config_path() -> Path:
    """The shipped main-job config: the tiny organism on CPU, the small one with a GPU."""
    return Path(__file__).resolve().parents[1] / "configs" / DEFAULT_CONFIG[torch.cuda.is_available()]


def main(argv: list[str]) -> int:
    parsed = parse_command(RunOptions, argv, prog="unlearn run", description=DESCRIPTION, config=RunConfig)
    if parsed is None:
        return 0
    opts, overrides = parsed
    cfg = load_run_config(opts.config or default_config_path(), overrides)
    results = run(cfg, resume=opts.resume, overwrite=opts.overwrite, force=opts.force)
    if "after" in results and is_main_process():  # under torchrun every rank has the results
        print(results_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
