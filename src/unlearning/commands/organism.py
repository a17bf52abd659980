"""``unlearn organism build --preset tiny|small [--seed N] [--force]`` and ``unlearn organism info --preset P``.

build: the world, corpora, tokenizer, both twins and checkpoints into
$UNLEARNING_HOME/organism/<preset>/ (reused from the cache when complete). Keys of the preset's
config can be overridden: --train.epochs 20 --model.num_layers 8. info: the cache paths and the
quality of a built preset.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from typing import Any, Literal

from unlearning.core.cli import parse_command
from unlearning.core.config import param
from unlearning.core.errors import UserError
from unlearning.core.logs import setup_logging
from unlearning.organism.build import ensure_organism, organism_paths
from unlearning.reporting.tables import quality_table
from unlearning.organism.presets import PRESETS

OVERRIDE_HELP = "overrides of the preset's {} section (build only; see organism/presets.py)"


@dataclass
class OrganismCommandConfig:
    action: Literal["build", "info"] = param(positional=True, help="build (or reuse) the organism, or print "
                                                                    "the cache paths and quality of a built one")
    preset: str = param("tiny", choices=sorted(PRESETS))
    seed: int | None = param(None, min=0, help="world/corpus/init seed (default: the preset's)")
    force: bool = param(False, help="rebuild even if a complete build exists")
    # The preset's sections: values differ per preset, so they are overrides, checked by get_preset.
    world: dict[str, Any] = param(default_factory=dict, help=OVERRIDE_HELP.format("world"))
    corpus: dict[str, Any] = param(default_factory=dict, help=OVERRIDE_HELP.format("corpus"))
    tokenizer: dict[str, Any] = param(default_factory=dict, help=OVERRIDE_HELP.format("tokenizer"))
    model: dict[str, Any] = param(default_factory=dict, help=OVERRIDE_HELP.format("model"))
    train: dict[str, Any] = param(default_factory=dict, help=OVERRIDE_HELP.format("train"))
    bars: dict[str, Any] = param(default_factory=dict, help=OVERRIDE_HELP.format("bars"))
    early_max_hazard: float | None = param(None, min=0, max=1, help="the default early checkpoint's hazard "
                                                                   "accuracy limit (default: the preset's)")
    eval_batch_size: int | None = param(None, min=1, help="build evaluation batch size (default: the preset's)")

    def overrides(self) -> dict[str, Any]:
        """The preset keys given, as the nested mapping ``ensure_organism`` applies."""
        fixed = {"action", "preset", "seed", "force"}
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in fixed and getattr(self, f.name) not in (None, {})}


def main(argv: list[str]) -> int:
    parsed = parse_command(OrganismCommandConfig, argv, prog="unlearn organism", description=__doc__)
    if parsed is None:
        return 0
    cfg, _ = parsed
    setup_logging("INFO")
    if cfg.action == "build":
        paths = ensure_organism(cfg.preset, seed=cfg.seed, force=cfg.force, overrides=cfg.overrides())
    else:
        if cfg.overrides() or cfg.seed is not None or cfg.force:
            raise UserError("organism info: takes only --preset; seeds, --force and overrides are for build")
        paths = organism_paths(cfg.preset)
        if not paths.is_complete():
            raise UserError(f"organism {cfg.preset!r} is not built ({paths.build_json} is missing); "
                            f"run: unlearn organism build --preset {cfg.preset}")
    info = paths.build_info()
    print(f"organism {cfg.preset}: seed {info['seed']}, built in {info['seconds']['total']:.0f}s")
    print(f"  root        {paths.root}")
    print(f"  model       {paths.model}  (organism:{cfg.preset})")
    print(f"  filtered    {paths.filtered}  (organism:{cfg.preset}-filtered)")
    for rev in paths.revisions():
        early = "  default early" if rev == info["early_checkpoint"] else ""
        print(f"  checkpoint  {paths.checkpoint(rev)}  (organism:{cfg.preset}@{rev}){early}")
    print(f"  data        {paths.data}")
    quality = paths.quality()
    print(quality_table(quality))
    missed = [k for k, ok in quality["bars"].items() if not ok]
    print("quality bars: " + ("all met" if not missed else "MISSED " + ", ".join(missed)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
