"""The one training loop every unlearning method shares.

A method says *what* to optimise: its phases (one per target layer for the sequential method,
one phase for the representation methods), which parameters train in each phase, and a loss
function of (model, batches) that returns named forget and retain terms. This loop does the
rest: micro-batch accumulation, gradient filters, L2-SP, clipping, the optimizer and learning-rate
schedule, per-step metrics, NaN checks, and a checkpoint after every phase for ``--resume``.

The loss function is a plain function of the model and a batch, and the loop calls the model
through whatever wraps it; gradients are averaged across ranks explicitly, so the same loop runs
under torchrun.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from unlearning.core.config import param
from unlearning.core.errors import ConfigError
from unlearning.core.io import atomic_write_json
from unlearning.core.logs import MetricsLogger
from unlearning.training.losses import check_finite
from unlearning.training.optim import (OptimizerConfig, asymmetric_filter, build_optimizer, build_scheduler,
                              same_sign_filter)
from unlearning.core.runtime import all_reduce_mean_, autocast, is_main_process, world_size

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Optimisation settings shared by every method."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    batch_size: int = param(4, min=1, help="examples per device per micro-batch")
    grad_accum: int = param(2, min=1, help="micro-batches per optimizer step")
    max_grad_norm: float = param(1.0, min=0, help="clip the gradient norm; 0 disables clipping")
    # The LR schedule's shape and warm-up are train.optimizer.{schedule, warmup_ratio, warmup_steps, min_lr_ratio}.
    schedule_scope: Literal["phase", "run"] = param(
        "phase", help="phase: a fresh optimizer and LR schedule per layer phase (the notebook's runs); "
                      "run: one optimizer and schedule across all phases")
    grad_filter: Literal["none", "same_sign", "asymmetric"] = param(
        "none", help="same_sign: keep only elements where retain and forget gradients agree in sign; "
                     "asymmetric: drop forget-gradient elements that disagree with the retain gradient")
    l2sp_coef: float = param(0.0, min=0, help="L2-SP: coef * ||w - w0||^2 on the trained parameters")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = param("auto", help="compute precision (autocast)")
    gradient_checkpointing: bool = False
    seed: int = 0
    log_every: int = param(1, min=1, help="write metrics every N optimizer steps")

    def __post_init__(self) -> None:
        if self.dtype == "fp16" and self.grad_filter != "none":
            raise ConfigError("train.dtype: fp16 with train.grad_filter needs a loss scale per gradient "
                              "group, which is not supported; use bf16 or fp32")


@dataclass
class Phase:
    """A stretch of training with one set of trainable parameters (e.g. one target layer)."""
    index: int
    steps: int
    layer: int | None = None
    name: str = ""


@dataclass
class StepContext:
    phase: Phase
    step: int            # optimizer step within the phase, from 0
    global_step: int     # optimizer steps before this one, over the whole run
    total_steps: int

    @property
    def phase_progress(self) -> float:
        return self.step / max(1, self.phase.steps)


@dataclass
class LossTerms:
    """Named loss terms, already multiplied by their coefficients, plus plain numbers to log.

    ``forget`` and ``retain`` are kept apart so gradient filters can take their gradients separately.
    """
    forget: dict[str, torch.Tensor] = field(default_factory=dict)
    retain: dict[str, torch.Tensor] = field(default_factory=dict)
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)  # tensors: detached, 0-d

    def total(self) -> torch.Tensor:
        terms = list(self.forget.values()) + list(self.retain.values())
        return torch.stack([t.float() for t in terms]).sum()


class Method:
    """What a method provides to the shared loop. Subclasses override the four hooks."""

    name = "method"

    def phases(self) -> list[Phase]:
        raise NotImplementedError

    def begin_phase(self, model: nn.Module, phase: Phase) -> list[tuple[str, nn.Parameter]]:
        """Make this phase's parameters trainable (others frozen) and return them by name."""
        raise NotImplementedError

    def losses(self, model: nn.Module, batches: dict[str, dict[str, torch.Tensor]],
               ctx: StepContext) -> LossTerms:
        raise NotImplementedError

    def end_phase(self, model: nn.Module, phase: Phase) -> None:
        """Called after the phase's last step (e.g. to snapshot originals)."""

    def restore(self, model: nn.Module, finished: list[Phase]) -> None:
        """On resume, before saved weights are loaded: rebuild state of the finished phases."""


