"""What a method's ``build`` receives from the run: a small typed context, never the run config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from unlearning.data.text import TokenizedData
from unlearning.training.loop import TrainConfig


@dataclass
class BuildContext:
    """What a method's ``build`` gets from the run."""
    model_name: str                    # resolved (no "auto"): masks and teachers are found from it
    tokenizer: Any
    data: dict[str, TokenizedData]     # "forget", "retain"; a mask adds ``loss_mask`` to the forget rows
    device: torch.device
    train: TrainConfig                 # batch size and accumulation turn epochs into steps
    seed: int = 0
    model_dtype: str = "fp32"          # the precision the weights are held in (a teacher loads the same way)
