"""The one training loop: every unlearning method's phases and every tamper attack run through it.

A :class:`~unlearning.training.contract.Method` says *what* to optimise: its phases (one per
target layer for the sequential method, one phase for the representation methods and the attack),
which parameters train in each phase, and a loss function of (model, batches) that returns named
forget and retain terms. This loop does the rest, once: micro-batch accumulation, precision and
the fp16 loss scaler, gradient filters, L2-SP, clipping, the optimizer and learning-rate schedule,
per-step metrics, the progress bar, NaN checks with one device sync per step, and checkpoints
(:mod:`unlearning.training.checkpoint`) after every phase and at the steps asked for, from which
``resume`` continues bit-identically.

The loss function is a plain function of the model and a batch. Under torchrun each micro-batch's
losses go through PyTorch's DistributedDataParallel, wrapped again for each phase's parameters
(:mod:`unlearning.training.distributed`), so the same loop runs on one process or many. Under
``train.parallel: fsdp`` the model is sharded (:mod:`unlearning.training.fsdp`): the losses run as in
one process, and the checkpoint gathers and loads full tensors.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from unlearning.core.config import param
from unlearning.core.errors import ConfigError
from unlearning.core.faults import fault_point
from unlearning.core.logs import MetricsLogger
from unlearning.core.runtime import autocast, is_main_process, resolve_dtype
from unlearning.training.checkpoint import (Checkpointer, Position, load_tensors, rng_state, set_rng_state,
                                            tensors_of)
from unlearning.training.contract import LossTerms, Method, Phase, StepContext
from unlearning.training import fsdp
from unlearning.training.distributed import MicroBatchLosses, mean_over_ranks
from unlearning.training.losses import check_finite
from unlearning.training.optim import (OptimizerConfig, asymmetric_filter, build_optimizer, build_scheduler,
                                       same_sign_filter)

__all__ = ["Checkpointer", "LossTerms", "Method", "Phase", "StepContext", "TrainConfig", "TrainState",
           "backward", "train"]

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
    checkpoint_every: int = param(0, min=0, help="also checkpoint every N optimizer steps (for --resume "
                                                 "mid-phase); 0 = only at the end of each phase")
    parallel: Literal["ddp", "fsdp"] = param(
        "ddp", help="under torchrun: ddp (every rank holds the model; DDP averages gradients) or fsdp "
                    "(FSDP2: each decoder layer's parameters, gradients and optimizer state sharded over the "
                    "ranks; the model is built on the meta device and each rank loads only its shards)")

    def __post_init__(self) -> None:
        if self.dtype == "fp16" and self.grad_filter != "none":
            raise ConfigError("train.dtype: fp16 with train.grad_filter needs a loss scale per gradient "
                              "group, which is not supported; use bf16 or fp32")
        if self.parallel == "fsdp":
            # Each needs whole tensors or whole gradients on one rank, which FSDP2 never holds.
            unsupported = [(self.grad_filter != "none", "train.grad_filter: the forget and retain gradients "
                            "are taken apart with autograd.grad, which never reaches FSDP's sharded "
                            "parameters; use grad_filter none or train.parallel ddp"),
                           (self.l2sp_coef > 0, "train.l2sp_coef: L2-SP is not wired for sharded "
                            "parameters; use l2sp_coef 0 or train.parallel ddp"),
                           (self.optimizer.name == "muon", "train.optimizer.name: Muon orthogonalises whole "
                            "matrices and FSDP shards them; use adamw or train.parallel ddp"),
                           (self.dtype == "fp16", "train.dtype: fp16 under train.parallel fsdp needs a sharded "
                            "loss scaler, which is not wired; use bf16, fp32 or train.parallel ddp")]
            for bad, message in unsupported:
                if bad:
                    raise ConfigError(message)


def _to_floats(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Plain numbers for logging, with one device-to-host copy for all the tensors (averaged over
    ranks under torchrun, so rank 0 logs the global batch's numbers)."""
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    host = dict(zip(tensors, mean_over_ranks(torch.stack(list(tensors.values()))).tolist())) if tensors else {}
    return {k: host.get(k, v) for k, v in values.items()}


def _grads(loss: torch.Tensor | None, params: list[nn.Parameter], retain_graph: bool) -> list[torch.Tensor]:
    if loss is None or not loss.requires_grad:
        return [torch.zeros_like(p) for p in params]
    gs = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]


def _sum(d: dict[str, torch.Tensor]) -> torch.Tensor | None:
    return torch.stack([t.float() for t in d.values()]).sum() if d else None


