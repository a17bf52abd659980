"""Time an organism build and print its quality (the ``small`` preset on one GPU: target <= 3 min).

    python benchmarks/organism_build.py [--preset small] [--seed 0] [--out runs/organism_build.json]
                                        [--dotted.key value ...]
    python benchmarks/organism_build.py --preset small-letter   # the letter-format organism and its twin

Rebuilds the preset from scratch (``--force``) into ``$UNLEARNING_HOME/organism/<preset>/``, which
also refreshes the cache every later command uses. Any preset key can be overridden to try a
recipe, e.g. ``--train.epochs 40`` (the letter-format stretch needs more steps) or
``--world.name_syllables 3`` (longer names); an overridden build is not the preset, so the next
``organism:<preset>`` use rebuilds the default. Prints the held-out accuracy table, the quality
bars, and where the time went (data, training and evaluation per twin, tokens/s).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", default="runs/organism_build.json", help="JSON summary written here")
    parser.add_argument("--reuse", action="store_true", help="do not force a rebuild (report the cached build)")
    args, rest = parser.parse_known_args(argv)

    from unlearning.core.config import parse_overrides
    from unlearning.core.io import atomic_write_json
    from unlearning.core.logs import setup_logging
    from unlearning.organism.build import ensure_organism
    from unlearning.reporting.tables import quality_table

    setup_logging("INFO")
    t0 = time.time()
    paths = ensure_organism(args.preset, seed=args.seed, force=not args.reuse, overrides=parse_overrides(rest))
    wall = time.time() - t0
    info, quality = paths.build_info(), paths.quality()

    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"\norganism {args.preset} (seed {info['seed']}) on {device}: wall {wall:.1f}s "
          f"(build {info['seconds']['total']:.1f}s, corpus+tokenizer {info['seconds']['data']:.1f}s)")
    for twin, t in info["training"].items():
        print(f"  {twin:<10} {t['steps']} steps, {t['tokens_seen'] / 1e6:.1f}M tokens "
              f"({t['tokens_seen'] / max(t['corpus_tokens'], 1):.1f} epochs of {t['corpus_tokens'] / 1e6:.2f}M), "
              f"train {t['train_seconds']:.1f}s ({t['tokens_seen'] / t['train_seconds'] / 1e3:.0f}K tok/s), "
              f"eval {t['eval_seconds']:.1f}s, process {t['process_seconds']:.1f}s")
    print(quality_table(quality))
    qa = quality["unfiltered"]["qa_half"]
    print("qa half (question format, unfiltered): " + ", ".join(f"{d} {v['cloze']['acc']:.3f}" for d, v in qa.items()))
    letter_curve = {r: q["heldout"]["hazard"]["letter"]["acc"] for r, q in quality["checkpoints"].items()}
    if letter_curve:  # when the letter format emerges: what a shorter run would keep
        print("unfiltered hazard, letter format, at checkpoints: " + ", ".join(
            f"{r} {acc:.3f}" for r, acc in letter_curve.items()))
    for bar, ok in quality["bars"].items():
        print(f"  {'ok  ' if ok else 'MISS'} {bar}")
    budget_s = 180
    print(f"  {'ok  ' if info['seconds']['total'] <= budget_s else 'MISS'} build<={budget_s}s "
          f"({info['seconds']['total']:.0f}s)")
    summary = {"preset": args.preset, "device": device, "wall_seconds": round(wall, 1), "build": info["seconds"],
               "training": info["training"], "quality": {k: v for k, v in quality.items() if k != "checkpoints"},
               "checkpoints": {r: {f"{d}/{f}": v["acc"] for d, formats in q["heldout"].items()
                                   for f, v in formats.items()} for r, q in quality["checkpoints"].items()},
               "overrides": rest}
    atomic_write_json(Path(args.out), summary)
    logging.getLogger(__name__).info("summary written to %s", args.out)
    return 0 if all(quality["bars"].values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
