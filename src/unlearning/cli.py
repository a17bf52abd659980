"""The one command-line entry point: ``unlearn <command> ...``.

Each command lives in ``unlearning.commands.<module>`` and exposes ``main(argv) -> int``; its
options are one dataclass read by :mod:`unlearning.core.cli`. This file only dispatches and
imports a command's module when that command runs, so ``unlearn --help`` stays fast.
"""

from __future__ import annotations

import importlib
import os
import sys

from unlearning import __version__
from unlearning.core.errors import UserError

# Set before torch is imported anywhere: busy-waiting OpenMP threads make small CPU runs crawl.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

COMMANDS = {
    "run": ("run", "unlearn a model with a method config, then evaluate before/after"),
    "eval": ("eval", "evaluate a model on multiple-choice tasks"),
    "tamper": ("tamper", "fine-tune an unlearned model on hazard-adjacent text; watch recovery"),
    "organism": ("organism", "build or inspect the embedded model organism"),
    "ranks": ("ranks", "effective and stable rank of weight updates"),
    "fit-affine": ("fit_affine", "fit per-layer affine maps from a teacher to a model"),
    "mask": ("mask", "train token-mask probes / SAEs and report mask quality"),
    "report": ("report", "tables of results across run directories"),
    "sweep": ("sweep", "run a grid of configs"),
    "tune": ("tune", "search a config's keys with Optuna for the hazard/general Pareto front"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: unlearn <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "Run 'unlearn <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unlearn: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"unlearning.commands.{COMMANDS[name][0]}")
    try:
        return int(module.main(rest) or 0)
    except UserError as e:
        print(f"unlearn {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"unlearn {name}: interrupted; completed files in the run directory are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