def backward(terms: LossTerms, params: list[nn.Parameter], grad_filter: str, scale: float,
             scaler: torch.amp.GradScaler | None = None,
             parts: list[list[torch.Tensor]] | None = None) -> None:
    """Backpropagate one stage of a micro-batch, scaled by ``scale``.

    Unfiltered, the gradient accumulates into ``p.grad``. With a gradient filter the forget and
    retain gradients are taken apart: into ``parts`` ([forget grads, retain grads], summed over
    the micro-batch's stages; :func:`apply_filter` combines them once its last stage is done), or,
    without ``parts``, filtered and accumulated at once (a one-stage micro-batch).
    """
    if grad_filter == "none":
        if terms.forget or terms.retain:
            loss = terms.total() * scale
            if loss.requires_grad:
                (scaler.scale(loss) if scaler is not None else loss).backward()
        return
    g_forget = _grads(_sum(terms.forget), params, retain_graph=bool(terms.retain))
    g_retain = _grads(_sum(terms.retain), params, retain_graph=False)
    if parts is None:
        apply_filter([g_forget, g_retain], params, grad_filter, scale)
        return
    if not parts:
        parts.extend([g_forget, g_retain])
    else:
        parts[0] = [a + b for a, b in zip(parts[0], g_forget)]
        parts[1] = [a + b for a, b in zip(parts[1], g_retain)]


def apply_filter(parts: list[list[torch.Tensor]], params: list[nn.Parameter], grad_filter: str,
                 scale: float) -> None:
    """Combine a micro-batch's forget and retain gradients through the filter into ``p.grad``."""
    g_forget, g_retain = parts
    combined = (same_sign_filter if grad_filter == "same_sign" else asymmetric_filter)(g_retain, g_forget)
    # Accumulated through the parameters' own gradient accumulators (not by setting p.grad), so
    # DDP's hooks see the filtered gradient and average it over ranks.
    torch.autograd.backward(params, [g * scale for g in combined])


@dataclass
class TrainState:
    """How far :func:`train` got."""
    finished_phases: int = 0
    global_step: int = 0
    streams: dict[str, dict[str, int]] = field(default_factory=dict)


def _restore_random(saved: dict[str, Any], method: Method) -> None:
    set_rng_state(saved["rng"])
    method.load_state_dict(saved["method"])


def micro_batch_stages(model: nn.Module, method: Method, cfg: TrainConfig, params: list[nn.Parameter],
                       w0: list[torch.Tensor] | None, device: torch.device, dtype: torch.dtype
                       ) -> Callable[[dict[str, Any], StepContext], Iterator[LossTerms]]:
    """Every loss term of one micro-batch as its stages: the method's (``loss_stages``, each under
    autocast) and then L2-SP's."""
    def stages(batches: dict[str, Any], ctx: StepContext) -> Iterator[LossTerms]:
        method_stages = method.loss_stages(model, batches, ctx)
        while True:
            with autocast(device, dtype):  # on only while a stage computes, never around its backward
                terms = next(method_stages, None)
            if terms is None:
                break
            yield terms
        if w0 is not None:
            sq = torch.stack([(p.float() - q.float()).pow(2).sum() for p, q in zip(params, w0)]).sum()
            yield LossTerms(retain={"l2sp": cfg.l2sp_coef * sq})
    return stages


def _accumulate(losses: MicroBatchLosses, stages: Callable[[dict[str, Any], StepContext], Iterator[LossTerms]],
                streams: dict[str, Any], cfg: TrainConfig, ctx: StepContext, params: list[nn.Parameter],
                device: torch.device, scaler: torch.amp.GradScaler | None) -> dict[str, torch.Tensor | float]:
    """Forward and backward over the step's micro-batches; returns the averaged terms and logs
    (still tensors: nothing here waits for the device).

    In one process each stage is backpropagated before the next stage's forward, so its activations
    are freed first (the sequential forget pass is gone before the retain pass runs). Under DDP a
    micro-batch is one forward (every stage, through ``losses``) and one backward: DDP reduces each
    parameter once per backward.
    """
    sums: dict[str, torch.Tensor | float] = {}
    scale = 1.0 / cfg.grad_accum
    for i in range(cfg.grad_accum):
        batches = {k: {n: t.to(device, non_blocking=True) for n, t in next(s).items()}
                   for k, s in streams.items()}
        parts: list[list[torch.Tensor]] = []  # [forget grads, retain grads] under a gradient filter
        with losses.accumulating(last=i == cfg.grad_accum - 1):  # one gradient all-reduce per step
            done = [losses(batches, ctx)] if losses.distributed else []
            for terms in (done if losses.distributed else stages(batches, ctx)):
                backward(terms, params, cfg.grad_filter, scale, scaler, parts)
                if not losses.distributed:
                    done.append(terms)
            if cfg.grad_filter != "none":
                apply_filter(parts, params, cfg.grad_filter, scale)
        terms = LossTerms.merge(done)
        named_values = [(f"{k}_term", v) for group in (terms.forget, terms.retain) for k, v in group.items()]
        for k, v in named_values + list(terms.logs.items()):
            v = v.detach().float() if isinstance(v, torch.Tensor) else v
            sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
    return sums


