"""Losses on hidden states, as pure functions on tensors: the representation methods' forget and
retain terms (checkpoint transfer's MSE to the teacher, circuit breakers' ReLU-cosine and
orthogonality, RMU's control vector) and the hidden-state retain loss ``hidden_l2``.

The conventions are :mod:`unlearning.training.losses`': ``mask`` is ``[batch, seq]``; activations are
``[batch, seq, hidden]``, computed in float32; the reference operand is detached here; per-layer losses
take ``dict[layer index, Tensor]``, each layer's value a mean over valid tokens, then the mean over the
layers of the first dict.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from unlearning.training.losses import bool_mask, masked_mean

__all__ = ["hidden_l2", "mse_to_teacher", "relu_cosine", "orthogonality", "rmu_control_vector",
           "rmu_forget", "rmu_retain"]


def _per_layer(current: Mapping[int, Tensor], reference: Mapping[int, Tensor] | None,
               per_token, mask: Tensor) -> Tensor:
    """Mean over the layers of ``current`` of ``masked_mean(per_token(cur, ref), mask)``."""
    if not current:
        raise ValueError("no layers given: the activation dict is empty")
    if reference is not None:
        missing = sorted(set(current) - set(reference))
        if missing:
            raise ValueError(f"layers {missing} are in the current activations but not in the "
                             f"reference ones (which have {sorted(reference)})")
    values = []
    for layer, acts in current.items():
        ref = None if reference is None else reference[layer].detach().float()
        values.append(masked_mean(per_token(acts.float(), ref), mask))
    return torch.stack(values).mean()


def _as_layers(acts: Mapping[int, Tensor] | Tensor) -> Mapping[int, Tensor]:
    return {0: acts} if isinstance(acts, Tensor) else acts


# ----------------------------------------------------------------------------- retain

def hidden_l2(current: Mapping[int, Tensor], original: Mapping[int, Tensor], mask: Tensor) -> Tensor:
    """Per token L2 norm of (current - original) hidden state, mean over valid tokens, then layers.

    Not squared: the notebook's ``retain_loss`` (~0.1-7) is this norm. Its gradient at zero
    difference is zero (the first step of LoRA, where current == original, is finite).
    """
    return _per_layer(current, original,
                      lambda cur, ref: torch.linalg.vector_norm(cur - ref, dim=-1), mask)


# ----------------------------------------------------------------------------- representation methods

def mse_to_teacher(current: Mapping[int, Tensor], teacher: Mapping[int, Tensor], mask: Tensor) -> Tensor:
    """Squared error to the teacher's hidden states: mean over the hidden dim, valid tokens, layers.

    The checkpoint-transfer forget loss (the notebook's ``cb_loss``). Any affine map from
    teacher to model space is applied by the caller before this.
    """
    return _per_layer(current, teacher, lambda cur, ref: (cur - ref).pow(2).mean(dim=-1), mask)


def relu_cosine(current: Mapping[int, Tensor], original: Mapping[int, Tensor], mask: Tensor) -> Tensor:
    """Circuit-breaker forget loss: mean over layers and valid tokens of ReLU(cos(current, original)).

    1.0 while the representations are unchanged; 0 once they are orthogonal or opposed.
    """
    return _per_layer(current, original,
                      lambda cur, ref: F.cosine_similarity(cur, ref, dim=-1, eps=1e-8).relu(), mask)


def orthogonality(acts: Mapping[int, Tensor] | Tensor, mask: Tensor) -> Tensor:
    """Within-batch orthogonality term on forget activations (circuit breakers' ``orth_coef``).

    Per layer: mean-pool each sequence's activations over its valid tokens, then take the mean
    over pairs of distinct sequences (with at least one valid token each) of ReLU(cosine
    similarity). 1.0 when all forget items point the same way, 0 when they are mutually
    orthogonal (or opposed). Mean over layers. Fewer than two valid sequences gives 0.
    (The lab's prototype multiplied this by the mean sequence length; here it stays in [0, 1].)
    """
    values = []
    for layer_acts in _as_layers(acts).values():
        m = bool_mask(mask, layer_acts, "activations")
        a = layer_acts.float()
        counts = m.sum(dim=1, keepdim=True)
        pooled = torch.where(m.unsqueeze(-1), a, 0.0).sum(dim=1) / counts.clamp_min(1)
        unit = pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        sim = (unit @ unit.T).relu()
        valid = counts.squeeze(1) > 0
        pairs = valid.unsqueeze(0) & valid.unsqueeze(1)
        pairs &= ~torch.eye(len(valid), dtype=torch.bool, device=valid.device)
        values.append(torch.where(pairs, sim, 0.0).sum() / pairs.sum().clamp_min(1))
    if not values:
        raise ValueError("no layers given: the activation dict is empty")
    return torch.stack(values).mean()


def rmu_control_vector(hidden_size: int, steering_coef: float,
                       generator: torch.Generator | None = None) -> Tensor:
    """RMU's fixed random direction: a uniform [0, 1) vector, normalised, times ``steering_coef``.

    As in the WMDP paper's code (``torch.rand``, not a Gaussian). Returned on the generator's
    device in float32.
    """
    u = torch.rand(hidden_size, generator=generator,
                   device=generator.device if generator is not None else None)
    return u / u.norm() * steering_coef


def rmu_forget(acts: Tensor, control_vec: Tensor, mask: Tensor) -> Tensor:
    """RMU forget loss at one layer: MSE between forget activations and the (already scaled)
    control vector, mean over the hidden dim, then valid tokens. ``control_vec`` is ``[hidden]``
    or broadcastable to ``acts``."""
    m = bool_mask(mask, acts, "activations")
    target = control_vec.detach().float().to(acts.device)
    return masked_mean((acts.float() - target).pow(2).mean(dim=-1), m)


def rmu_retain(acts: Tensor, original_acts: Tensor, mask: Tensor) -> Tensor:
    """RMU retain loss at one layer: MSE to the original model's activations, mean over the
    hidden dim, then valid tokens."""
    return mse_to_teacher({0: acts}, {0: original_acts}, mask)
