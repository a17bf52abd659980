"""UNDO (Lee et al. 2025, "Distillation Robustifies Unlearning", arXiv 2506.06278): unlearn, then
distil the unlearned model into a partially noised copy of itself.

- Teacher: the model the run loads (typically an unlearned run directory, ``model: runs/<name>``).
- Student: the same weights, noised. Each chosen parameter becomes
  ``(1 - alpha) * theta + alpha * noise_scale * theta_init``, where ``theta_init`` is a fresh
  initialisation of the same architecture (the model's own ``_init_weights``, through
  ``from_config``, seeded with ``noise_seed``): alpha 0 keeps the weights, alpha 1 (with
  noise_scale 1) is a freshly initialised network. ``layers`` / ``embeddings`` choose the parts
  noised (e.g. only the layers an unlearning method changed); ``train`` says whether only those,
  or every part, then train.
- Distillation: forward KL(teacher || student) of the temperature-softened next-token
  distributions (:func:`unlearning.training.losses.kl_distill`) on the run's ``retain`` stream,
  i.e. ``data.retain`` (+ ``data.extra_retain``): the organism's retain + chat corpora in the
  shipped configs, ``organism:pretrain`` for every pretraining document, or any named corpus,
  hub dataset or local file on a real model. No teacher copy is held: the teacher is the
  student's parameters with the stored originals swapped in (:mod:`unlearning.model.originals`).
- Compute: the run's ``train_summary`` records the positions the student processed (padding
  included: the forward pass runs over it), counted from the batches themselves, ``6 N tokens``
  for the student's training and ``2 N tokens`` for the teacher's forward passes, and both as a
  fraction of the organism's pretraining compute (``6 N tokens_seen`` from its build.json, for the
  unfiltered model and the filtered twin; or ``pretrain_tokens`` for another model).
- Length: ``steps``, or ``pretrain_fraction`` of the organism's pretraining tokens at the run's
  batch size x seq_len (0.6 = "60% of the pretraining steps" when the two match, as in
  ``configs/undo_tiny.yaml``).

Resume: ``build`` runs again on resume and noises the loaded teacher identically (the noise is a
function of ``noise_seed`` only); the loop then loads the checkpoint's trained tensors over it.
The token count and the noise seed go through ``state_dict``, and a resume whose noise seed
differs from the checkpoint's is refused.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from unlearning.core.config import param
from unlearning.core.errors import ConfigError
from unlearning.core.runtime import world_size
from unlearning.methods.context import BuildContext
from unlearning.methods.sequential_losses import logits_of
from unlearning.model.layers import get_parts, parse_layer_spec
from unlearning.model.originals import OriginalWeights, original_model
from unlearning.organism import organism_paths, organism_preset
from unlearning.training import losses
from unlearning.training.contract import LossTerms, Method, Phase, StepContext

log = logging.getLogger(__name__)

PartKey = int | str
NAMED_PARTS = ("embed", "final_norm", "lm_head")


@dataclass
class Config:
    """The ``undo:`` section of a run config."""
    alpha: float = param(0.8, min=0, max=1, help="noise: each chosen weight becomes (1-alpha)*theta + "
                                                 "alpha*noise_scale*theta_init (0: unchanged, 1: fresh init)")
    noise_scale: float = param(1.0, min=0, help="the paper's beta: scales the fresh initialisation before "
                                                "the interpolation (1: exactly the model's own init)")
    noise_seed: int | None = param(None, help="seed of the fresh initialisation (null: train.seed)")
    layers: str | list[int] = param("all", help="decoder layers noised: 'all', a list, or a range '3->1'")
    embeddings: bool = param(True, help="also noise the embedding, final norm and unembedding")
    train: Literal["noised", "all"] = param("noised", help="noised: only the noised parts train (the "
                                            "others stay the teacher's); all: every parameter trains")
    steps: int | None = param(None, min=1, help="distillation steps; null: pretrain_fraction")
    pretrain_fraction: float | None = param(0.6, min=0, help="when steps is null: this share of the "
                                            "organism's pretraining tokens (or pretrain_tokens), at the run's "
                                            "batch_size x grad_accum x seq_len per step")
    temperature: float = param(1.0, min=1e-3, help="softmax temperature of teacher and student (loss x T^2)")
    pretrain_tokens: int | None = param(None, min=1, help="pretraining tokens of a non-organism model, for "
                                        "the compute fraction and pretrain_fraction (organisms: build.json)")

    def __post_init__(self) -> None:
        if self.steps is None and self.pretrain_fraction is None:
            raise ConfigError("undo.steps: set steps, or pretrain_fraction (a share of the pretraining tokens)")
        if isinstance(self.layers, str) and self.layers != "all" and "->" not in self.layers:
            raise ConfigError(f"undo.layers: {self.layers!r}; use 'all', a list of layers or a range '3->1'")


# ----------------------------------------------------------------------------------------------
# Parts, noise and compute


def noised_layers(cfg: Config, depth: int) -> list[int]:
    if cfg.layers == "all":
        return list(range(depth))
    return sorted(parse_layer_spec(cfg.layers, depth, field="undo.layers"))


def part_names(model: nn.Module) -> dict[str, PartKey]:
    """Parameter name -> the part holding it (a decoder layer index, or embed / final_norm / lm_head).

    A tied unembedding is the embedding's parameter: it appears once, under ``embed``."""
    parts = get_parts(model)
    owner: dict[int, PartKey] = {}
    for key in NAMED_PARTS:
        for p in parts.part(key).parameters():
            owner.setdefault(id(p), key)
    for i, layer in enumerate(parts.layers):
        for p in layer.parameters():
            owner[id(p)] = i
    return {n: owner[id(p)] for n, p in model.named_parameters() if id(p) in owner}


