"""Data parallelism for the one loop: PyTorch's ``DistributedDataParallel`` around a method's losses.

(``train.parallel: fsdp`` shards the model with FSDP2 instead: :mod:`unlearning.training.fsdp`.)

Under ``torchrun --nproc-per-node N`` every rank holds the whole model, draws its own slice of
each global batch (:class:`unlearning.data.text.BatchStream`) and DDP averages the gradients in
its buckets, overlapped with the backward pass. Three things make the sequential and the
representation methods fit DDP:

- **One forward per backward.** A method's ``losses`` runs several passes through the model per
  micro-batch (the forget pass through the original layers after L, the retain pass, a no-grad
  reference pass). DDP is wrapped around :class:`_MicroBatchLosses`, a module whose forward is the
  whole of ``losses`` for one micro-batch, so DDP sees one forward whose outputs are the loss
  terms, and one backward of their sum. With ``find_unused_parameters`` DDP walks the graph back
  from those terms, so a trainable parameter no pass used (a LoRA adapter after L in the probe,
  with no retain loss) is reduced as a zero instead of hanging the other ranks.
- **A new wrapper per phase.** DDP fixes the set of parameters it reduces when it is built
  (those with ``requires_grad``); sequential unlearning trains another layer in each phase, so the
  loop wraps again after ``begin_phase``. Only the first wrap of a run broadcasts rank 0's weights
  (``sync_weights``): later phases start from weights that DDP's averaged gradients kept equal.
- **Accumulation.** Micro-batches before the last of a step run under ``no_sync``: gradients add
  up locally and are reduced once, in the last micro-batch's backward.

Gradient filters (``train.grad_filter``) take the forget and retain gradients apart with
``torch.autograd.grad`` (which DDP does not see), filter them per rank and micro-batch, and then
accumulate the filtered gradient with ``torch.autograd.backward(params, grads)``, which runs the
parameters' gradient accumulators and so DDP's hooks: the result is the single-process filter
applied to each rank's micro-batch, averaged.

The logged numbers are averaged over ranks in the loop's one device sync per step
(:func:`mean_over_ranks`), so rank 0's ``metrics.jsonl`` is the global batch's, as with one process.
Each rank seeds its random state alike, so dropout masks repeat across ranks: runs that must match
one process exactly use no dropout (the tamper attack uses none; LoRA's ``lora.dropout`` is 0.05 by default).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from unlearning.core.runtime import world_size
from unlearning.model.layers import is_sharded
from unlearning.training.contract import LossTerms, StepContext

MicroBatchFn = Callable[[dict[str, dict[str, torch.Tensor]], StepContext], LossTerms]


class _MicroBatchLosses(nn.Module):
    """``fn(batches, ctx)`` (all of a method's passes for one micro-batch) as one module call.

    The model is a submodule, so DDP finds its trainable parameters; the output is plain dicts of
    tensors, which DDP searches for the autograd graph it waits on.
    """

    def __init__(self, model: nn.Module, fn: MicroBatchFn):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, batches: dict[str, dict[str, torch.Tensor]], ctx: StepContext):
        terms = self.fn(batches, ctx)
        return terms.forget, terms.retain, terms.logs


class MicroBatchLosses:
    """Computes one micro-batch's :class:`LossTerms`: directly in one process, through DDP under torchrun.

    ``accumulating(last)`` wraps the micro-batch's forward and backward: all but the step's last
    micro-batch skip the gradient all-reduce.
    """

    def __init__(self, model: nn.Module, fn: MicroBatchFn, *, sync_weights: bool = True):
        self.fn = fn
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        # A model sharded by FSDP2 (train.parallel: fsdp) reduces its own gradients, stage by stage
        # as one process backpropagates them (training/fsdp.py); DDP is for replicated models.
        if world_size() > 1 and not is_sharded(model):
            device = next(model.parameters()).device
            self.ddp = nn.parallel.DistributedDataParallel(
                _MicroBatchLosses(model, fn), device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=True,  # see the module docstring: a phase may leave some unused
                forward_sync_buffers=False,   # rotary tables and masks are constants, equal on every rank
                init_sync=sync_weights)

    @property
    def distributed(self) -> bool:
        return self.ddp is not None

    def __call__(self, batches: dict[str, dict[str, torch.Tensor]], ctx: StepContext) -> LossTerms:
        if self.ddp is None:
            return self.fn(batches, ctx)
        forget, retain, logs = self.ddp(batches, ctx)
        return LossTerms(forget=dict(forget), retain=dict(retain), logs=dict(logs))

    @contextlib.contextmanager
    def accumulating(self, last: bool) -> Iterator[None]:
        if self.ddp is None or last:
            yield
        else:
            with self.ddp.no_sync():
                yield


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` (the step's stacked logged numbers) over ranks; unchanged in one process."""
    if world_size() <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    values = values.float().clone()
    torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
    return values / world_size()
