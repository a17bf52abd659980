"""Checkpoint transfer: pull the model's hidden states on forget data toward an early checkpoint's.

The notebook calls these runs "circuit breaker" runs (``../shared/seeds/kl_retain_circuit_breaker_tuning.md``).
The teacher is a pretraining checkpoint from before the hazard domain was learned
(``EleutherAI/deep-ignorance-pretraining-stage-unfiltered`` at ``global_step38144`` for the real
model; on the organism, the build's early checkpoint ``organism:<preset>@early`` by default, or
the filtered twin ``organism:<preset>-filtered``).

Per step:

- forget batch: per target layer, the squared error between the trained model's block output
  and the teacher's (optionally mapped through a per-layer affine map teacher -> model, fitted by
  ``unlearn fit-affine``), mean over the hidden dimension, then valid tokens, then layers
  (``cb_loss``). The teacher runs in inference mode and only up to the deepest target layer
  (except on metric steps, where its logits give ``forget_acc``: arg-max agreement with the teacher);
- retain batch: the retain loss (``kl`` by default, as the notebook's ``--retain_kl_loss``).

Coefficients follow the lab trainer (``schedule: notebook``): over the run, retain ramps from 0 to
``retain_coef`` and forget falls from ``remove_coef`` to 0.75 x ``remove_coef``. The notebook's
learning rate had no warm-up and decayed linearly (transformers' default), weight decay 0.01:
the shipped configs set ``train.optimizer`` that way.

Under ``train.parallel: fsdp`` with several ranks the teacher is sharded as the model is
(``training/fsdp.shard_frozen``: built on meta, rank 0 reads its file), so it needs no more memory
per rank than the model; preflight checks it is the model's architecture and size, in safetensors.
Its forward is then a collective, which every rank runs alike (see :meth:`CheckpointTransfer.teacher_hidden`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from unlearning.training import hidden_losses, losses
from unlearning.core.config import param
from unlearning.core.errors import ConfigError
from unlearning.model.layers import get_parts, is_sharded, reshard
from unlearning.methods.context import BuildContext
from unlearning.model.affine import load_affine
from unlearning.core.runtime import resolve_dtype
from unlearning.training.fsdp import load_to_train, shard_frozen
from unlearning.training.contract import Phase
from unlearning.methods.representation import (RepresentationConfig, RepresentationMethod,
                                               Schedule, apply_forget_mask, forward_hidden,
                                               resolve_target_layers, training_steps)
from unlearning.training.trainable import prepare_trainable

log = logging.getLogger(__name__)


@dataclass
class Config(RepresentationConfig):
    checkpoint: str | None = param(None, help="the teacher: a hub id, local folder, run directory or organism "
                                              "model; for organism models also early (= null: the build's "
                                              "early checkpoint organism:<preset>@early) or filtered (the "
                                              "filtered twin organism:<preset>-filtered)")
    checkpoint_revision: str | None = param(None, help="the teacher's revision (hub: e.g. global_step38144; "
                                                       "organism: step<N> or early)")
    affine: str | None = param(None, help="a safetensors file from `unlearn fit-affine` mapping teacher hidden "
                                          "states to the model's at the target layers; null = no map")
    save_name_base: str | None = param(None, help="base of the save name <base>_<kind>_ret<X>_rm<Y> "
                                                  "(default: the model name)")
    # The notebook's trainer: KL retain loss and its coefficient ramp.
    default_retain_loss: ClassVar[str] = "kl"
    schedule: Schedule = param("notebook", help="notebook | circuit_breaker | constant (see representation)")


def resolve_teacher(model_name: str, checkpoint: str | None, revision: str | None) -> tuple[str, str | None]:
    """The teacher's name and revision. For organism models, ``null`` / ``early`` is the build's early
    checkpoint (``organism:<preset>@early``) and ``filtered`` the filtered twin; other models must
    name their teacher."""
    if checkpoint not in (None, "early", "filtered"):
        return checkpoint, revision
    if not model_name.startswith("organism:"):
        raise ConfigError("checkpoint_transfer.checkpoint: name the teacher for a non-organism model, e.g. "
                          "checkpoint: EleutherAI/deep-ignorance-pretraining-stage-unfiltered with "
                          "checkpoint_revision: global_step38144 (early / filtered are organism shorthands)")
    base = model_name.split("@", 1)[0].removesuffix("-filtered")
    if checkpoint == "filtered":
        return f"{base}-filtered", revision
    return base, revision or "early"


def save_name(base: str, kind: str, retain_coef: float, remove_coef: float) -> str:
    """The notebook's naming: ``EleutherAI/deep-ignorance-unfiltered_kl_ret5_rm5``.

    A hub id keeps its ``owner/`` folder; a local model path gives its last folder name (a run
    directory's model is saved as ``<run name>_...``); ``organism:small`` becomes ``organism-small``.
    """
    path = Path(base)
    if path.is_absolute() or base.startswith(".") or path.exists():
        base = (path.parent.name if path.name in ("model", "merged", "adapter") else path.name) or "model"
    base = base.replace(":", "-").replace("@", "-").strip("/")
    return f"{base}_{kind}_ret{retain_coef:g}_rm{remove_coef:g}"


class CheckpointTransfer(RepresentationMethod):
    name = "checkpoint_transfer"
    forget_key = "cb"

    def __init__(self, teacher: nn.Module, layers: list[int], affine: dict[int, Any] | None, **kw: Any):
        super().__init__(**kw)
        self.teacher = teacher
        self.layers = layers
        self.affine = affine or {}
        self._save_name: str | None = None

    @property
    def save_name(self) -> str | None:
        return self._save_name

    def teacher_hidden(self, batch: dict[str, Tensor], logits: bool) -> tuple[dict[int, Tensor], Tensor | None]:
        """The teacher's block outputs (mapped) and, with ``logits``, its logits. A sharded teacher's
        forward is a collective: every rank calls this once per forget micro-batch, with ``logits`` on
        the same (metric) steps, since ``metrics_due`` depends on the step alone."""
        sharded = is_sharded(self.teacher)
        # Sharded: no_grad, not inference mode, as a sharded model is scored (evaluation/scoring.inference):
        # FSDP2's unshard writes into tensors that must stay ordinary (version-counted) ones, which
        # inference tensors are not. One process and DDP keep inference mode, as before.
        with torch.no_grad() if sharded else torch.inference_mode():
            hidden, out = forward_hidden(self.teacher, batch, self.layers, logits=logits)
            hidden = {i: self.affine[i](h) if i in self.affine else h for i, h in hidden.items()}
            if sharded:  # the root keeps its parameters gathered after a forward, for a backward never run
                reshard(self.teacher)
        # Clones outside inference mode are ordinary tensors that autograd may use.
        return {i: h.clone() for i, h in hidden.items()}, (out.clone() if out is not None else None)

    def end_phase(self, model: nn.Module, phase: Phase) -> None:
        # Training is over: free the teacher's memory before evaluation. A sharded teacher holds only
        # its shards here and no collective of it is in flight (each forward ended resharded), so
        # dropping it on every rank needs no synchronisation.
        self.teacher = None

    def forget_losses(self, model: nn.Module, batch: dict[str, Tensor], mask: Tensor,
                      want_acc: bool) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        target, teacher_logits = self.teacher_hidden(batch, logits=want_acc)
        hidden, logits = forward_hidden(model, batch, self.layers, logits=want_acc)
        loss = hidden_losses.mse_to_teacher(hidden, target, mask)
        logs = {}
        if want_acc:
            logs["forget_acc"] = losses.argmax_agreement(logits, teacher_logits, mask)
        return loss, {}, logs


def load_teacher(cfg: Config, ctx: BuildContext, model: nn.Module) -> nn.Module:
    device = ctx.device
    name, revision = resolve_teacher(ctx.model_name, cfg.checkpoint, cfg.checkpoint_revision)
    dtype = resolve_dtype(ctx.model_dtype, device) if ctx.model_dtype != "auto" else "auto"
    log.info("teacher: %s%s", name, f" @ {revision}" if revision else "")
    # Under fsdp (several ranks) built on meta and sharded like the model; else loaded whole.
    teacher, _, weights = load_to_train(name, ctx.train.parallel, revision=revision, dtype=dtype, device=device)
    if weights is not None:
        shard_frozen(teacher, device, weights)
    else:
        teacher.eval().requires_grad_(False)
    t_depth, m_depth = len(get_parts(teacher).layers), len(get_parts(model).layers)
    if t_depth != m_depth:
        log.warning("the teacher has %d layers, the model %d: target layers index each model's own blocks",
                    t_depth, m_depth)
    return teacher


def build(model: nn.Module, ctx: BuildContext, cfg: Config) -> tuple[nn.Module, CheckpointTransfer]:
    depth = len(get_parts(model).layers)
    layers = resolve_target_layers(cfg.target_layers, depth)
    teacher = load_teacher(cfg, ctx, model)
    resolve_target_layers(layers, len(get_parts(teacher).layers), field="target_layers (in the teacher)")
    affine = None
    if cfg.affine:
        affine = load_affine(Path(cfg.affine), layers, device=ctx.device)
    else:
        t_hidden = getattr(get_parts(teacher).model.config, "hidden_size", None)
        m_hidden = getattr(get_parts(model).model.config, "hidden_size", None)
        if t_hidden != m_hidden:
            raise ConfigError(f"checkpoint_transfer.affine: the teacher's hidden size {t_hidden} differs from the "
                              f"model's {m_hidden}; fit a map with `unlearn fit-affine` and set affine: <file>")
    apply_forget_mask(cfg, model, ctx, field="checkpoint_transfer.mask")
    model, trainable, originals = prepare_trainable(model, cfg.finetune, cfg.lora, **cfg.full_scope())
    total = training_steps(cfg, len(ctx.data["forget"]), ctx.train.batch_size, ctx.train.grad_accum)
    method = CheckpointTransfer(
        teacher, layers, affine, trainable=trainable, originals=originals, total_steps=total,
        retain_kind=cfg.retain_loss, retain_layers=layers, retain_coef=cfg.retain_coef,
        remove_coef=cfg.remove_coef, schedule=cfg.schedule, ramp_steps=cfg.ramp_steps,
        forget_end_fraction=cfg.forget_end_fraction, metrics_every=cfg.metrics_every,
        summary_step=cfg.summary_step)
    method._save_name = save_name(cfg.save_name_base or ctx.model_name, cfg.retain_loss,
                                  cfg.retain_coef, cfg.remove_coef)
    log.info("checkpoint transfer: layers %s, %d steps, retain %s (coef %g), remove coef %g, schedule %s",
             layers, total, cfg.retain_loss, cfg.retain_coef, cfg.remove_coef, cfg.schedule)
    return model, method


def validate(cfg: Config, depth: int) -> None:
    """Check what can be checked before the model loads: the target layers against its ``depth``
    (the teacher's depth is checked once it loads) and that the affine map's file exists."""
    resolve_target_layers(cfg.target_layers, depth, field="checkpoint_transfer.target_layers")
    if cfg.affine and not Path(cfg.affine).expanduser().is_file():
        raise ConfigError(f"checkpoint_transfer.affine: {cfg.affine} does not exist; fit one with "
                          f"`unlearn fit-affine` or set affine: null")
