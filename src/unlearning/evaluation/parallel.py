"""Data-parallel evaluation: each rank scores a shard of the questions, all ranks get all results.

Under ``torchrun --nproc-per-node N unlearn eval ...`` every process loads the model onto its own
GPU, scores questions ``rank, rank + N, rank + 2N, ...`` (interleaved, so long and short tasks
spread evenly), and the log-likelihoods are gathered back into the original order, so the
metrics are those of one process. Only rank 0 writes files (``RunDir`` and ``unlearn eval``).
Without an initialised process group this is a plain call.

A model sharded by FSDP2 (``train.parallel: fsdp``) is scored with ``replicate=True``: every rank
scores every question. Each of its forwards all-gathers the layers' shards, a collective every
rank must join; shards of the questions would give the ranks different numbers of batches (and a
deadlock), so the ranks run the same batches instead, at N-fold compute.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def distributed() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group, ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """The items this rank handles: every ``world``-th one starting at ``rank``."""
    return list(items[rank::world])


def unshard(parts: Sequence[Sequence[R]], n: int) -> list[R]:
    """Inverse of :func:`shard` over all ranks: ``parts[r]`` holds items ``r, r + world, ...``."""
    world = len(parts)
    out: list[R] = [None] * n  # type: ignore[list-item]
    for r, part in enumerate(parts):
        expected = len(range(r, n, world))
        if len(part) != expected:
            raise RuntimeError(f"rank {r} returned {len(part)} results for {expected} items")
        out[r::world] = list(part)
    return out


def data_parallel_map(fn: Callable[[list[T]], list[R]], items: Sequence[T], *, replicate: bool = False) -> list[R]:
    """``fn(items)``, computed as ``fn`` of each rank's shard and gathered on every rank
    (``replicate``: computed whole on every rank, for a sharded model; see the module docstring).

    ``fn`` maps a list to a list of the same length (it must accept an empty list: a rank may
    get no items). Results are gathered with ``all_gather_object`` (picklable values).
    """
    rank, world = distributed()
    if world == 1 or replicate:
        return fn(list(items))
    local = fn(shard(items, rank, world))
    parts: list[list[R] | None] = [None] * world
    torch.distributed.all_gather_object(parts, local)
    return unshard(parts, len(items))  # type: ignore[arg-type]
