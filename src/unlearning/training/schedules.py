"""Learning-rate schedules, loss-coefficient ramps and per-layer step scales: pure functions of the step.

* :func:`lr_factor` / :func:`build_lr_scheduler`: warm-up then cosine, linear or constant decay,
  as a ``torch.optim.lr_scheduler.LambdaLR`` (works on any ``torch.optim.Optimizer``, including
  :class:`unlearning.training.optim.MuonAdamW`, whose groups all scale by the same factor).
* :func:`retain_coef_at`, :func:`forget_coef_at`: the sequential method's per-phase ramps.
* :func:`circuit_breaker_coefs`: the circuit-breakers schedule.
* :func:`layer_steps`, :func:`layer_forget_coef`: more steps / a larger forget coefficient on
  earlier (deeper-from-the-output) layers.

Steps count from 0. A ramp over a phase of ``total`` steps uses ``progress = min(step / total, 1)``
(as the notebook's trainers did), so step 0 has the start value and step ``total`` the end value.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch.optim.lr_scheduler import LambdaLR

from unlearning.core.errors import UserError

ScheduleKind = Literal["cosine", "linear", "constant"]
SCHEDULES = ("cosine", "linear", "constant")


def _progress(step: int, total: int) -> float:
    if total <= 0:
        raise ValueError(f"total steps must be positive, got {total}")
    return min(max(step, 0) / total, 1.0)


# ----------------------------------------------------------------------------- learning rate

def lr_factor(step: int, total_steps: int, warmup_steps: int = 0, kind: ScheduleKind = "cosine",
              min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Same shape as transformers' ``get_{linear,cosine,constant}_schedule_with_warmup``:
    warm-up ``step / warmup_steps`` (0 at step 0), then, with
    ``progress = (step - warmup) / (total - warmup)``, cosine
    ``min + (1 - min) * (1 + cos(pi * progress)) / 2``, linear ``min + (1 - min) * (1 - progress)``,
    or constant 1. ``min_ratio`` is the floor the decay ends at (0 in transformers).
    """
    if kind not in SCHEDULES:
        raise UserError(f"optim.schedule: {kind!r} is not known; choose one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return step / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min((step - warmup_steps) / max(1, total_steps - warmup_steps), 1.0)
    if kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


def build_lr_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, *, warmup_steps: int = 0,
                       kind: ScheduleKind = "cosine", min_ratio: float = 0.0) -> LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_factor` to every param group of ``optimizer``.

    Call ``scheduler.step()`` after each ``optimizer.step()``. For a fresh schedule per layer
    phase, build a new optimizer and scheduler at the start of each phase.
    """
    if total_steps <= 0:
        raise UserError(f"total steps: {total_steps} must be at least 1; raise steps_per_layer")
    if not 0 <= warmup_steps <= total_steps:
        raise UserError(f"optim.warmup_steps: {warmup_steps} must be between 0 and the "
                        f"{total_steps} steps of the schedule")
    lr_factor(0, total_steps, warmup_steps, kind, min_ratio)  # validates kind
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, kind, min_ratio))


# ----------------------------------------------------------------------------- coefficient ramps

def linear_ramp(step: int, total: int, start: float, end: float) -> float:
    """``start`` at step 0, ``end`` from step ``total`` on, linear in between."""
    return start + (end - start) * _progress(step, total)


def retain_coef_at(step: int, total: int, retain_coef: float, start_fraction: float = 0.25) -> float:
    """Sequential method: the retain coefficient ramps from ``start_fraction * retain_coef``
    (0.25 by default; 0 for the notebook's "ramp retain from zero") to ``retain_coef`` over a phase."""
    return linear_ramp(step, total, start_fraction * retain_coef, retain_coef)


def forget_coef_at(step: int, total: int, remove_coef: float, end_fraction: float = 0.75) -> float:
    """Sequential method: the forget coefficient ramps from ``remove_coef`` down to
    ``end_fraction * remove_coef`` (0.75 by default) over a phase."""
    return linear_ramp(step, total, remove_coef, end_fraction * remove_coef)


def circuit_breaker_coefs(step: int, total: int, retain_coef: float, remove_coef: float) -> tuple[float, float]:
    """The circuit-breakers schedule over ``total`` = T steps, at step t:
    ``(retain_coef * t / (2T), remove_coef * (1 - t / (2T)))``: retain grows from 0 to half its
    coefficient while forget shrinks from its full coefficient to half. Not clipped past T."""
    if total <= 0:
        raise ValueError(f"total steps must be positive, got {total}")
    frac = step / (2 * total)
    return retain_coef * frac, remove_coef * (1.0 - frac)


# ----------------------------------------------------------------------------- per-layer scales

def depth_scale(layer: int, first_layer: int, scale: float) -> float:
    """``1 + (scale - 1) * (L_first - L) / L_first``: 1 at the first (deepest) target layer
    ``L_first``, ``scale`` at layer 0, linear in between. 1 when ``L_first`` is 0."""
    if not 0 <= layer <= first_layer:
        raise ValueError(f"layer {layer} must be between 0 and the first target layer {first_layer}")
    if first_layer == 0:
        return 1.0
    return 1.0 + (scale - 1.0) * (first_layer - layer) / first_layer


def layer_steps(base: int, layer: int, first_layer: int, deep_layer_step_scale: float) -> int:
    """Steps for layer ``L``'s phase: ``base * depth_scale(L)`` rounded DOWN, at least 1.

    Rounded down because that reproduces the notebook's totals: base 128, layers 31->11:4 give
    128, 177, 227, 276, 326, 375 = 1509 steps with scale 4 (notebook run 56: ~1509) and 2500 with
    scale 8 (run 57: ~2500); rounding to nearest would give 1512 and 2502."""
    steps = base * depth_scale(layer, first_layer, deep_layer_step_scale)
    return max(1, math.floor(steps + 1e-9))  # the epsilon keeps an exact 128.0 from reading 127.99..


def layer_forget_coef(coef: float, layer: int, first_layer: int, forget_layer_scale: float) -> float:
    """The forget coefficient for layer ``L``'s phase: ``coef * depth_scale(L)`` (not rounded)."""
    return coef * depth_scale(layer, first_layer, forget_layer_scale)
