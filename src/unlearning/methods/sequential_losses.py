"""The sequential method's two paths: the forget loss through the probe, the retain loss against the original.

- Forget path: the current model up to layer L's output, then the ORIGINAL layers after L, final
  norm and unembedding (:func:`unlearning.model.originals.original_layers_after`); the forget loss is taken
  on those logits. ``npo_full_model`` takes NPO on the current model's own logits instead.
- Retain path: the current model on a retain batch against the original model (adapters off, or
  stored originals swapped in): L2 on hidden states at chosen layers, KL(original || current) on
  logits, NLL; several at once, each with its own weight.

Token masks: a forget batch may carry ``loss_mask`` (:mod:`unlearning.masking.masks`), marking the
tokens the forget loss counts. Next-token losses (NPO) count the prediction of a marked token;
per-position losses (max-entropy, top-K, random targets) count the distribution at position t
when token t+1 is marked, i.e. the same predictions. Without a mask every non-padding position
counts. The attention never changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from unlearning.training import hidden_losses, losses
from unlearning.model.originals import OriginalWeights, original_layers_after, original_model
from unlearning.model.layers import forward_until, get_parts, start_at
from unlearning.methods.representation import forward_hidden

ForgetKind = Literal["max_entropy_kl", "random_ce", "top_k_entropy", "npo", "npo_per_token"]
RETAIN_KINDS = ("l2", "kl", "nll")


def token_mask(batch: dict[str, Tensor]) -> Tensor:
    """Tokens that count: non-padding, and inside the loss mask when the batch has one."""
    mask = batch["attention_mask"].bool()
    if "loss_mask" in batch:
        mask = mask & batch["loss_mask"].bool()
    return mask


def position_mask(batch: dict[str, Tensor]) -> Tensor:
    """Positions whose next-token distribution a per-position forget loss counts (see module doc)."""
    valid = batch["attention_mask"].bool()
    if "loss_mask" not in batch:
        return valid
    out = torch.zeros_like(valid)
    out[:, :-1] = token_mask(batch)[:, 1:] & valid[:, :-1]
    return out


def logits_of(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def probe_logits(model: nn.Module, batch: dict[str, Tensor], layer: int,
                 originals: OriginalWeights | None) -> Tensor:
    """Current layers 0..layer, then the original layers after it, final norm and unembedding."""
    with original_layers_after(model, layer, originals):
        return logits_of(model, batch)


def reference_logprobs(model: nn.Module, batch: dict[str, Tensor], originals: OriginalWeights | None) -> Tensor:
    """Next-token log-probabilities of the fully original model (NPO's reference), no gradient."""
    with torch.no_grad(), original_model(model, originals):
        return losses.token_logprobs(logits_of(model, batch), batch["input_ids"])


def forget_loss(kind: ForgetKind, logits: Tensor, batch: dict[str, Tensor], *, ref_logprobs: Tensor | None = None,
                top_k: int = 100, beta: float = 0.1, generator: torch.Generator | None = None) -> Tensor:
    """One forget loss on one set of logits, on the notebook's scale (see :mod:`unlearning.training.losses`)."""
    if kind == "max_entropy_kl":
        return losses.max_entropy_kl(logits, position_mask(batch))
    if kind == "top_k_entropy":
        return losses.topk_entropy(logits, position_mask(batch), top_k)
    if kind == "random_ce":
        targets = losses.draw_random_targets(logits.shape[:2], logits.shape[-1], generator, device=logits.device)
        return losses.random_target_ce(logits, position_mask(batch), targets)
    if kind in ("npo", "npo_per_token"):
        if ref_logprobs is None:
            raise ValueError("NPO needs the reference log-probabilities")
        logp = losses.token_logprobs(logits, batch["input_ids"])
        mask = losses.next_token_mask(token_mask(batch))
        fn = losses.npo_per_sequence if kind == "npo" else losses.npo_per_token
        return fn(logp, ref_logprobs, mask, beta)
    raise ValueError(f"forget_loss: unknown kind {kind!r}")


def retain_losses(model: nn.Module, batch: dict[str, Tensor], weights: dict[str, float], l2_layers: Sequence[int],
                  originals: OriginalWeights | None, frozen_prefix: int = 0) -> dict[str, Tensor]:
    """Unweighted retain losses by kind, for each kind in ``weights`` (``l2``, ``kl``, ``nll``).

    Only what the kinds need is computed: without ``kl``/``nll`` both forward passes stop after
    the deepest L2 layer; without ``l2``/``kl`` no original pass runs at all.

    ``frozen_prefix`` k > 0 says blocks ``0..k-1`` are the original ones and nothing in them
    trains (full fine-tuning of layer k, or LoRA on the target layer only): the current and
    the original pass then agree up to block k-1, so that prefix runs once, without autograd,
    and both passes start at block k from its output. Same numbers, (k / depth) of two forward
    passes fewer.
    """
    mask = batch["attention_mask"].bool()
    layers = sorted(l2_layers) if "l2" in weights else []
    need_logits = "kl" in weights or "nll" in weights
    out: dict[str, Tensor] = {}
    if not layers and not need_logits:
        return out
    k = frozen_prefix if frozen_prefix > 0 and (need_logits or max(layers) >= frozen_prefix) else 0
    shared: dict[int, Tensor] = {}
    if k:
        with torch.no_grad():  # the prefix both passes share: block outputs 0..k-1, no autograd record
            # the unwrapped model: nothing here is for backward, so DDP must not arm its reducer
            shared = forward_until(get_parts(model).model, batch["input_ids"], batch["attention_mask"],
                                   sorted({*[i for i in layers if i < k], k - 1}))
    later = [i for i in layers if i >= k]

    def after_prefix():  # each pass starts at block k from the shared output (a fresh context each time)
        return start_at(model, k, shared[k - 1]) if k else contextlib.nullcontext()
    with after_prefix():
        hidden, logits = forward_hidden(model, batch, later, logits=need_logits)
    if "l2" in weights or "kl" in weights:
        with torch.no_grad(), original_model(model, originals), after_prefix():
            hidden0, logits0 = forward_hidden(model, batch, later, logits="kl" in weights)
        if "l2" in weights:
            both = {i: shared[i] for i in layers if i < k}  # equal in the two passes: a difference of 0
            out["l2"] = hidden_losses.hidden_l2({**both, **hidden}, {**both, **hidden0}, mask)
        if "kl" in weights:
            out["kl"] = losses.kl_retain(logits, logits0, mask)
    if "nll" in weights:
        out["nll"] = losses.nll(logits, batch["input_ids"], mask)
    return out
