"""What the representation methods share: checkpoint transfer, circuit breakers and RMU.

- Which parameters train (:mod:`unlearning.training.trainable`): LoRA adapters (peft; rank 16,
  alpha 16, dropout 0.05 on every Linear module of the decoder layers by default) or full
  fine-tuning of chosen parameters. The original model is the adapters switched off (no copy);
  under full fine-tuning it is the saved originals of just the parameters that train
  (:class:`unlearning.model.originals.OriginalWeights`).
- Target layers: ``[5, 10, 15, 20, 25, 30]`` by default, clipped to the model's depth; an index
  given explicitly that lies outside the model is an error naming the depth.
- The retain loss on retain batches, by kind: ``l2`` (per-token L2 distance between current and
  original hidden states at the target layers), ``mse`` (squared error, mean over the hidden
  dimension: the lab trainer's "MSE on hidden states"), ``kl`` (KL(original || current) on the
  logits, mean over non-padding tokens; the notebook's ``--retain_kl_loss``) or ``nll``.
- Coefficient schedules (:func:`coefficients`) and the per-step metrics: ``retain_<kind>_loss``,
  the forget loss, ``retain_acc`` / ``forget_acc`` (share of valid tokens whose arg-max next
  token equals the reference model's), the current coefficients; and a summary of one step
  (``summary_step``, the notebook's step 32) kept as ``method.train_summary``. Every method logs
  ``forget_loss`` / ``retain_loss`` (raw) and ``forget_coef`` / ``retain_coef``, as the sequential
  method does; circuit breakers and checkpoint transfer also log the forget loss as ``cb_loss``,
  the notebook's name.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from unlearning.training import hidden_losses, losses
from unlearning.core.config import param
from unlearning.core.errors import ConfigError
from unlearning.model.layers import capture_hidden, forward_until, parse_layer_spec
from unlearning.masking.masks import MaskConfig, apply_mask
from unlearning.methods.context import BuildContext
from unlearning.methods.shared import DEFAULT_LAYERS, Coefficients, steps_from_epochs
from unlearning.training.contract import LossTerms, Method, Phase, StepContext
from unlearning.training.trainable import LoraSettings
from unlearning.model.originals import OriginalWeights, original_model
from unlearning.training.schedules import circuit_breaker_coefs, forget_coef_at, retain_coef_at

log = logging.getLogger(__name__)

DEFAULT_TARGET_LAYERS = DEFAULT_LAYERS
RetainKind = Literal["l2", "mse", "kl", "nll"]
Schedule = Literal["notebook", "circuit_breaker", "constant"]


# ----------------------------------------------------------------------------------------------
# Configs


@dataclass
class TrainingShape:
    """Settings every representation method has: what trains, how long, what is measured."""
    finetune: Literal["lora", "full"] = param("lora", help="lora: train adapters (original = adapters off); "
                                              "full: train the parameters themselves (original = saved copies "
                                              "of just those parameters)")
    lora: LoraSettings = field(default_factory=LoraSettings)
    steps: int | None = param(None, min=1, help="optimizer steps; null = `epochs` passes over "
                                                "num_train_examples forget examples")
    epochs: float = param(1.0, min=0, help="passes over the forget examples when steps is null")
    metrics_every: int = param(1, min=1, help="compute retain_acc / forget_acc every N optimizer steps "
                                              "(also at summary_step and the last step)")
    summary_step: int | None = param(32, min=1, help="keep this step's training metrics as the run's "
                                                     "train_summary (the notebook reports step 32); the last "
                                                     "step when the run is shorter; null = the last step")
    mask: MaskConfig = field(default_factory=MaskConfig)  # which forget tokens the forget loss counts


@dataclass
class RepresentationConfig(TrainingShape):
    """Checkpoint transfer and circuit breakers: losses at target layers, a retain loss, a schedule."""
    full_layers: list[int] | None = param(None, help="finetune: full: decoder layers whose parameters train "
                                                     "(null = every decoder layer)")
    full_modules: list[str] = param([], help="finetune: full: train only parameters whose name relative to "
                                             "the layer contains one of these (empty = all of the layer's)")
    target_layers: list[int] | str | None = param(
        None, help="layers whose block outputs the losses compare; null = [5, 10, 15, 20, 25, 30] clipped to "
                   "the model's depth; also 'all' or a range '30->5:5'")
    retain_coef: float = param(5.0, min=0, help="retain loss coefficient (its maximum under a schedule)")
    remove_coef: float = param(5.0, min=0, help="forget loss coefficient (its maximum under a schedule)")
    retain_loss: RetainKind | None = param(None, help="l2: L2 distance of hidden states at the target layers; "
                                                      "mse: squared error there (mean over hidden dim); kl: "
                                                      "KL(original || current) on logits; nll: next-token loss; "
                                                      "null = the method's default")
    retain_kl_loss: bool = param(False, help="the notebook's --retain_kl_loss: same as retain_loss: kl")
    schedule: Schedule = param("constant", help="notebook: retain ramps 0 -> retain_coef and forget remove_coef "
                                                "-> forget_end_fraction * remove_coef over ramp_steps; "
                                                "circuit_breaker: retain_coef*t/(2T), remove_coef*(1 - t/(2T)); "
                                                "constant: both fixed")
    ramp_steps: int | None = param(None, min=1, help="schedule: notebook: steps of the ramp (null = the run)")
    forget_end_fraction: float = param(0.75, min=0, help="schedule: notebook: forget coefficient at the "
                                                         "ramp's end, as a share of remove_coef")

    def full_scope(self) -> dict[str, Any]:
        """prepare_trainable's ``layers`` / ``modules`` (only full fine-tuning reads full_*)."""
        if self.finetune != "full":
            return {}
        return {"layers": self.full_layers, "modules": self.full_modules}

    default_retain_loss: ClassVar[str] = "l2"

    def __post_init__(self) -> None:
        if self.retain_kl_loss:
            if self.retain_loss not in (None, "kl"):
                raise ConfigError(f"retain_kl_loss: true conflicts with retain_loss: {self.retain_loss}; "
                                  f"set only one of them (retain_kl_loss: false to use {self.retain_loss})")
            self.retain_loss = "kl"
        elif self.retain_loss is None:
            self.retain_loss = self.default_retain_loss


