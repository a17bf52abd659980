"""``unlearn run [CONFIG.yaml] [--dotted.key value ...] [--resume] [--overwrite] [--force]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unlearning.reporting.tables import results_table

DEFAULT_CONFIG = {False: "organism_tiny.yaml", True: "organism_small.yaml"}


def default_config_path() -> Path:
    """The shipped main-job config: the tiny organism on CPU, the small one with a GPU."""
    import torch
    return Path(__file__).resolve().parents[1] / "configs" / DEFAULT_CONFIG[torch.cuda.is_available()]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="unlearn run", description="Unlearn with a method config, save the model, evaluate before/after. "
        "Any config key can be overridden: --train.optimizer.lr 2e-4 --sequential.layers '31->11:4'.")
    parser.add_argument("config", nargs="?", help="YAML config (default: the shipped organism config)")
    parser.add_argument("--resume", action="store_true", help="continue a killed run from its last finished phase "
                        "(a complete run: return its results)")
    parser.add_argument("--overwrite", action="store_true", help="start afresh over the run of this name")
    parser.add_argument("--force", action="store_true", help="with --resume: accept a changed config")
    args, overrides = parser.parse_known_args(argv)
    from unlearning.runner import load_run_config, run
    path = args.config or default_config_path()
    cfg = load_run_config(path, overrides)
    results = run(cfg, resume=args.resume, overwrite=args.overwrite, force=args.force)
    if "after" in results:
        print(results_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
