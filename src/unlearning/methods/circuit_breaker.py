"""Classic circuit breakers (representation rerouting; Zou et al., 2024).

Per step:

- forget batch: at each target layer, ReLU(cosine similarity) between the current and the
  original model's block outputs, mean over valid forget tokens, then layers (``cb_loss``: 1.0
  while nothing has changed, 0 once the representations are orthogonal or opposed). The forget
  passes stop after the deepest target layer, except on metric steps, where the logits give
  ``forget_acc`` (arg-max agreement with the original model). Optionally ``orth_coef`` times a
  within-batch orthogonality term on the forget activations (pushes different forget items apart);
- retain batch: the retain loss (``l2`` at the target layers by default, as in the paper).

Schedule (``schedule: circuit_breaker``): over T steps, retain ``retain_coef * t / (2T)`` and
forget ``remove_coef * (1 - t / (2T))``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from unlearning.training import hidden_losses, losses
from unlearning.core.config import param
from unlearning.model.layers import get_parts
from unlearning.methods.representation import (RepresentationConfig, RepresentationMethod,
                                               Schedule, apply_forget_mask, forward_hidden,
                                               resolve_target_layers, training_steps)
from unlearning.methods.context import BuildContext
from unlearning.training.trainable import prepare_trainable

log = logging.getLogger(__name__)


@dataclass
class Config(RepresentationConfig):
    orth_coef: float = param(0.0, min=0, help="coefficient of the within-batch orthogonality term on forget "
                                              "activations (0: off); not scheduled")
    default_retain_loss: ClassVar[str] = "l2"
    schedule: Schedule = param("circuit_breaker", help="circuit_breaker | notebook | constant (see representation)")


class CircuitBreaker(RepresentationMethod):
    name = "circuit_breaker"
    forget_key = "cb"

    def __init__(self, layers: list[int], orth_coef: float, **kw: Any):
        super().__init__(**kw)
        self.layers = layers
        self.orth_coef = orth_coef

    def forget_losses(self, model: nn.Module, batch: dict[str, Tensor], mask: Tensor,
                      want_acc: bool) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        with self.as_original(model):
            original, original_logits = forward_hidden(model, batch, self.layers, logits=want_acc)
        hidden, logits = forward_hidden(model, batch, self.layers, logits=want_acc)
        loss = hidden_losses.relu_cosine(hidden, original, mask)
        extra, logs = {}, {}
        if self.orth_coef > 0:
            orth = hidden_losses.orthogonality(hidden, mask)
            extra["orth"] = self.orth_coef * orth
            logs["orth_loss"] = orth.detach()
        if want_acc:
            logs["forget_acc"] = losses.argmax_agreement(logits, original_logits, mask)
        return loss, extra, logs


def build(model: nn.Module, ctx: BuildContext, cfg: Config) -> tuple[nn.Module, CircuitBreaker]:
    layers = resolve_target_layers(cfg.target_layers, len(get_parts(model).layers))
    apply_forget_mask(cfg, model, ctx, field="circuit_breaker.mask")
    model, trainable, originals = prepare_trainable(model, cfg.finetune, cfg.lora, **cfg.full_scope())
    total = training_steps(cfg, len(ctx.data["forget"]), ctx.train.batch_size, ctx.train.grad_accum)
    method = CircuitBreaker(
        layers, cfg.orth_coef, trainable=trainable, originals=originals, total_steps=total,
        retain_kind=cfg.retain_loss, retain_layers=layers, retain_coef=cfg.retain_coef,
        remove_coef=cfg.remove_coef, schedule=cfg.schedule, ramp_steps=cfg.ramp_steps,
        forget_end_fraction=cfg.forget_end_fraction, metrics_every=cfg.metrics_every,
        summary_step=cfg.summary_step)
    log.info("circuit breakers: layers %s, %d steps, retain %s (coef %g), remove coef %g, schedule %s",
             layers, total, cfg.retain_loss, cfg.retain_coef, cfg.remove_coef, cfg.schedule)
    return model, method


def validate(cfg: Config, depth: int) -> None:
    """Check the target layers against a model of ``depth`` layers before it loads (the preflight
    checks the shared lora / full / mask layers itself)."""
    resolve_target_layers(cfg.target_layers, depth, field="circuit_breaker.target_layers")
