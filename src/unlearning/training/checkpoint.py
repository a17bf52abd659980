"""The loop's checkpoint: everything a bit-identical resume needs, in one file, replaced atomically.

One file (``<folder>/state.pt``, a plain ``torch.save`` of tensors and numbers, read back with
``weights_only=True``) holds the trained tensors, the optimizer, scheduler and loss-scaler states,
the data streams' positions, the torch CPU and CUDA random states, the method's own state, the
L2-SP anchor and the loop position (phase, step in the phase, global step). It is written to a
temporary name and renamed over the old one, so a kill mid-write leaves the previous checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unlearning.core.runtime import is_main_process

FILE = "state.pt"


@dataclass
class Position:
    """Where the loop stands: ``step`` optimizer steps of phase ``phase`` are done
    (``step == 0``: the phase has not begun), ``global_step`` over the whole run."""
    phase: int = 0
    step: int = 0
    global_step: int = 0


def rng_state() -> dict[str, Any]:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tensors_of(model: nn.Module, names: set[str] | list[str]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().to("cpu", copy=True) for n in sorted(names)}


def load_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise RuntimeError(f"the checkpoint holds tensors this model lacks ({missing[0]}, ...): it was written "
                           f"by another model or set-up; start a fresh run instead of resuming")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))


class Checkpointer:
    """Reads and writes ``<folder>/state.pt`` (only the main process writes)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / FILE

    def exists(self) -> bool:
        return self.path.exists()

    def save(self, state: dict[str, Any]) -> None:
        if not is_main_process():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{FILE}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def load(self) -> dict[str, Any]:
        return torch.load(self.path, map_location="cpu", weights_only=True)

    def position(self) -> Position:
        return Position(**self.load()["position"])

    @staticmethod
    def position_dict(position: Position) -> dict[str, int]:
        return asdict(position)
