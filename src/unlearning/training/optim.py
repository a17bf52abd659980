"""Optimizers (AdamW, or Muon + AdamW), the optimizer config, and gradient filters.

Learning-rate schedules, coefficient ramps and per-layer step scales are in
:mod:`unlearning.training.schedules` (re-exported here); L2-SP is :func:`unlearning.training.losses.l2sp`.

Muon rule (:func:`split_muon_params`): a trainable parameter goes to Muon when it is a 2-D
matrix whose name contains none of ``OptimizerConfig.adam_name_patterns`` (by default
``embed``, ``wte``, ``wpe``, ``lm_head``: the token / position embeddings and the output head,
e.g. GPT-NeoX ``embed_in`` / ``lm_head`` (``embed_out`` before transformers 5), Llama
``embed_tokens`` / ``lm_head``, GPT-2 ``wte`` / ``wpe``). The rule goes by name, so a custom
model whose embedding is called something else needs its name added. Everything else (embeddings, head, biases, norm weights, any 1-D or 3-D+
tensor) goes to AdamW. LoRA ``lora_A`` / ``lora_B`` matrices are 2-D hidden matrices: Muon.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from unlearning.core.config import param
from unlearning.core.errors import UserError
from unlearning.training.schedules import (  # re-exported: one import for the training loop
    build_lr_scheduler, circuit_breaker_coefs, depth_scale, forget_coef_at, layer_forget_coef,
    layer_steps, linear_ramp, lr_factor, retain_coef_at,
)

__all__ = [
    "OptimizerConfig", "MuonAdamW", "split_muon_params", "build_optimizer", "build_scheduler",
    "take_grads", "set_grads", "same_sign_filter", "asymmetric_filter",
    # from unlearning.training.schedules
    "build_lr_scheduler", "lr_factor", "linear_ramp", "retain_coef_at", "forget_coef_at",
    "circuit_breaker_coefs", "depth_scale", "layer_steps", "layer_forget_coef",
]

logger = logging.getLogger(__name__)

DEFAULT_ADAM_NAME_PATTERNS = ["embed", "wte", "wpe", "lm_head"]


@dataclass
class OptimizerConfig:
    """Which optimizer and learning-rate schedule; one per layer phase (or per run)."""

    name: Literal["adamw", "muon"] = param("adamw", choices=("adamw", "muon"),
        help="adamw: AdamW on every trained parameter; muon: Muon on 2-D hidden matrices, AdamW on the rest")
    lr: float = param(1e-3, min=0.0, help="AdamW learning rate (with name: muon, the AdamW part uses adam_lr)")
    muon_lr: float = param(0.02, min=0.0, help="Muon learning rate (name: muon)")
    adam_lr: float | None = param(None, min=0.0,
        help="AdamW learning rate for embeddings, head, biases and norms under name: muon; unset means lr")
    weight_decay: float = param(0.01, min=0.0,
        help="decoupled weight decay; AdamW applies it to 2-D+ tensors only (not biases or norms), Muon to all its matrices")
    betas: tuple[float, float] = param((0.9, 0.999), help="AdamW betas (the notebook's Muon runs used [0.9, 0.95])")
    eps: float = param(1e-8, min=0.0, help="AdamW epsilon")
    muon_momentum: float = param(0.95, min=0.0, max=1.0, help="Muon momentum")
    muon_nesterov: bool = param(True, help="Nesterov momentum in Muon")
    muon_adjust_lr: Literal["original", "match_rms_adamw"] = param("match_rms_adamw",
        choices=("original", "match_rms_adamw"),
        help="Muon per-matrix lr scale: match_rms_adamw = 0.2*sqrt(max(rows, cols)) (the notebook's runs); "
             "original = sqrt(max(1, rows/cols))")
    adam_name_patterns: list[str] = param(DEFAULT_ADAM_NAME_PATTERNS,
        help="under name: muon, a 2-D parameter whose name contains one of these goes to AdamW")
    schedule: Literal["cosine", "linear", "constant"] = param("linear", choices=("cosine", "linear", "constant"),
        help="decay after warm-up (linear is transformers' default, which the notebook's runs used)")
    warmup_ratio: float = param(0.0, min=0.0, max=1.0, help="warm-up as a share of the schedule's steps")
    warmup_steps: int | None = param(None, min=0, help="warm-up steps; overrides warmup_ratio when set")
    min_lr_ratio: float = param(0.0, min=0.0, max=1.0, help="the decay ends at this share of the base lr")

    def warmup_for(self, total_steps: int) -> int:
        """Warm-up steps for a schedule of ``total_steps`` steps."""
        if self.warmup_steps is not None:
            return min(self.warmup_steps, total_steps)
        return int(self.warmup_ratio * total_steps)


# ----------------------------------------------------------------------------- optimizers

class MuonAdamW(torch.optim.Optimizer):
    """Muon for some parameters and AdamW for the others, seen as one optimizer.

    ``param_groups`` is the Muon groups followed by the AdamW groups (the same dicts the inner
    optimizers use, so an LR scheduler built on this object drives both); ``step``,
    ``zero_grad``, ``state_dict`` and ``load_state_dict`` act on both. ``state`` is a read-only
    merged view. Either part may be absent (``None``).
    """

    def __init__(self, muon: torch.optim.Optimizer | None, adamw: torch.optim.Optimizer | None):
        self.muon, self.adamw = muon, adamw
        self.optimizers = [opt for opt in (muon, adamw) if opt is not None]
        if not self.optimizers:
            raise ValueError("MuonAdamW needs at least one of its two optimizers")
        # The base class adds these very dicts to self.param_groups (their params are disjoint).
        self._built = False
        super().__init__(self._inner_groups(), defaults={})
        self._built = True

    def _inner_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    @property
    def state(self) -> dict[Tensor, Any]:  # type: ignore[override]
        merged: dict[Tensor, Any] = {}
        for opt in self.optimizers:
            merged.update(opt.state)
        return merged

    @state.setter
    def state(self, value: Any) -> None:
        # The base initialiser assigns an empty state; the real one lives in the inner optimizers.
        if value:
            raise AttributeError("MuonAdamW.state is a view of its inner optimizers' state")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict() if self.muon else None,
                "adamw": self.adamw.state_dict() if self.adamw else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key, opt in (("muon", self.muon), ("adamw", self.adamw)):
            if (opt is None) != (state_dict.get(key) is None):
                raise ValueError(f"optimizer state has {'no ' if state_dict.get(key) is None else ''}"
                                 f"{key} part but this optimizer has {'none' if opt is None else 'one'}")
            if opt is not None:
                opt.load_state_dict(state_dict[key])
        # Loading replaces the inner group dicts: point ours (and any scheduler's) at the new ones.
        self.param_groups = self._inner_groups()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._built:
            raise NotImplementedError("add the group to MuonAdamW.muon or .adamw, then build a new MuonAdamW")
        super().add_param_group(param_group)


def split_muon_params(named_params: Iterable[tuple[str, nn.Parameter]],
                      adam_name_patterns: Sequence[str] = DEFAULT_ADAM_NAME_PATTERNS,
                      ) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """Split trainable parameters into (Muon, AdamW) by the rule in the module docstring."""
    muon, adam = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        is_hidden_matrix = p.ndim == 2 and not any(pat in name for pat in adam_name_patterns)
        (muon if is_hidden_matrix else adam).append((name, p))
    return muon, adam


def _adamw(named: list[tuple[str, nn.Parameter]], lr: float, cfg: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D+ tensors and none on biases / norm weights (1-D)."""
    decay = [p for _, p in named if p.ndim >= 2]
    no_decay = [p for _, p in named if p.ndim < 2]
    groups = [{"params": ps, "weight_decay": wd, "name": name}
              for ps, wd, name in ((decay, cfg.weight_decay, "adamw_decay"), (no_decay, 0.0, "adamw_no_decay"))
              if ps]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)


