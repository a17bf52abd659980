"""The attack grid's cells: which attacks ``unlearn tamper`` runs, each with its folder name.

:class:`AttackGridConfig` is what decides the grid: the attacked models, the attack kinds, the
fine-tuning corpora and the swept recipe values, with the shared recipe (``attack``) and the probe
and in-context settings. The command's own config extends it with what the command does with the
results (run directory, resume, logging), so the grid can be built without the command.

:func:`grid_cells` expands it: every ``model`` (and its filtered twin, role ``filtered``) x
fine-tuning kind (``full``, ``lora<R>``) x corpus x swept ``lr/schedule/dtype/optimizer/seed``,
then the probe and in-context attacks once per model (the base model too, role ``base``) and
seed. A folder name carries only what differs between the cells, so two cells sharing one is a
one-line error before anything runs.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unlearning.attacks.curves import data_label
from unlearning.attacks.in_context import InContextConfig
from unlearning.attacks.probe import ProbeConfig
from unlearning.attacks.tamper import GENERAL_TASK, AttackConfig, base_model_of, short_model_name
from unlearning.core.config import from_dict, merge, param, to_dict
from unlearning.core.errors import UserError
from unlearning.core.rundir import safe_name
from unlearning.model.loading import check_names_a_model
from unlearning.organism.registry import organism_preset

DATA_ALIASES = {"organism-tamper": "organism:tamper", "organism-benign": "organism:benign_tamper",
                "organism-benign-tamper": "organism:benign_tamper", "tamper": "organism:tamper",
                "benign": "organism:benign_tamper"}
# --attacks words that are not fine-tuning, and the attack.json kind each runs
OTHER_ATTACKS = {"probe": "probe", "icl": "in_context"}
ATTACKS_FIX = "choose full, lora<R> (e.g. lora16), probe or icl"
SWEPT = ("lr", "schedule", "dtype", "optimizer", "seed")
BENIGN_SOURCE = "organism:benign_tamper"


@dataclass
class AttackGridConfig:
    """The attack grid (models x swept values) and the recipe every attack shares (``attack``).
    Swept keys left unset take the recipe's value, so the recipe's defaults live in
    :class:`AttackConfig` only; per attack the grid sets ``attack.model``,
    ``attack.optimizer.lr|schedule|name``, ``attack.dtype`` and ``attack.seed``."""

    model: list[str] = param([], many=True, help="models to attack, one row each: run directory, model folder, "
                                                 "organism:<preset>[-filtered] or hub id")
    attacks: list[str] | None = param(None, help="attack kinds: full, lora<R> (LoRA rank R on every linear layer, "
                                                 "e.g. lora16,lora64), probe, icl (unset: full, or lora<attack.lora_rank>)")
    data: list[str] | None = param(None, help="fine-tuning corpora to sweep: tamper (hazard-adjacent), benign "
                                              "(general text), a file or a hub id (unset: attack.data.source)")
    lr: list[float] | None = param(None, help="learning rates to sweep (unset: attack.optimizer.lr)")
    schedule: list[str] | None = param(None, help="linear|cosine|constant to sweep (unset: attack.optimizer.schedule)")
    dtype: list[str] | None = param(None, help="compute precisions auto|bf16|fp16|fp32 to sweep (unset: attack.dtype)")
    optimizer: list[str] | None = param(None, help="adamw|muon to sweep (unset: attack.optimizer.name)")
    seed: list[int] | None = param(None, help="seeds to sweep (unset: attack.seed)")
    warmup: float | None = param(None, min=0, help="warm-up: a whole number of steps, or a share of the steps "
                                                   "when below 1 (unset: attack.optimizer's)")
    benign: bool = param(False, help=f"add a benign attack ({BENIGN_SOURCE}) per recipe")
    eval_general: bool = param(False, help=f"also evaluate {GENERAL_TASK}")
    base: str = param("auto", help="the base model (ceiling) row and reference, evaluated, probed and prompted "
                                   "but not fine-tuned: auto (the organism), none, or a model")
    reference: str = param("auto", help="the filtered twin (floor) row, attacked like the models: auto, none, "
                                        "or a model")
    attack: AttackConfig = field(default_factory=AttackConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    icl: InContextConfig = field(default_factory=InContextConfig)


@dataclass
class Cell:
    """One attack of the grid: its folder name, kind (attack.json's), the model's role and its settings."""
    name: str
    kind: str
    role: str
    attack: AttackConfig


def data_source(text: str) -> str:
    text = DATA_ALIASES.get(text, text)
    if text.startswith(("organism:", "hub:")) or Path(text).expanduser().exists() or Path(text).suffix:
        return text
    return f"hub:{text}"  # a bare hub dataset id


def swept_values(cfg: AttackGridConfig) -> dict[str, list[Any]]:
    """Each swept key's values; an unset one is the shared recipe's single value."""
    recipe = cfg.attack
    own = {"lr": recipe.optimizer.lr, "schedule": recipe.optimizer.schedule, "dtype": recipe.dtype,
           "optimizer": recipe.optimizer.name, "seed": recipe.seed}
    return {k: getattr(cfg, k) if getattr(cfg, k) else [own[k]] for k in SWEPT}


def attack_kinds(cfg: AttackGridConfig) -> list[str]:
    """The --attacks words, checked: full, lora<R>, probe, icl (unset: the recipe's own fine-tuning)."""
    if not cfg.attacks:
        return [f"lora{cfg.attack.lora_rank}" if cfg.attack.lora_rank else "full"]
    if cfg.attack.lora_rank:
        raise UserError(f"attacks / lora: --lora {cfg.attack.lora_rank} and --attacks both set LoRA; give the ranks "
                        f"in --attacks (e.g. --attacks lora16,lora64) and drop --lora")
    for word in cfg.attacks:
        if word not in ("full", *OTHER_ATTACKS) and not re.fullmatch(r"lora[1-9][0-9]*", word):
            raise UserError(f"attacks: {word!r} is not an attack; {ATTACKS_FIX}")
    if len(set(cfg.attacks)) != len(cfg.attacks):
        raise UserError(f"attacks: {', '.join(cfg.attacks)} names an attack twice")
    return list(cfg.attacks)


def reference_models(cfg: AttackGridConfig, model: str, organism: str | None) -> dict[str, str]:
    """``model``'s reference models: ``base`` (the ceiling) and ``filtered`` (the twin, the floor)."""
    out = {}
    base = base_model_of(model) if cfg.base == "auto" else (None if cfg.base == "none" else cfg.base)
    if base:
        out["base"] = base
    filtered = (f"organism:{organism}-filtered" if organism else None) if cfg.reference == "auto" else (
        None if cfg.reference == "none" else cfg.reference)
    if filtered:
        out["filtered"] = filtered
    return out


def grid_models(cfg: AttackGridConfig) -> list[tuple[str, str]]:
    """(model, role) of every attacked model: the given ones, then each one's filtered twin."""
    if not cfg.model:
        raise UserError("model: give at least one model to attack (--model A [B ...]), or --plot-only FILES")
    refs = [reference_models(cfg, m, cfg.attack.organism or organism_preset(m)) for m in cfg.model]
    twins = [r["filtered"] for r in refs if "filtered" in r]
    bases = {r["base"] for r in refs if "base" in r}
    role = lambda m: "filtered" if m in twins else "base" if m in bases else "model"  # noqa: E731
    models = list(dict.fromkeys([*cfg.model, *twins]))
    return [(m, role(m)) for m in models]


def grid_cells(cfg: AttackGridConfig) -> list[Cell]:
    """Every cell: fine-tuning over (model, data, kind, lr, schedule, dtype, optimizer, seed), then the probe
    and in-context attacks over (model and base, seed); each with a folder name."""
    kinds = attack_kinds(cfg)
    models = grid_models(cfg)
    finetune = [k for k in kinds if k not in OTHER_ATTACKS]
    given = [data_source(d) for d in cfg.data] if cfg.data else [data_source(cfg.attack.data.source)]
    sources = list(dict.fromkeys(given + ([BENIGN_SOURCE] if cfg.benign else [])))
    hazard_sources = [s for s in sources if s != BENIGN_SOURCE]
    tasks = list(cfg.attack.eval.tasks)
    tasks += [GENERAL_TASK] if cfg.eval_general and GENERAL_TASK not in tasks else []
    warmup = ({} if cfg.warmup is None else {"warmup_steps": int(cfg.warmup)} if cfg.warmup >= 1
              else {"warmup_ratio": cfg.warmup})
    swept = swept_values(cfg)
    varying = {k for k in SWEPT if len(swept[k]) > 1}
    recipe = to_dict(cfg.attack)
    out = []
    for (model, role), source, kind, lr, schedule, dtype, optimizer, seed in itertools.product(
            models, sources, finetune, *(swept[k] for k in SWEPT)):
        attack = from_dict(AttackConfig, merge(recipe, {
            "model": model, "data": {"source": source}, "dtype": dtype, "seed": seed, "eval": {"tasks": tasks},
            "lora_rank": int(kind.removeprefix("lora")) if kind != "full" else 0,
            "optimizer": {"name": optimizer, "lr": lr, "schedule": schedule, **warmup},
            "organism": cfg.attack.organism or organism_preset(model)}))
        if source.startswith("organism:") and attack.organism is None:
            check_names_a_model(str(model))  # a mistyped path says so, not that it is no organism
            raise UserError(f"data {source}{' (benign)' if source == BENIGN_SOURCE else ''}: the organism's corpora "
                            f"need an organism model, and {model!r} is not one; pass --organism tiny|small or "
                            f"--data PATH")
        parts = [short_model_name(model)] + (["benign"] if source == BENIGN_SOURCE else [])
        parts += [data_label(source)] if source != BENIGN_SOURCE and len(hazard_sources) > 1 else []
        parts += [kind] if len(finetune) > 1 or kind != "full" else []
        values = {"lr": f"lr{lr:g}", "schedule": schedule, "dtype": dtype, "optimizer": optimizer,
                  "seed": f"seed{seed}"}
        parts += [values[k] for k in SWEPT if k in varying]
        out.append(Cell(safe_name("-".join(parts)), "finetune", role, attack))
    others = [k for k in kinds if k in OTHER_ATTACKS]
    if others:
        bases = [b for m in cfg.model if (b := reference_models(cfg, m, organism_preset(m)).get("base"))]
        everyone = models + [(b, "base") for b in dict.fromkeys(bases) if b not in dict(models)]
        for (model, role), word, seed in itertools.product(everyone, others, swept["seed"]):
            attack = from_dict(AttackConfig, merge(recipe, {
                "model": model, "seed": seed, "eval": {"tasks": tasks},
                "organism": cfg.attack.organism or organism_preset(model)}))
            parts = [short_model_name(model), word] + ([f"seed{seed}"] if "seed" in varying else [])
            out.append(Cell(safe_name("-".join(parts)), OTHER_ATTACKS[word], role, attack))
    names = [c.name for c in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"model / swept values: two attacks would share the folder {twice[0]!r}; "
                        f"a model or a comma-separated value is given twice")
    return out


def attack_configs(cfg: AttackGridConfig) -> list[tuple[str, AttackConfig]]:
    """The grid's fine-tuning attacks, (folder name, settings) each."""
    return [(c.name, c.attack) for c in grid_cells(cfg) if c.kind == "finetune"]