def nonfinite_advice(cfg: TrainConfig, dtype: torch.dtype) -> str:
    """What to change after a NaN/inf loss, from the settings this run actually has
    (``{name}``: the loss term)."""
    advice = [f"lower the learning rate (optimizer.lr is {cfg.optimizer.lr:g}) or the coefficient of {{name}}"]
    if cfg.max_grad_norm <= 0:
        advice.append("clip gradients (max_grad_norm is 0: clipping is off; try 1.0)")
    if dtype == torch.float16:
        advice.append("compute in bf16 or fp32 (fp16 overflows above 65504)")
    return "; or ".join(advice)


def train(model: nn.Module, method: Method, streams: dict[str, Any], cfg: TrainConfig, *,
          device: torch.device, metrics: MetricsLogger | None = None,
          checkpointer: Checkpointer | None = None, resume: bool = False,
          on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainState:
    """Run every phase of ``method``; ``streams`` maps a batch name ("forget", "retain") to a BatchStream.

    With ``resume`` and a checkpoint on disk the run continues from the checkpoint's step as if it
    had never stopped: ``metrics`` is cut back to that step first. ``on_step(record)`` is called
    after ``method.on_step``.
    """
    phases = method.phases()
    total_steps = sum(p.steps for p in phases)
    # Under FSDP2 a parameter is a shard: the checkpoint gathers full tensors (every rank takes part)
    # and a resume loads full tensors on every rank, which keeps its shard (training/fsdp.py).
    sharded = fsdp.is_sharded(model)
    weights_of = (lambda names: fsdp.full_state(model, names)) if sharded else (lambda names: tensors_of(model, names))
    load_weights = (lambda t: fsdp.load_full_state(model, t)) if sharded else (lambda t: load_tensors(model, t))
    saved = checkpointer.load() if resume and checkpointer is not None and checkpointer.exists() else None
    pos = Position(**saved["position"]) if saved is not None else Position()
    state = TrainState(finished_phases=pos.phase, global_step=pos.global_step)
    trained: set[str] = set(saved["trainable"]) if saved is not None else set()
    if saved is not None:
        if metrics is not None:
            metrics.truncate_after(pos.global_step)  # the steps after the checkpoint are run (and logged) again
        method.restore(model, phases[: pos.phase])  # originals come from the base weights first
        for k, s in streams.items():
            if k in saved["streams"]:
                s.load_state_dict(saved["streams"][k])
        if pos.step == 0:  # a phase boundary: random state as it was before the next begin_phase
            _restore_random(saved, method)
        if pos.phase >= len(phases):
            load_weights(saved["trainable"])
        log.info("resuming at step %d of %d (phase %d, step %d of the phase)", pos.global_step, total_steps,
                 pos.phase, pos.step)

    dtype = resolve_dtype(cfg.dtype, device)
    advice = nonfinite_advice(cfg, dtype)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    bar = tqdm(total=total_steps, initial=pos.global_step, desc=method.name, disable=not is_main_process(),
               dynamic_ncols=True)
    optimizer = scheduler = None
    optimizer_names: list[str] = []

    def checkpoint(position: Position, w0: list[torch.Tensor] | None, names: list[str]) -> None:
        checkpointer.save({
            "position": Checkpointer.position_dict(position), "trainable": weights_of(trained),
            "optimizer": fsdp.optimizer_state(model, optimizer) if sharded else optimizer.state_dict(),
            "optimizer_params": list(optimizer_names),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
            "streams": {k: s.state_dict() for k, s in streams.items()}, "rng": rng_state(),
            "method": method.state_dict(),
            "anchor": {n: t.detach().cpu() for n, t in zip(names, w0)} if w0 is not None else None})

    try:  # the bar closes whatever ends the loop: an error message starts on a line of its own
        for index, phase in enumerate(phases[pos.phase:], start=pos.phase):
            named = method.begin_phase(model, phase)
            params, names = [p for _, p in named], [n for n, _ in named]
            if not params:
                raise ConfigError(f"phase {phase.name or phase.index}: no trainable parameters")
            trained |= set(names)
            here = saved is not None and index == pos.phase  # the phase the checkpoint stands in
            first = pos.step if here else 0
            if here:
                load_weights(saved["trainable"])
            if optimizer is None or cfg.schedule_scope == "phase":
                # Under one schedule for the run the optimizer holds the parameters of the phase it was
                # built in; a resumed run rebuilds it over the same ones.
                by_name = dict(model.named_parameters())
                opt_named = ([(n, by_name[n]) for n in saved["optimizer_params"]]
                             if here and cfg.schedule_scope == "run" else named)
                flags = [p.requires_grad for _, p in opt_named]
                for _, p in opt_named:  # they were trainable when it was first built
                    p.requires_grad_(True)
                optimizer = build_optimizer(opt_named, cfg.optimizer)
                for (_, p), flag in zip(opt_named, flags):
                    p.requires_grad_(flag)
                optimizer_names = [n for n, _ in opt_named]
                scheduler = build_scheduler(optimizer, phase.steps if cfg.schedule_scope == "phase" else total_steps,
                                            cfg.optimizer)
            if here:
                if first > 0 or cfg.schedule_scope == "run":
                    if sharded:
                        fsdp.load_optimizer_state(model, optimizer, saved["optimizer"])
                    else:
                        optimizer.load_state_dict(saved["optimizer"])
                    scheduler.load_state_dict(saved["scheduler"])
                if scaler is not None and saved["scaler"] is not None:
                    scaler.load_state_dict(saved["scaler"])
            w0 = None
            if cfg.l2sp_coef > 0:  # the anchor is the phase's starting point, kept across a mid-phase resume
                w0 = ([saved["anchor"][n].to(p.device, p.dtype) for n, p in named] if here and first > 0
                      else [p.detach().clone() for p in params])
            if here and first > 0:
                _restore_random(saved, method)  # after begin_phase, which may reseed
            # DDP under torchrun, over this phase's parameters; rank 0's weights are broadcast once
            stages = micro_batch_stages(model, method, cfg, params, w0, device, dtype)
            losses = MicroBatchLosses(model, lambda batches, ctx: LossTerms.merge(list(stages(batches, ctx))),
                                      sync_weights=index == pos.phase)
            for step in range(first, phase.steps):
                ctx = StepContext(phase, step, state.global_step, total_steps)
                sums = _accumulate(losses, stages, streams, cfg, ctx, params, device, scaler)
                if scaler is not None:
                    scaler.unscale_(optimizer)
                grad_norm = fsdp.grad_norm_value(torch.nn.utils.clip_grad_norm_(
                    params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf))
                # One device sync per step: the loss terms stay on the GPU until here, so the CPU keeps
                # queueing kernels instead of waiting on every logged number (small models are launch-bound).
                sums = _to_floats({**sums, "grad_norm": grad_norm})
                grad_norm = sums.pop("grad_norm")
                for k, v in sums.items():
                    if k.endswith("_term"):  # a NaN term stops the run before the optimizer moves anything
                        check_finite(k.removesuffix("_term"), v, step=state.global_step, layer=phase.layer,
                                     phase_step=step, advice=advice)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                lr = optimizer.param_groups[0]["lr"]  # the rate this step used (first group: Muon's under muon)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                for p in params:  # also those outside the optimizer (schedule_scope run, later phases)
                    p.grad = None
                state.global_step += 1
                record = {"step": state.global_step, "phase": phase.index, "layer": phase.layer,
                          "phase_step": step + 1, "lr": lr, "grad_norm": grad_norm, **sums}
                if metrics is not None and (state.global_step % cfg.log_every == 0 or step + 1 == phase.steps):
                    metrics.log(record)
                due = cfg.checkpoint_every > 0 and state.global_step % cfg.checkpoint_every == 0
                if checkpointer is not None and (due or method.checkpoint_due(state.global_step)):
                    checkpoint(Position(index, step + 1, state.global_step), w0, names)
                fault_point("train_step")
                method.on_step(record)
                if on_step is not None:
                    on_step(record)
                bar.update(1)
                bar.set_postfix({k: f"{v:.3g}" for k, v in sums.items() if k.endswith("_loss")}, refresh=False)
            del losses  # DDP's hooks on this phase's parameters go with it
            method.end_phase(model, phase)
            state.finished_phases += 1
            if checkpointer is not None:
                checkpoint(Position(index + 1, 0, state.global_step), w0, names)
            fault_point("phase_end")
    finally:
        bar.close()
    state.streams = {k: s.state_dict() for k, s in streams.items()}
    return state