# ----------------------------------------------------------------------------------------------
# Set-up: target layers, token mask, steps, coefficients


def resolve_target_layers(spec: list[int] | str | None, depth: int, field: str = "target_layers") -> list[int]:
    """The default layers are clipped to the depth; layers given explicitly must exist."""
    if spec is None:
        return sorted(parse_layer_spec(DEFAULT_TARGET_LAYERS, depth, field=field, clip_to_depth=True))
    return sorted(parse_layer_spec(spec, depth, field=field))


def apply_forget_mask(shape: TrainingShape, model: nn.Module, ctx: BuildContext,
                      field: str) -> dict[str, float] | None:
    """Compute the token mask on the forget rows (before adapters are added: a property of the
    original model); batches then carry it as ``loss_mask``. Returns the mask's quality or None."""
    if shape.mask.kind == "none":
        return None
    return apply_mask(shape.mask, ctx.data, tokenizer=ctx.tokenizer, model=model, device=ctx.device,
                      model_name=ctx.model_name, field=field)


def training_steps(shape: TrainingShape, n_examples: int, batch_size: int, grad_accum: int) -> int:
    """``steps``, or ``epochs`` passes over the forget examples (rounded up as the sequential
    method rounds, at least one step)."""
    if shape.steps is not None:
        return shape.steps
    return steps_from_epochs(shape.epochs, n_examples, batch_size, grad_accum)


