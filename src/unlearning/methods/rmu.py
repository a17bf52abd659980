"""RMU (Representation Misdirection for Unlearning; Li et al., 2024, the WMDP paper): the baseline row.

At one layer l, forget activations are pushed toward a fixed random direction u (uniform [0, 1)
entries, normalised) scaled by ``steering_coef``; retain activations are held to the original
model's. Loss per step (no schedule)::

    mean_tokens(mean_hidden((h_l(forget) - steering_coef * u)^2))
      + alpha * mean_tokens(mean_hidden((h_l(retain) - h_l^orig(retain))^2))

Only the MLPs of layers l-2..l train by default (the paper's code updates one MLP matrix per
layer; ``modules`` picks which), by full fine-tuning with saved copies of just those parameters
as the original, or with LoRA on those modules. The forward passes stop after layer l, except
on metric steps (``retain_acc`` / ``forget_acc``: arg-max agreement with the original model).

``steering_relative: true`` scales the direction to ``steering_coef`` times the mean norm of the
original model's layer-l activations on forget text, so one value suits models whose activation
scales differ (the paper's absolute values: 6.5 for Zephyr-7B, 300 for Yi-34B).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from unlearning.training import hidden_losses, losses
from unlearning.core.config import param
from unlearning.model.layers import forward_until, get_parts, parse_layer_spec
from unlearning.methods.representation import (RepresentationMethod, TrainingShape, forward_hidden,
                                               apply_forget_mask, training_steps)
from unlearning.methods.context import BuildContext
from unlearning.training.trainable import prepare_trainable

log = logging.getLogger(__name__)


@dataclass
class Config(TrainingShape):
    layer: int | None = param(None, min=0, help="the steered layer l; null = 7 (the paper's), or depth - 1 for "
                                                "models with fewer than 8 layers")
    update_layers: list[int] | None = param(None, help="layers that train; null = l-2, l-1, l (those >= 0)")
    modules: list[str] = param(["mlp"], help="parameters (full) or Linear modules (LoRA) of the update layers "
                                             "that train: those whose layer-relative name contains one of these")
    steering_coef: float = param(20.0, min=0, help="length of the random target direction (absolute, or "
                                                   "relative to the mean activation norm)")
    steering_relative: bool = param(False, help="scale the direction by the original model's mean layer-l "
                                                "activation norm on forget text")
    alpha: float = param(100.0, min=0, help="retain loss coefficient (the paper: 100 by default, 1200 for Zephyr)")
    finetune: Literal["full", "lora"] = param("full", help="full: the chosen parameters themselves; "
                                                                 "lora: adapters on the chosen modules")
    summary_step: int | None = param(None, min=1, help="keep this step's training metrics as train_summary "
                                                       "(null = the last step)")
    metrics_every: int = param(10, min=1, help="compute retain_acc / forget_acc every N steps (they need full "
                                               "forward passes; the losses stop after layer l)")


class RMU(RepresentationMethod):
    name = "rmu"
    forget_key = "forget"

    def __init__(self, layer: int, control: Tensor, **kw: Any):
        super().__init__(**kw)
        self.layer = layer
        self.control = control

    def forget_losses(self, model: nn.Module, batch: dict[str, Tensor], mask: Tensor,
                      want_acc: bool) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        hidden, logits = forward_hidden(model, batch, [self.layer], logits=want_acc)
        loss = hidden_losses.rmu_forget(hidden[self.layer], self.control, mask)
        logs = {}
        if want_acc:
            with self.as_original(model):
                _, original_logits = forward_hidden(model, batch, [], logits=True)
            logs["forget_acc"] = losses.argmax_agreement(logits, original_logits, mask)
        return loss, {}, logs


def default_layer(depth: int) -> int:
    return 7 if depth > 7 else depth - 1


@torch.no_grad()
def mean_activation_norm(model: nn.Module, data: Any, layer: int, rows: int, device: torch.device) -> float:
    """Mean per-token norm of the model's layer output on the first ``rows`` forget examples
    (called before training, so the model is still the original)."""
    batch = data.rows(torch.arange(min(rows, len(data))))
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    h = forward_until(model, ids, mask, [layer])[layer]
    return float(h.float().norm(dim=-1)[mask.bool()].mean())


def build(model: nn.Module, ctx: BuildContext, cfg: Config) -> tuple[nn.Module, RMU]:
    data, device = ctx.data, ctx.device
    depth = len(get_parts(model).layers)
    layer = parse_layer_spec([cfg.layer if cfg.layer is not None else default_layer(depth)], depth,
                             field="rmu.layer")[0]
    update = cfg.update_layers if cfg.update_layers is not None else [i for i in (layer - 2, layer - 1, layer)
                                                                       if i >= 0]
    update = parse_layer_spec(update, depth, field="rmu.update_layers")
    hidden_size = get_parts(model).model.config.hidden_size
    g = torch.Generator().manual_seed(ctx.seed)
    control = hidden_losses.rmu_control_vector(hidden_size, 1.0, generator=g)
    scale = cfg.steering_coef
    if cfg.steering_relative:
        norm = mean_activation_norm(model, data["forget"], layer, 16, device)
        scale = cfg.steering_coef * norm
        log.info("rmu: mean layer-%d activation norm %.3g; steering length %.3g", layer, norm, scale)
    control = (control * scale).to(device)
    apply_forget_mask(cfg, model, ctx, field="rmu.mask")
    model, trainable, originals = prepare_trainable(model, cfg.finetune, cfg.lora, layers=update,
                                                    modules=cfg.modules, field="rmu.update_layers")
    total = training_steps(cfg, len(data["forget"]), ctx.train.batch_size, ctx.train.grad_accum)
    method = RMU(layer, control, trainable=trainable, originals=originals, total_steps=total,
                 retain_kind="mse", retain_layers=[layer], retain_coef=cfg.alpha, remove_coef=1.0,
                 schedule="constant", metrics_every=cfg.metrics_every, summary_step=cfg.summary_step)
    log.info("rmu: layer %d, training %s of layers %s (%s), %d steps, steering %.3g, alpha %g",
             layer, cfg.modules, update, cfg.finetune, total, scale, cfg.alpha)
    return model, method


def validate(cfg: Config, depth: int) -> None:
    """Check the steered layer and the update layers against a model of ``depth`` layers before it
    loads (the default update layers, l-2..l clipped at 0, are valid whenever l is)."""
    parse_layer_spec([cfg.layer if cfg.layer is not None else default_layer(depth)], depth, field="rmu.layer")
    if cfg.update_layers is not None:
        parse_layer_spec(cfg.update_layers, depth, field="rmu.update_layers")
