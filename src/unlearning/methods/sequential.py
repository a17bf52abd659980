"""Sequential back-to-front unlearning (``method: sequential``), the project's main method.

For each target layer L, from last to first, one phase of training:

- forget: the current model up to layer L's output, then the original model's layers after L,
  final norm and unembedding (the fixed "probe"); a forget loss on those logits pushes what
  layer L passes on toward "unreadable" by the rest of the original network;
- retain: the current model on retain batches against the original model;
- trainable: LoRA adapters (peft; the original is the adapters switched off, never a copy), or
  full fine-tuning of layer L alone (every other parameter is out of the optimizer; the original
  weights are kept only for layers that change, snapshotted before their phase).

Steps per phase, step and coefficient scales by depth, coefficient ramps per phase, masks and
every loss option are keys of :class:`Config`; the optimizer, gradient filters, L2-SP, clipping and
precision come from the run's ``train:`` section through the shared loop
(:mod:`unlearning.training.loop`). The losses themselves are in :mod:`.sequential_losses`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn

from unlearning.core.config import param
from unlearning.core.errors import ConfigError
from unlearning.model.layers import get_parts, parse_layer_spec
from unlearning.masking.masks import MaskConfig, apply_mask
from unlearning.methods.context import BuildContext
from unlearning.methods.shared import DEFAULT_LAYERS, Coefficients, steps_from_epochs
from unlearning.training.contract import LossTerms, Method, Phase, StepContext
from unlearning.methods.sequential_losses import (RETAIN_KINDS, ForgetKind, forget_loss, logits_of, probe_logits,
                                                  reference_logprobs, retain_losses)
from unlearning.training.trainable import LoraSettings, add_lora
from unlearning.model.originals import OriginalWeights
from unlearning.core.runtime import world_size
from unlearning.training.schedules import forget_coef_at, layer_forget_coef, layer_steps, retain_coef_at

log = logging.getLogger(__name__)

DEFAULT_RETAIN_LAYERS = DEFAULT_LAYERS


@dataclass
class Config:
    """The ``sequential:`` section of a run config."""
    layers: str | list[int] = param(
        "auto", help="target layers in training order: 'start->stop:step' (e.g. '31->11:4'), a list, 'all', "
                     "or auto = depth-1 down to round(0.35*depth) in steps of max(1, depth//8)")
    steps_per_layer: int | None = param(None, min=1, help="optimizer steps per layer phase; null = "
                                                          "epochs_per_layer passes over the forget examples")
    epochs_per_layer: float = param(1.0, min=0, help="passes over num_train_examples per phase "
                                                     "(when steps_per_layer is null)")
    deep_layer_step_scale: float = param(1.0, min=0, help="layer L trains base*(1+(s-1)(L_first-L)/L_first) "
                                                          "steps (L_first: the deepest target layer)")
    forget_layer_scale: float = param(1.0, min=0, help="scales the forget coefficient by depth the same way")
    remove_coef: float = param(5.0, min=0, help="forget loss coefficient (start of each phase's ramp)")
    retain_coef: float = param(2.0, min=0, help="retain loss coefficient (end of each phase's ramp)")
    forget_loss: ForgetKind = param("max_entropy_kl", help="max_entropy_kl | random_ce (random targets) | "
                                    "top_k_entropy | npo (per sequence) | npo_per_token")
    top_k: int = param(100, min=2, help="top_k_entropy: K")
    npo_beta: float = param(0.1, min=0, help="NPO beta (the notebook's dpo_beta)")
    npo_full_model: bool = param(False, help="NPO through the full current model instead of the probe")
    maintain_unlearned: bool = param(False, help="also apply the forget loss through the probes of the layers "
                                                 "already unlearned (mean over the probes)")
    retain_losses: dict[str, float] = param({"l2": 1.0}, help="retain loss kinds and their weights (each term "
                                            "is retain_coef * weight * loss): l2 (hidden states), kl "
                                            "(KL(original || current) on logits), nll")
    retain_layers: str | list[int] = param(DEFAULT_RETAIN_LAYERS, help="l2 retain layers: a list (the default "
                                           "[5,10,15,20,25,30] is clipped to depth), 'all', or 'target' "
                                           "(the current target layer)")
    retain_ramp_start: float = param(0.25, min=0, help="retain coefficient starts each phase at this share of "
                                                       "retain_coef (0: the notebook's 'ramp retain from zero')")
    forget_ramp_end: float = param(0.75, min=0, help="forget coefficient ends each phase at this share of "
                                                     "remove_coef")
    finetune: Literal["lora", "full"] = param("lora", help="lora: adapters (original = adapters off); full: "
                                              "layer L alone trains in its phase (originals of changed layers "
                                              "are stored)")
    lora: LoraSettings = field(default_factory=LoraSettings)
    lora_train_layers: Literal["all", "target", "up_to_target"] = param(
        "all", help="whose adapters train in a phase: all (the notebook), the target layer only, or the "
                    "target layer and those before it")
    mask: MaskConfig = field(default_factory=MaskConfig)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.retain_losses) - set(RETAIN_KINDS))
        if unknown:
            raise ConfigError(f"sequential.retain_losses: {unknown[0]!r} is not a retain loss; use "
                              f"{', '.join(RETAIN_KINDS)} (e.g. {{l2: 1.0, kl: 0.5}})")
        for k, w in self.retain_losses.items():
            if not isinstance(w, (int, float)) or w < 0:
                raise ConfigError(f"sequential.retain_losses.{k}: weight {w!r} must be a number >= 0")
        if isinstance(self.retain_layers, str) and self.retain_layers not in ("all", "target"):
            raise ConfigError(f"sequential.retain_layers: {self.retain_layers!r}; use a list of layers, "
                              f"'all' or 'target'")
        if self.npo_full_model and self.forget_loss not in ("npo", "npo_per_token"):
            raise ConfigError("sequential.npo_full_model: needs forget_loss npo or npo_per_token")


def auto_layers(depth: int) -> list[int]:
    """depth-1 down to round(0.35*depth) in steps of max(1, depth//8): 31->11:4 on 32 layers, 3->1 on 4."""
    stop, step = round(0.35 * depth), max(1, depth // 8)
    return list(range(depth - 1, stop - 1, -step))


def target_layers(spec: str | list[int], depth: int) -> list[int]:
    if isinstance(spec, str) and spec == "auto":
        return auto_layers(depth)
    return parse_layer_spec(spec, depth, field="sequential.layers")


def retain_layers_for(spec: str | list[int], depth: int, target: int) -> list[int]:
    if spec == "target":
        return [target]
    if spec == "all":
        return list(range(depth))
    clip = list(spec) == DEFAULT_RETAIN_LAYERS
    return sorted(parse_layer_spec(spec, depth, field="sequential.retain_layers", clip_to_depth=clip))


def base_steps(cfg: Config, n_forget: int, batch_size: int, grad_accum: int) -> int:
    if cfg.steps_per_layer is not None:
        return cfg.steps_per_layer
    return steps_from_epochs(cfg.epochs_per_layer, n_forget, batch_size, grad_accum)


def _layer_of_params(model: nn.Module) -> dict[int, int]:
    """id(parameter) -> index of the decoder layer holding it."""
    return {id(p): i for i, layer in enumerate(get_parts(model).layers) for p in layer.parameters()}


class Sequential(Method):
    """One phase per target layer; see the module docstring."""

    name = "sequential"

    def __init__(self, cfg: Config, layers: list[int], steps: list[int], depth: int, *,
                 originals: OriginalWeights | None, seed: int = 0):
        self.cfg, self.layers, self.steps, self.depth = cfg, layers, steps, depth
        self.first_layer = max(layers)
        self.originals = originals  # None under LoRA: the original is the adapters switched off
        self.seed = seed
        self.generator = torch.Generator()
        self.unlearned: list[int] = []  # layers whose phase has finished
        self.retain_layers = {L: retain_layers_for(cfg.retain_layers, depth, L) for L in layers}

    # -- the loop's hooks

    def phases(self) -> list[Phase]:
        return [Phase(index=i, steps=s, layer=L, name=f"layer {L}")
                for i, (L, s) in enumerate(zip(self.layers, self.steps))]

    def begin_phase(self, model: nn.Module, phase: Phase) -> list[tuple[str, nn.Parameter]]:
        # Each phase draws its randomness (LoRA dropout, random targets) from its own seed, so a
        # resumed run repeats exactly what an uninterrupted one does.
        torch.manual_seed(self.seed * 1_000_003 + phase.index)
        self.generator.manual_seed(self.seed * 1_000_003 + phase.index)
        self.unlearned = [L for L in self.layers[: phase.index]]
        L, owner = phase.layer, _layer_of_params(model)
        if self.cfg.finetune == "full":
            self.originals.snapshot(L)  # before the layer first moves
            named = [(n, p) for n, p in model.named_parameters() if owner.get(id(p)) == L]
        else:
            wanted = set({"all": range(self.depth), "target": [L],
                          "up_to_target": range(L + 1)}[self.cfg.lora_train_layers])
            named = [(n, p) for n, p in model.named_parameters() if "lora_" in n and owner.get(id(p)) in wanted]
        chosen = {id(p) for _, p in named}
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
        return named

    def restore(self, model: nn.Module, finished: list[Phase]) -> None:
        """On resume, before the saved weights are loaded: the live weights are still the originals."""
        if self.originals is not None:
            for phase in finished:
                self.originals.snapshot(phase.layer)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}  # random targets, mid-phase

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])

    def frozen_prefix(self, layer: int) -> int:
        """How many blocks from the bottom are still the original ones with nothing in them
        training, in the phase of ``layer``: the retain loss's current and original passes share
        them. Layers train last to first, so under full fine-tuning (and LoRA on the target layer
        only) that is every block below the target; LoRA adapters below it that train (``all``,
        ``up_to_target``) leave nothing to share."""
        if self.cfg.finetune == "full" or self.cfg.lora_train_layers == "target":
            return layer
        return 0

    # -- coefficients

    def coefficients(self, ctx: StepContext) -> Coefficients:
        """The forget and retain coefficients at this step of the phase."""
        L, total = ctx.phase.layer, ctx.phase.steps
        remove = layer_forget_coef(self.cfg.remove_coef, L, self.first_layer, self.cfg.forget_layer_scale)
        return Coefficients(forget=forget_coef_at(ctx.step, total, remove, self.cfg.forget_ramp_end),
                            retain=retain_coef_at(ctx.step, total, self.cfg.retain_coef,
                                                  self.cfg.retain_ramp_start))

    # -- losses

    def losses(self, model: nn.Module, batches: dict[str, dict[str, torch.Tensor]], ctx: StepContext) -> LossTerms:
        return LossTerms.merge(self.loss_stages(model, batches, ctx))

    def loss_stages(self, model: nn.Module, batches: dict[str, dict[str, torch.Tensor]],
                    ctx: StepContext) -> Iterator[LossTerms]:
        """Two stages: the forget terms, then the retain terms. The loop backpropagates the
        forget pass (and frees its activations) before the retain passes run."""
        forget_c, retain_c = self.coefficients(ctx)
        yield self._forget_terms(model, batches["forget"], ctx.phase.layer, forget_c, retain_c)
        if self.cfg.retain_losses:
            yield self._retain_terms(model, batches["retain"], ctx.phase.layer, retain_c)

    def _forget_terms(self, model: nn.Module, forget_batch: dict[str, torch.Tensor], L: int,
                      forget_c: float, retain_c: float) -> LossTerms:
        cfg = self.cfg
        logs: dict[str, torch.Tensor | float] = {"forget_coef": forget_c, "retain_coef": retain_c}
        ref = None
        if cfg.forget_loss in ("npo", "npo_per_token"):
            ref = reference_logprobs(model, forget_batch, self.originals)
        kwargs = dict(ref_logprobs=ref, top_k=cfg.top_k, beta=cfg.npo_beta, generator=self.generator)
        if cfg.npo_full_model:
            f_loss = forget_loss(cfg.forget_loss, logits_of(model, forget_batch), forget_batch, **kwargs)
        else:
            probes = [L] + (self.unlearned if cfg.maintain_unlearned else [])
            per_probe = {p: forget_loss(cfg.forget_loss, probe_logits(model, forget_batch, p, self.originals),
                                        forget_batch, **kwargs) for p in probes}
            f_loss = torch.stack(list(per_probe.values())).mean()
            if len(per_probe) > 1:
                logs.update({f"forget_loss_L{p}": v.detach() for p, v in per_probe.items()})
        logs["forget_loss"] = f_loss.detach()
        return LossTerms(forget={"forget": forget_c * f_loss}, logs=logs)

    def _retain_terms(self, model: nn.Module, retain_batch: dict[str, torch.Tensor], L: int,
                      retain_c: float) -> LossTerms:
        cfg = self.cfg
        terms = LossTerms()  # logged numbers stay tensors: the loop syncs once per step
        raw = retain_losses(model, retain_batch, cfg.retain_losses, self.retain_layers[L], self.originals,
                            frozen_prefix=self.frozen_prefix(L))
        retain_total = 0.0
        for kind, value in raw.items():
            weight = cfg.retain_losses[kind]
            terms.retain[f"retain_{kind}"] = retain_c * weight * value
            terms.logs[f"retain_{kind}_loss"] = value.detach()
            retain_total = retain_total + weight * value.detach()
        terms.logs["retain_loss"] = retain_total
        return terms