def coefficients(schedule: Schedule, step: int, total: int, retain_coef: float, remove_coef: float, *,
                 ramp_steps: int | None = None, forget_end_fraction: float = 0.75) -> Coefficients:
    """The (forget, retain) coefficients at optimizer step ``step`` (from 0) of ``total``.

    - ``notebook`` (the lab's checkpoint-transfer trainer): over R = ``ramp_steps`` (default
      ``total``), retain grows linearly from 0 to ``retain_coef`` and forget falls from
      ``remove_coef`` to ``forget_end_fraction * remove_coef`` (0.75), then both hold.
    - ``circuit_breaker`` (Zou et al.): ``retain_coef * t / (2T)`` and ``remove_coef * (1 - t / (2T))``.
    - ``constant``: ``retain_coef`` and ``remove_coef``.
    """
    if schedule == "notebook":
        span = ramp_steps or total
        return Coefficients(forget=forget_coef_at(step, span, remove_coef, end_fraction=forget_end_fraction),
                            retain=retain_coef_at(step, span, retain_coef, start_fraction=0.0))
    if schedule == "circuit_breaker":
        retain, forget = circuit_breaker_coefs(step, total, retain_coef, remove_coef)
        return Coefficients(forget=forget, retain=retain)
    if schedule == "constant":
        return Coefficients(forget=remove_coef, retain=retain_coef)
    raise ConfigError(f"schedule: {schedule!r} is not known; choose notebook, circuit_breaker or constant")


# ----------------------------------------------------------------------------------------------
# Forward passes


