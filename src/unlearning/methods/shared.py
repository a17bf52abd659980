"""What the method families share, defined once: the default layers, the coefficient pair and
how epochs become optimizer steps."""

from __future__ import annotations

import math
from typing import NamedTuple

from unlearning.core.runtime import world_size

# The notebook's layers: sequential's l2 retain layers and the representation methods' target
# layers, clipped to the model's depth.
DEFAULT_LAYERS = [5, 10, 15, 20, 25, 30]


class Coefficients(NamedTuple):
    """The forget and retain coefficients at one step, in this order in every method."""
    forget: float
    retain: float


def steps_from_epochs(epochs: float, n_examples: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps for ``epochs`` passes over ``n_examples`` (rounded up, at least one step),
    with ``batch_size * grad_accum`` examples per step on each rank."""
    per_step = batch_size * grad_accum * world_size()
    return max(1, math.ceil(epochs * n_examples / per_step))