def build(model: nn.Module, ctx: BuildContext, cfg: Config) -> tuple[nn.Module, Sequential]:
    """Resolve layers and steps, compute the forget mask, add LoRA or prepare full fine-tuning."""
    data, train = ctx.data, ctx.train
    depth = len(get_parts(model).layers)
    layers = target_layers(cfg.layers, depth)
    if cfg.mask.kind != "none":
        apply_mask(cfg.mask, data, tokenizer=ctx.tokenizer, model=model, device=ctx.device,
                   model_name=ctx.model_name, field="sequential.mask")
    base = base_steps(cfg, len(data["forget"]), train.batch_size, train.grad_accum)
    first = max(layers)
    steps = [layer_steps(base, L, first, cfg.deep_layer_step_scale) for L in layers]
    if cfg.finetune == "lora":
        model, originals = add_lora(model, cfg.lora), None
    else:
        originals = OriginalWeights(model)
        for p in model.parameters():
            p.requires_grad_(False)
        if train.parallel == "fsdp":  # sharding keeps them as modules, while the layers are still whole
            for L in layers:
                originals.snapshot(L)
    per_step = train.batch_size * train.grad_accum * world_size()
    log.info("sequential: %d unique forget and %d unique retain examples; %d examples per step",
             len(data["forget"]), len(data["retain"]), per_step)
    log.info("sequential: layers %s, steps per phase %s, %d steps in total (%s)", layers, steps, sum(steps),
             "LoRA" if cfg.finetune == "lora" else "full fine-tuning of the target layer")
    return model, Sequential(cfg, layers, steps, depth, originals=originals, seed=ctx.seed)


def validate(cfg: Config, depth: int) -> None:
    """Check the target and retain layers against a model of ``depth`` layers before it loads (the
    preflight reads the depth from config.json or the organism preset, and checks the shared
    lora / mask layers itself)."""
    for layer in target_layers(cfg.layers, depth):
        retain_layers_for(cfg.retain_layers, depth, layer)