def forward_hidden(model: nn.Module, batch: dict[str, Tensor], layers: Sequence[int], *,
                   logits: bool) -> tuple[dict[int, Tensor], Tensor | None]:
    """Block outputs at ``layers`` and, with ``logits``, the output logits.

    Without ``logits`` the forward pass stops after the deepest of ``layers``.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if not logits:
        return forward_until(model, ids, mask, layers), None
    if not layers:
        return {}, model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    with capture_hidden(model, layers) as hidden:
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    return dict(hidden), out.logits


def valid_mask(batch: dict[str, Tensor]) -> Tensor:
    return batch["attention_mask"].bool()


# ----------------------------------------------------------------------------------------------
# The shared method


class RepresentationMethod(Method):
    """One phase of ``total`` steps; subclasses give the forget loss and the reference for forget_acc.

    Subclasses implement :meth:`forget_losses` returning ``(raw forget loss, extra forget terms
    (already scaled), logs)``.
    """

    name = "representation"
    forget_key = "cb"  # LossTerms key; logged raw as f"{forget_key}_loss"

    def __init__(self, *, trainable: list[str], originals: OriginalWeights | None, total_steps: int,
                 retain_kind: RetainKind, retain_layers: Sequence[int], retain_coef: float,
                 remove_coef: float, schedule: Schedule = "constant", ramp_steps: int | None = None,
                 forget_end_fraction: float = 0.75, metrics_every: int = 1, summary_step: int | None = None):
        self.trainable = list(trainable)
        self.originals = originals
        self.total_steps = total_steps
        self.retain_kind = retain_kind
        self.retain_layers = list(retain_layers)
        self.retain_coef, self.remove_coef = retain_coef, remove_coef
        self.schedule, self.ramp_steps, self.forget_end_fraction = schedule, ramp_steps, forget_end_fraction
        self.metrics_every = metrics_every
        self.summary_step = min(summary_step or total_steps, total_steps)
        self._summary: dict[str, Any] | None = None

    # -- the loop's hooks

    def phases(self) -> list[Phase]:
        return [Phase(index=0, steps=self.total_steps, name=self.name)]

    def begin_phase(self, model: nn.Module, phase: Phase) -> list[tuple[str, nn.Parameter]]:
        wanted = set(self.trainable)
        named = []
        for n, p in model.named_parameters():
            p.requires_grad_(n in wanted)
            if n in wanted:
                named.append((n, p))
        missing = wanted - {n for n, _ in named}
        if missing:
            raise RuntimeError(f"trainable parameters not found in the model: {sorted(missing)[:3]}")
        return named

    def on_step(self, record: dict[str, Any]) -> None:
        """Keep the summary step's record (the runner writes it to results as ``train_summary``)."""
        if record.get("step") == self.summary_step:
            self._summary = {k: v for k, v in record.items() if v is not None}

    @property
    def train_summary(self) -> dict[str, Any] | None:
        return self._summary

    def state_dict(self) -> dict[str, Any]:
        return {"summary": self._summary}  # a summary step before a checkpoint survives a resume

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._summary = state.get("summary", self._summary)

    def coefficients(self, step: int) -> Coefficients:
        return coefficients(self.schedule, step, self.total_steps, self.retain_coef, self.remove_coef,
                            ramp_steps=self.ramp_steps, forget_end_fraction=self.forget_end_fraction)

    def metrics_due(self, ctx: StepContext) -> bool:
        step = ctx.global_step + 1  # the number the loop logs for this step
        return step % self.metrics_every == 0 or step in (self.summary_step, self.total_steps)

    def losses(self, model: nn.Module, batches: dict[str, dict[str, Tensor]], ctx: StepContext) -> LossTerms:
        return LossTerms.merge(self.loss_stages(model, batches, ctx))

    def loss_stages(self, model: nn.Module, batches: dict[str, dict[str, Tensor]],
                    ctx: StepContext) -> Iterator[LossTerms]:
        """Two stages, forget then retain: the forget pass's activations are freed (by its
        backward) before the retain passes run."""
        forget_c, retain_c = self.coefficients(ctx.global_step)
        due = self.metrics_due(ctx)
        forget_batch = batches["forget"]
        forget_loss, extra, logs = self.forget_losses(model, forget_batch, self.forget_mask(forget_batch), due)
        logs.update({f"{self.forget_key}_loss": forget_loss.detach(), "forget_loss": forget_loss.detach(),
                     "forget_coef": forget_c, "retain_coef": retain_c})
        yield LossTerms(forget={self.forget_key: forget_c * forget_loss, **extra}, logs=logs)
        retain_loss, retain_logs = self.retain_losses(model, batches["retain"], due)
        yield LossTerms(retain={f"retain_{self.retain_kind}": retain_c * retain_loss},
                        logs={**retain_logs, "retain_loss": retain_loss.detach()})

    def forget_losses(self, model: nn.Module, batch: dict[str, Tensor], mask: Tensor,
                      want_acc: bool) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        raise NotImplementedError

    # -- shared pieces

    def forget_mask(self, batch: dict[str, Tensor]) -> Tensor:
        """Positions the forget loss counts: non-padding tokens, restricted to the token mask if one is set."""
        mask = valid_mask(batch)
        if "loss_mask" in batch:
            mask = mask & batch["loss_mask"].bool()
        return mask

    @contextlib.contextmanager
    def as_original(self, model: nn.Module) -> Iterator[None]:
        """The original model, without gradients: adapters off or saved originals swapped in."""
        with torch.no_grad(), original_model(model, self.originals):
            yield

    def retain_losses(self, model: nn.Module, batch: dict[str, Tensor],
                      want_acc: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """The retain loss of this method's kind, and its logs (``retain_<kind>_loss``, ``retain_acc``)."""
        kind, mask = self.retain_kind, valid_mask(batch)
        layers = self.retain_layers if kind in ("l2", "mse") else []
        need_logits = want_acc or kind in ("kl", "nll")
        original_h, original_logits = {}, None
        if kind != "nll" or want_acc:
            with self.as_original(model):
                original_h, original_logits = forward_hidden(model, batch, layers, logits=need_logits)
        hidden, logits = forward_hidden(model, batch, layers, logits=need_logits)
        if kind == "l2":
            loss = hidden_losses.hidden_l2(hidden, original_h, mask)
        elif kind == "mse":
            loss = hidden_losses.mse_to_teacher(hidden, original_h, mask)
        elif kind == "kl":
            loss = losses.kl_retain(logits, original_logits, mask)
        else:
            loss = losses.nll(logits, batch["input_ids"], mask)
        logs = {f"retain_{kind}_loss": loss.detach()}
        if want_acc:
            logs["retain_acc"] = losses.argmax_agreement(logits, original_logits, mask)
        return loss, logs