def fresh_init(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A freshly initialised copy of ``model``'s architecture (its own ``_init_weights``), on the CPU in
    fp32, by parameter name; the global random state is left as it was."""
    from transformers import AutoModelForCausalLM  # lazy: transformers takes seconds to import

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    return {n: p.detach() for n, p in fresh.named_parameters()}


@torch.no_grad()
def noise_toward_init(model: nn.Module, names: list[str], alpha: float, seed: int,
                      noise_scale: float = 1.0) -> None:
    """In place: each parameter in ``names`` becomes ``(1-alpha) theta + alpha noise_scale theta_init``."""
    init = fresh_init(model, seed)
    params = dict(model.named_parameters())
    for n in names:
        p = params[n]
        p.mul_(1 - alpha).add_(init[n].to(p.device, p.dtype), alpha=alpha * noise_scale)


def count_params(model: nn.Module) -> int:
    """N of the 6 N D rule: every parameter, a tied one counted once (as pretraining counts it)."""
    return sum(p.numel() for p in model.parameters())


def pretraining_tokens(model_name: str) -> dict[str, int] | None:
    """Tokens the organism behind ``model_name`` was pretrained on: ``{"unfiltered", "filtered"}``
    from its build.json; None for a model that is not an organism."""
    preset = organism_preset(model_name)
    if preset is None:
        return None
    training = organism_paths(preset).build_info().get("training", {})
    out = {k: int(v["tokens_seen"]) for k, v in training.items() if isinstance(v, dict) and "tokens_seen" in v}
    return out or None


def compute_record(n_params: int, tokens: int, pretrain: dict[str, int] | None) -> dict[str, Any]:
    """UNDO's compute by the 6 N D rule (2 N D for the teacher's forward passes), and as fractions
    of the pretraining compute ``6 N tokens_seen`` of each twin the build records."""
    student, teacher = 6 * n_params * tokens, 2 * n_params * tokens
    out: dict[str, Any] = {"params": n_params, "distill_tokens": tokens, "student_flops": student,
                           "teacher_flops": teacher, "flops": student + teacher}
    for twin, seen in (pretrain or {}).items():
        pre = 6 * n_params * seen
        suffix = "" if twin == "unfiltered" else f"_{twin}"
        out[f"pretrain_flops{suffix}"] = pre
        out[f"compute_fraction{suffix}"] = student / pre  # the brief's measure: 6 N D over 6 N D
        out[f"compute_fraction_with_teacher{suffix}"] = (student + teacher) / pre
    return out


# ----------------------------------------------------------------------------------------------
# The method


class Undo(Method):
    """One phase: distil the teacher (the stored originals) into the noised student."""

    name = "undo"

    def __init__(self, cfg: Config, trainable: list[str], originals: OriginalWeights, steps: int, *,
                 noise_seed: int, n_params: int, pretrain: dict[str, int] | None):
        self.cfg, self.trainable, self.originals, self.steps = cfg, trainable, originals, steps
        self.noise_seed, self.n_params, self.pretrain = noise_seed, n_params, pretrain
        self.tokens = 0  # positions the student processed, from the batches (all ranks)

    def phases(self) -> list[Phase]:
        return [Phase(index=0, steps=self.steps, name="distil")]

    def begin_phase(self, model: nn.Module, phase: Phase) -> list[tuple[str, nn.Parameter]]:
        wanted = set(self.trainable)
        named = [(n, p) for n, p in model.named_parameters() if n in wanted]
        for n, p in model.named_parameters():
            p.requires_grad_(n in wanted)
        return named

    def losses(self, model: nn.Module, batches: dict[str, dict[str, torch.Tensor]], ctx: StepContext) -> LossTerms:
        batch = batches["retain"]
        mask = batch["attention_mask"].bool()
        with torch.no_grad(), original_model(model, self.originals):
            teacher = logits_of(model, batch)
        student = logits_of(model, batch)
        kl = losses.kl_distill(student, teacher, mask, self.cfg.temperature)
        self.tokens += batch["input_ids"].numel() * world_size()
        logs = {"distill_kl_loss": kl.detach(), "retain_loss": kl.detach(), "forget_coef": 0.0, "retain_coef": 1.0}
        return LossTerms(retain={"distill_kl": kl}, logs=logs)

    def end_phase(self, model: nn.Module, phase: Phase) -> None:
        c = self.compute
        log.info("undo: distilled %d tokens: %.3g FLOPs (6ND), %s of the pretraining compute", c["distill_tokens"],
                 c["student_flops"], f"{c['compute_fraction']:.1%}" if "compute_fraction" in c else "unknown")

    def state_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "noise_seed": self.noise_seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "noise_seed" in state and state["noise_seed"] != self.noise_seed:
            raise ConfigError(f"undo.noise_seed: the checkpoint was noised with seed {state['noise_seed']}, this "
                              f"run with {self.noise_seed}; resume with the same seed or start afresh (--overwrite)")
        self.tokens = int(state.get("tokens", self.tokens))

    @property
    def compute(self) -> dict[str, Any]:
        return compute_record(self.n_params, self.tokens, self.pretrain)

    @property
    def train_summary(self) -> dict[str, Any] | None:
        return {"undo": {"alpha": self.cfg.alpha, "noise_seed": self.noise_seed, "steps": self.steps,
                         **self.compute}}


def distil_steps(cfg: Config, pretrain: dict[str, int] | None, tokens_per_step: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    total = cfg.pretrain_tokens or (pretrain or {}).get("unfiltered")
    if total is None:
        raise ConfigError("undo.pretrain_fraction: the model is not an organism, so its pretraining tokens are "
                          "unknown; set undo.pretrain_tokens, or undo.steps")
    return max(1, math.ceil(cfg.pretrain_fraction * total / tokens_per_step))


def build(model: nn.Module, ctx: BuildContext, cfg: Config) -> tuple[nn.Module, Undo]:
    """Store the teacher's weights of the parts that will change, noise the chosen parts."""
    depth = len(get_parts(model).layers)
    layers = set(noised_layers(cfg, depth))
    owner = part_names(model)
    outside = [n for n in dict(model.named_parameters()) if n not in owner]
    if outside:  # the teacher is computed by swapping parts; a parameter outside them would stay the student's
        raise ConfigError(f"undo: parameters outside the embedding, decoder layers, final norm and unembedding "
                          f"({outside[0]}, ...) are not supported")
    chosen = lambda key: key in layers if isinstance(key, int) else cfg.embeddings  # noqa: E731
    noised = [n for n, key in owner.items() if chosen(key)]
    if not noised:
        raise ConfigError("undo.layers: no parameter is noised; name at least one layer or set embeddings: true")
    trainable = noised if cfg.train == "noised" else list(owner)
    originals = OriginalWeights(model)
    for key in dict.fromkeys(owner[n] for n in trainable):
        originals.snapshot(key)  # the teacher, before anything moves
    if "embed" in originals.keys() and get_parts(model).lm_head.weight is get_parts(model).embed.weight:
        originals.snapshot("lm_head")  # tied: the teacher's unembedding is its embedding
    seed = ctx.seed if cfg.noise_seed is None else cfg.noise_seed
    noise_toward_init(model, noised, cfg.alpha, seed, cfg.noise_scale)
    pretrain = pretraining_tokens(ctx.model_name)
    seq_len = ctx.data["retain"].input_ids.shape[1]
    per_step = ctx.train.batch_size * ctx.train.grad_accum * world_size() * seq_len
    steps = distil_steps(cfg, pretrain, per_step)
    if cfg.pretrain_tokens is not None:
        pretrain = {"unfiltered": cfg.pretrain_tokens}
    log.info("undo: alpha %.2f toward a fresh init (seed %d) on %d parameter tensors (layers %s%s); %d steps of "
             "%d tokens; %s trains", cfg.alpha, seed, len(noised), sorted(layers),
             " + embeddings" if cfg.embeddings else "", steps, per_step, cfg.train)
    return model, Undo(cfg, trainable, originals, steps, noise_seed=seed, n_params=count_params(model),
                       pretrain=pretrain)


def validate(cfg: Config, depth: int) -> None:
    """The noised layers against the model's depth (preflight, before the weights load)."""
    noised_layers(cfg, depth)