def _to_floats(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Plain numbers for logging, with one device-to-host copy for all the tensors."""
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    host = dict(zip(tensors, torch.stack(list(tensors.values())).tolist())) if tensors else {}
    return {k: host.get(k, v) for k, v in values.items()}


def _grads(loss: torch.Tensor | None, params: list[nn.Parameter], retain_graph: bool) -> list[torch.Tensor]:
    if loss is None or not loss.requires_grad:
        return [torch.zeros_like(p) for p in params]
    gs = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]


def _sum(d: dict[str, torch.Tensor]) -> torch.Tensor | None:
    return torch.stack([t.float() for t in d.values()]).sum() if d else None


def backward(terms: LossTerms, params: list[nn.Parameter], grad_filter: str, scale: float,
             scaler: torch.amp.GradScaler | None = None) -> None:
    """Accumulate this micro-batch's gradient into ``p.grad``, filtered if asked."""
    if grad_filter == "none":
        loss = terms.total() * scale
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return
    g_forget = _grads(_sum(terms.forget), params, retain_graph=True)
    g_retain = _grads(_sum(terms.retain), params, retain_graph=False)
    combined = (same_sign_filter if grad_filter == "same_sign" else asymmetric_filter)(g_retain, g_forget)
    for p, g in zip(params, combined):
        g = g * scale
        p.grad = g if p.grad is None else p.grad + g


@dataclass
class TrainState:
    """What a checkpoint records besides weights."""
    finished_phases: int = 0
    global_step: int = 0
    streams: dict[str, dict[str, int]] = field(default_factory=dict)


class Checkpointer:
    """Saves the trained tensors and loop state after every phase, atomically (write, then rename)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def exists(self) -> bool:
        return (self.folder / "state.json").exists()

    def save(self, model: nn.Module, names: set[str], state: TrainState) -> None:
        if not is_main_process():
            return
        from safetensors.torch import save_file
        tmp = self.folder.with_name(self.folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        params = dict(model.named_parameters())
        save_file({n: params[n].detach().to("cpu").contiguous() for n in sorted(names)},
                  str(tmp / "trained.safetensors"))
        atomic_write_json(tmp / "state.json", {**dataclasses.asdict(state), "trained": sorted(names)})
        old = self.folder.with_name(self.folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if self.folder.exists():
            os.replace(self.folder, old)
        os.replace(tmp, self.folder)
        shutil.rmtree(old, ignore_errors=True)

    def read_state(self) -> tuple[TrainState, set[str]]:
        """The loop state and the names of the trained tensors."""
        raw = json.loads((self.folder / "state.json").read_text())
        names = set(raw.pop("trained"))
        return TrainState(**raw), names

    def load_weights(self, model: nn.Module) -> None:
        """Copy the saved trained tensors into ``model``."""
        from safetensors.torch import load_file
        tensors = load_file(str(self.folder / "trained.safetensors"))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in tensors.items():
                params[n].copy_(t.to(params[n].device, params[n].dtype))


def train(model: nn.Module, method: Method, streams: dict[str, Any], cfg: TrainConfig, *,
          device: torch.device, metrics: MetricsLogger | None = None,
          checkpointer: Checkpointer | None = None, resume: bool = False,
          on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainState:
    """Run every phase of ``method``; ``streams`` maps a batch name ("forget", "retain") to a BatchStream."""
    phases = method.phases()
    total_steps = sum(p.steps for p in phases)
    state, trained = TrainState(), set()
    if resume and checkpointer is not None and checkpointer.exists():
        state, trained = checkpointer.read_state()
        method.restore(model, phases[: state.finished_phases])  # originals come from the base weights first
        checkpointer.load_weights(model)
        for k, s in streams.items():
            if k in state.streams:
                s.load_state_dict(state.streams[k])
        log.info("resuming after phase %d of %d (step %d)", state.finished_phases, len(phases), state.global_step)

    from unlearning.core.runtime import resolve_dtype
    dtype = resolve_dtype(cfg.dtype, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    bar = tqdm(total=total_steps, initial=state.global_step, desc=method.name, disable=not is_main_process(),
               dynamic_ncols=True)
    optimizer = scheduler = None
    for phase in phases[state.finished_phases:]:
        named = method.begin_phase(model, phase)
        params = [p for _, p in named]
        if not params:
            raise ConfigError(f"phase {phase.name or phase.index}: no trainable parameters")
        trained |= {n for n, _ in named}
        if optimizer is None or cfg.schedule_scope == "phase":
            optimizer = build_optimizer(named, cfg.optimizer)
            span = phase.steps if cfg.schedule_scope == "phase" else total_steps
            scheduler = build_scheduler(optimizer, span, cfg.optimizer)
        w0 = [p.detach().clone() for p in params] if cfg.l2sp_coef > 0 else None
        for step in range(phase.steps):
            ctx = StepContext(phase, step, state.global_step, total_steps)
            sums: dict[str, torch.Tensor | float] = {}
            for _ in range(cfg.grad_accum):
                batches = {k: {n: t.to(device, non_blocking=True) for n, t in next(s).items()}
                           for k, s in streams.items()}
                with autocast(device, dtype):
                    terms = method.losses(model, batches, ctx)
                if w0 is not None:
                    sq = torch.stack([(p.float() - q.float()).pow(2).sum() for p, q in zip(params, w0)]).sum()
                    terms.retain["l2sp"] = cfg.l2sp_coef * sq
                backward(terms, params, cfg.grad_filter, 1.0 / cfg.grad_accum, scaler)
                named_values = [(f"{k}_term", v) for group in (terms.forget, terms.retain) for k, v in group.items()]
                for k, v in named_values + list(terms.logs.items()):
                    v = v.detach().float() if isinstance(v, torch.Tensor) else v
                    sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
            if world_size() > 1:
                all_reduce_mean_([p.grad for p in params if p.grad is not None])
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0
                                                       else math.inf)
            # One device sync per step: the loss terms stay on the GPU until here, so the CPU keeps
            # queueing kernels instead of waiting on every logged number (small models are launch-bound).
            sums = _to_floats({**sums, "grad_norm": grad_norm})
            grad_norm = sums.pop("grad_norm")
            for k, v in sums.items():
                if k.endswith("_term"):  # a NaN term stops the run before the optimizer moves anything
                    check_finite(k.removesuffix("_term"), v, step=state.global_step, layer=phase.layer,
                                 phase_step=step)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.global_step += 1
            record = {"step": state.global_step, "phase": phase.index, "layer": phase.layer,
                      "phase_step": step + 1, "lr": lr, "grad_norm": grad_norm, **sums}
            if metrics is not None and (state.global_step % cfg.log_every == 0 or step + 1 == phase.steps):
                metrics.log(record)
            if on_step is not None:
                on_step(record)
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in sums.items() if k.endswith("_loss")}, refresh=False)
        method.end_phase(model, phase)
        state.finished_phases += 1
        state.streams = {k: s.state_dict() for k, s in streams.items()}
        if checkpointer is not None:
            checkpointer.save(model, trained, state)
    bar.close()
    return state
