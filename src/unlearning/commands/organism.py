"""``unlearn organism build --preset tiny|small [--seed N] [--force]`` and ``unlearn organism info --preset P``."""

from __future__ import annotations

import argparse
import sys

from unlearning.organism.presets import PRESETS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unlearn organism", description="Build or inspect the embedded model organism.")
    sub = p.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build", help="build the organism (reused from the cache when complete)",
                           description="Build the world, corpora, tokenizer, both twins and checkpoints into "
                           "$UNLEARNING_HOME/organism/<preset>/. Config keys can be overridden: --train.epochs 20.")
    build.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    build.add_argument("--seed", type=int, default=None, help="world/corpus/init seed (default: the preset's)")
    build.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    info = sub.add_parser("info", help="print the cache paths and the quality of a built preset")
    info.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    return p


def main(argv: list[str]) -> int:
    args, rest = parser().parse_known_args(argv)
    from unlearning.core.config import parse_overrides
    from unlearning.core.errors import UserError
    from unlearning.core.logs import setup_logging
    from unlearning.organism.build import ensure_organism, organism_paths
    from unlearning.reporting.tables import quality_table

    setup_logging("INFO")
    if args.action == "build":
        paths = ensure_organism(args.preset, seed=args.seed, force=args.force, overrides=parse_overrides(rest))
    else:
        if rest:
            raise UserError(f"organism info: unexpected arguments {' '.join(rest)}")
        paths = organism_paths(args.preset)
        if not paths.is_complete():
            raise UserError(f"organism {args.preset!r} is not built ({paths.build_json} is missing); "
                            f"run: unlearn organism build --preset {args.preset}")
    info = paths.build_info()
    print(f"organism {args.preset}: seed {info['seed']}, built in {info['seconds']['total']:.0f}s")
    print(f"  root        {paths.root}")
    print(f"  model       {paths.model}  (organism:{args.preset})")
    print(f"  filtered    {paths.filtered}  (organism:{args.preset}-filtered)")
    for rev in paths.revisions():
        early = "  default early" if rev == info["early_checkpoint"] else ""
        print(f"  checkpoint  {paths.checkpoint(rev)}  (organism:{args.preset}@{rev}){early}")
    print(f"  data        {paths.data}")
    quality = paths.quality()
    print(quality_table(quality))
    missed = [k for k, ok in quality["bars"].items() if not ok]
    print("quality bars: " + ("all met" if not missed else "MISSED " + ", ".join(missed)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
