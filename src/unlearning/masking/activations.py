"""What both the masks and the mask scorers read: one layer's activations over token rows, the
default layer, and the cache folder. Kept apart so that :mod:`unlearning.masking.masks` imports
:mod:`unlearning.masking.models` and neither imports the other back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from unlearning.core.paths import unlearning_home
from unlearning.data.text import TokenizedData
from unlearning.model.layers import forward_until, num_layers


def cache_dir() -> Path:
    """``$UNLEARNING_HOME/masks``: computed masks, and trained probes / SAEs under ``artifacts/``."""
    return unlearning_home() / "masks"


def default_layer(model: nn.Module) -> int:
    """The middle layer: where a mask scorer reads activations unless a layer is given."""
    return num_layers(model) // 2


def iter_activations(model: nn.Module, data: TokenizedData, layer: int, device: torch.device,
                     batch_size: int = 16) -> Iterator[tuple[slice, Tensor, Tensor]]:
    """``(rows, hidden [b, seq, d] float32, valid [b, seq] bool)`` for consecutive row slices."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(data), batch_size):
                rows = slice(start, min(start + batch_size, len(data)))
                ids = data.input_ids[rows].to(device)
                attn = data.attention_mask[rows].to(device)
                hidden = forward_until(model, ids, attn, [layer])[layer].float()
                yield rows, hidden, attn.bool()
    finally:
        model.train(was_training)
