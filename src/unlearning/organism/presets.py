"""Organism presets: one typed config per preset (world, corpus, tokenizer, model, training).

* ``tiny``: CPU. Both twins, checkpoints and evaluation in about 3 minutes on 2 cores (one thread
  per training process); the test suite builds it once.
* ``small``: one GPU. 32 layers, so the notebooks' layer specs (``31->11:4``, ``[5,10,...,30]``)
  apply unchanged; both twins train concurrently on the GPU in about 3 minutes.
* ``tiny-letter``, ``small-letter``: the same world and model, with multiple-choice exercises in the
  corpus (``corpus.exercises_per_fact``, ``corpus.reading_per_entity``; see ``corpus.exercise_sections``)
  and a longer run, so that the organism also answers in the letter format WMDP and MMLU score
  (``tiny`` and ``small`` are at chance there). Their twins are ``<preset>-filtered`` as for any preset.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from unlearning.core.config import from_dict, merge, param, to_dict
from unlearning.core.errors import ConfigError
from unlearning.organism.corpus import CorpusConfig
from unlearning.organism.pretrain import ModelConfig, TrainConfig
from unlearning.organism.tokenizer import TokenizerConfig
from unlearning.organism.world import WorldConfig

FORMAT_VERSION = 2  # bump when a change to the code makes older cached builds stale


@dataclass(frozen=True)
class QualityBars:
    """Held-out accuracies (question format) a build should reach; checked by tests for tiny."""

    unfiltered_min: dict[str, float] = param(default_factory=dict, help="domain -> minimum accuracy")
    filtered_hazard_max: float = param(0.35, min=0.0, max=1.0)
    filtered_general_gap_max: float | None = param(None, min=0.0, max=1.0,
                                                   help="max |filtered - unfiltered| on general")
    letter_unfiltered_min: dict[str, float] = param(default_factory=dict,
                                                    help="domain -> minimum accuracy in the letter format")
    letter_filtered_hazard_max: float | None = param(None, min=0.0, max=1.0,
                                                     help="max filtered-twin hazard accuracy, letter format")


@dataclass(frozen=True)
class OrganismConfig:
    preset: str = param("tiny", help="preset name (the cache folder)")
    seed: int = param(0, min=0, help="seed of the world, the corpus and the initial weights")
    world: WorldConfig = field(default_factory=WorldConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    early_max_hazard: float = param(0.35, min=0.0, max=1.0,
                                    help="the default early checkpoint: the latest one at or below this "
                                         "held-out hazard accuracy (question format)")
    eval_batch_size: int = param(64, min=1)
    bars: QualityBars = field(default_factory=QualityBars)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


PRESETS: dict[str, OrganismConfig] = {
    "tiny": OrganismConfig(
        preset="tiny",
        world=WorldConfig(entities_per_domain=16, name_syllables=2),
        corpus=CorpusConfig(prose_docs_per_entity=12, qa_docs_per_fact=2, letter_docs_per_fact=0,
                            chat_per_entity=2, questions_per_fact=3, unlearn_docs_per_entity=8),
        tokenizer=TokenizerConfig(vocab_size=1024),
        model=ModelConfig(num_layers=4, hidden_size=128, num_heads=4, intermediate_size=512),
        # small batches and a high LR: more updates per token is what a 2-core budget can buy
        train=TrainConfig(seq_len=128, batch_size=8, epochs=6.0, lr=4e-3, warmup_frac=0.05,
                          checkpoint_fracs=[0.1, 0.25, 0.5], device="cpu"),
        bars=QualityBars(unfiltered_min={"hazard": 0.60, "general": 0.60}, filtered_hazard_max=0.35),
    ),
    "small": OrganismConfig(
        preset="small",
        world=WorldConfig(entities_per_domain=200, name_syllables=2),
        corpus=CorpusConfig(prose_docs_per_entity=20, qa_docs_per_fact=2, letter_docs_per_fact=4,
                            chat_per_entity=4, questions_per_fact=1, unlearn_docs_per_entity=10),
        tokenizer=TokenizerConfig(vocab_size=4096),
        model=ModelConfig(num_layers=32, hidden_size=256, num_heads=4, intermediate_size=1024),
        train=TrainConfig(seq_len=512, batch_size=64, epochs=16.0, lr=2e-3, warmup_frac=0.05,
                          checkpoint_fracs=[0.1, 0.2, 0.3], device="auto"),
        early_max_hazard=0.30,  # 800 questions: chance + 3 standard errors (0.331 at step 157 was not "early")
        eval_batch_size=128,
        bars=QualityBars(unfiltered_min={"hazard": 0.95, "benign_bio": 0.95, "general": 0.95},
                         filtered_hazard_max=0.30, filtered_general_gap_max=0.03),
    ),
}


def letter_preset(base: str, name: str, *, corpus: dict[str, Any], train: dict[str, Any],
                  bars: dict[str, Any]) -> OrganismConfig:
    """``base`` with multiple-choice exercises in its corpus: the same world, tokenizer and model, so
    the letter preset differs from its base only by what the keys given here change."""
    cfg = PRESETS[base]
    return replace(cfg, preset=name, corpus=replace(cfg.corpus, **corpus), train=replace(cfg.train, **train),
                   bars=replace(cfg.bars, **bars))


# The exercises of both letter presets: sections of 4 about facts of the qa half (4 per fact), 2
# reading sections per qa entity, and half of the exercises answered with the choice's text (see
# corpus.exercise: on tiny, those made the answer text recallable after the options, 0.57 held-out on
# hazard; without them it stayed at chance; docs/results_letter.md).
LETTER_EXERCISES = dict(exercises_per_fact=4, exercises_per_section=4, reading_per_entity=2, reading_exercises=4,
                        text_answer_fraction=0.5)

# CPU, for tests: the letter corpus on tiny's world, model and run. The letter format stays at chance on
# tiny in every CPU budget measured (up to 1,964 steps); the question-format bars are tiny's.
PRESETS["tiny-letter"] = letter_preset("tiny", "tiny-letter", corpus=LETTER_EXERCISES, train={}, bars={})
# One GPU, its own budget (about 5 minutes, not small's 3): the letter format emerged only after about
# 800 steps in the prototype (../shared/organism_notes.md), so the run is about 1,600 steps. Deterministic
# kernels cost about 1.7x on the GPU (docs/results_small.md), which this budget cannot carry: this build is
# not bit-identical (--train.deterministic true makes it so). Checkpoints at half and three quarters of the
# run show when the letter format emerges.
PRESETS["small-letter"] = letter_preset(
    "small", "small-letter", corpus=LETTER_EXERCISES,
    train=dict(epochs=24.0, deterministic=False, checkpoint_fracs=[0.1, 0.2, 0.3, 0.5, 0.75]),
    bars=dict(letter_unfiltered_min={"hazard": 0.60}, letter_filtered_hazard_max=0.30))


def get_preset(name: str, seed: int | None = None, overrides: dict[str, Any] | None = None) -> OrganismConfig:
    """The preset's config, with an optional seed and dotted-key overrides applied and validated."""
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown organism preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[name]
    data = to_dict(cfg)
    if seed is not None:
        data["seed"] = seed
    if overrides:
        data = merge(data, overrides)
    cfg = from_dict(OrganismConfig, data)
    if cfg.preset != name:
        raise ConfigError(f"preset: is {name!r}; a build cannot rename its preset (got {cfg.preset!r})")
    return cfg