def build_optimizer(named_params: Iterable[tuple[str, nn.Parameter]],
                    cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimizer for the trainable (``requires_grad``) parameters among ``named_params``.

    Only the parameters passed in are ever touched: leave a parameter out and neither weight
    decay nor momentum can move it. ``cfg.name == "adamw"``: one AdamW at ``cfg.lr``.
    ``cfg.name == "muon"``: :class:`MuonAdamW` (``torch.optim.Muon`` at ``muon_lr`` on 2-D hidden
    matrices, AdamW at ``adam_lr`` or ``lr`` on the rest).
    """
    named = [(n, p) for n, p in named_params if p.requires_grad]
    if not named:
        raise UserError("optimizer: no trainable parameters; check which layers or adapters are trained")
    if cfg.name == "adamw":
        return _adamw(named, cfg.lr, cfg)
    if cfg.name != "muon":
        raise UserError(f"optim.name: {cfg.name!r} is not known; choose adamw or muon")
    if not hasattr(torch.optim, "Muon"):
        raise UserError(f"optim.name: muon needs torch >= 2.9 (torch.optim.Muon); this is torch "
                        f"{torch.__version__}: upgrade torch or use optim.name: adamw")
    muon_named, adam_named = split_muon_params(named, cfg.adam_name_patterns)
    muon = None
    if muon_named:
        muon = torch.optim.Muon([{"params": [p for _, p in muon_named], "name": "muon"}],
                                lr=cfg.muon_lr, weight_decay=cfg.weight_decay,
                                momentum=cfg.muon_momentum, nesterov=cfg.muon_nesterov,
                                adjust_lr_fn=cfg.muon_adjust_lr)
    adamw = _adamw(adam_named, cfg.adam_lr if cfg.adam_lr is not None else cfg.lr, cfg) if adam_named else None
    logger.info("Muon on %d matrices (%d values), AdamW on %d tensors (%d values)",
                len(muon_named), sum(p.numel() for _, p in muon_named),
                len(adam_named), sum(p.numel() for _, p in adam_named))
    return MuonAdamW(muon, adamw)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int,
                    cfg: OptimizerConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`unlearning.training.schedules.build_lr_scheduler` with the warm-up and shape from ``cfg``."""
    return build_lr_scheduler(optimizer, total_steps, warmup_steps=cfg.warmup_for(total_steps),
                              kind=cfg.schedule, min_ratio=cfg.min_lr_ratio)


# ----------------------------------------------------------------------------- gradient filters
#
# For the filters the loop runs two backward passes (retain, then forget) and keeps each
# pass's gradients: take_grads(params) after each, then set_grads(params, filter(g_r, g_f)).
# Both gradients are taken with their coefficients already applied. A None gradient (the
# loss does not reach that parameter) counts as zeros.

def take_grads(params: Sequence[Tensor]) -> list[Tensor | None]:
    """The current ``.grad`` of each parameter (or None), clearing them for the next backward."""
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    return grads


def set_grads(params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
    """Set each parameter's ``.grad`` (None leaves it without a gradient)."""
    if len(params) != len(grads):
        raise ValueError(f"{len(params)} parameters but {len(grads)} gradients")
    for p, g in zip(params, grads):
        p.grad = g


def _pairs(g_retain: Sequence[Tensor | None], g_forget: Sequence[Tensor | None]):
    if len(g_retain) != len(g_forget):
        raise ValueError(f"{len(g_retain)} retain gradients but {len(g_forget)} forget gradients")
    for g_r, g_f in zip(g_retain, g_forget):
        if g_r is None and g_f is None:
            yield None, None
        else:
            yield (g_r if g_r is not None else torch.zeros_like(g_f),
                   g_f if g_f is not None else torch.zeros_like(g_r))


def same_sign_filter(g_retain: Sequence[Tensor | None], g_forget: Sequence[Tensor | None]) -> list[Tensor | None]:
    """``(g_r + g_f)`` where both gradients agree in sign, 0 elsewhere.

    "Agree" is strict: ``g_r * g_f > 0``. An element where either gradient is exactly 0
    (including a parameter the loss does not reach) is zeroed: neither pass vouches for it.
    """
    out: list[Tensor | None] = []
    for g_r, g_f in _pairs(g_retain, g_forget):
        out.append(None if g_r is None else torch.where(g_r * g_f > 0, g_r + g_f, 0.0))
    return out


def asymmetric_filter(g_retain: Sequence[Tensor | None], g_forget: Sequence[Tensor | None]) -> list[Tensor | None]:
    """``g_r + g_f`` with the forget gradient zeroed where it disagrees in sign with the retain one.

    "Disagree" is strict: ``g_r * g_f < 0``. All of the retain gradient is kept; a forget
    element is kept where the retain gradient agrees or is exactly 0 (no conflict).
    """
    out: list[Tensor | None] = []
    for g_r, g_f in _pairs(g_retain, g_forget):
        out.append(None if g_r is None else g_r + torch.where(g_r * g_f < 0, 0.0, g_f))
    return out
