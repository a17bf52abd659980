"""Every loss on logits and tokens (forget, retain, distillation), the regularisers and the
finite-value check, as pure functions on tensors; the losses on hidden states (the representation
methods' terms, ``hidden_l2``) are :mod:`unlearning.training.hidden_losses`, with the same conventions.

Conventions shared by every function here:

* ``mask`` is ``[batch, seq]``, bool or 0/1: which positions count. Token-level losses return
  the MEAN over valid positions (never a sum over the sequence), so a coefficient means the
  same at any batch size or sequence length. An all-zero mask gives 0 (still attached to the
  graph, with zero gradient), never NaN.
* Logits are ``[batch, seq, vocab]`` and hidden states ``[batch, seq, hidden]``; everything is
  computed in float32 whatever the input precision.
* The second operand of a "distance to a reference" loss (original model, teacher, reference
  log-probabilities) is a constant: it is detached here, so callers need not remember to.
* Per-layer losses take ``dict[layer index, Tensor]`` and average over the layers of the first
  dict (each layer's value is already a mean over valid tokens).

Position conventions: losses on logits (``random_target_ce``, ``max_entropy_kl``,
``topk_entropy``, ``kl_retain``, ``argmax_agreement``) are per position, ``mask[:, t]`` selects
the distribution at position t. Next-token losses (``token_logprobs``, ``nll``, NPO) score token
t+1 from the logits at t: see :func:`token_logprobs` and :func:`next_token_mask`.

Scales follow the lab notebooks (``../shared/seeds``): the max-entropy and random-target forget
losses read 1.0 for a uniform output (the notebook's ``forget_loss`` of ~1.0-2.0), NPO starts at
log 2 ~= 0.69, and the checkpoint-transfer MSE is a mean over the hidden dimension.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

from unlearning.core.errors import NonFiniteLossError, UserError

__all__ = [
    "masked_mean", "draw_random_targets", "random_target_ce", "max_entropy_kl", "topk_entropy",
    "token_logprobs", "next_token_mask", "npo_per_sequence", "npo_per_token",
    "kl_retain", "kl_distill", "nll", "argmax_agreement", "bool_mask", "l2sp", "check_finite",
]


# ----------------------------------------------------------------------------- helpers

def bool_mask(mask: Tensor, values: Tensor, what: str = "values") -> Tensor:
    """``mask`` as bool, checked against the leading ``[batch, seq]`` of ``values``."""
    if tuple(mask.shape) != tuple(values.shape[:2]):
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the {what} have "
                         f"[batch, seq] = {tuple(values.shape[:2])}")
    return mask.to(device=values.device, dtype=torch.bool)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` ``[batch, seq]`` over positions where ``mask`` is true (0 if none).

    ``torch.where`` rather than multiplication, so a non-finite value at a masked position
    cannot leak into the result.
    """
    m = bool_mask(mask, values)
    total = torch.where(m, values.float(), 0.0).sum()
    return total / m.sum().clamp_min(1)


# ----------------------------------------------------------------------------- forget losses

def draw_random_targets(shape: Sequence[int], vocab_size: int,
                        generator: torch.Generator | None = None,
                        device: torch.device | str | None = None) -> Tensor:
    """Random token ids, uniform over ``[0, vocab_size)``, drawn from ``generator``.

    The ids are drawn on the generator's device (so a seeded CPU generator gives the same ids
    on any machine) and then moved to ``device``.
    """
    gen_device = generator.device if generator is not None else device
    ids = torch.randint(0, vocab_size, tuple(shape), generator=generator, device=gen_device)
    return ids.to(device) if device is not None else ids


def random_target_ce(logits: Tensor, mask: Tensor, targets: Tensor, normalize: bool = True) -> Tensor:
    """Cross-entropy of each position's distribution to a given random target id.

    With ``normalize`` (default) the cross-entropy is divided by log V, as the notebook's runs
    did, so a uniform output reads exactly 1.0, and the expectation over uniformly random
    targets equals :func:`max_entropy_kl`. ``targets`` is ``[batch, seq]``.
    """
    m = bool_mask(mask, logits, "logits")
    if tuple(targets.shape) != tuple(m.shape):
        raise ValueError(f"targets have shape {tuple(targets.shape)}, expected {tuple(m.shape)}")
    z = logits.float()
    target = targets.to(device=z.device, dtype=torch.long).unsqueeze(-1)
    ce = torch.logsumexp(z, dim=-1) - z.gather(-1, target).squeeze(-1)
    if normalize:
        ce = ce / math.log(z.shape[-1])
    return masked_mean(ce, m)


# Rows of a [.., V] tensor per chunk in :func:`rowwise`: fp32 intermediates of ~128 MiB at most.
ROWWISE_CHUNK_ELEMENTS = 2 ** 25


def rowwise(fn, *tensors: Tensor) -> Tensor:
    """``fn`` applied to rows: ``(..., V)`` tensors -> ``(...)`` per-row values, in chunks of rows.

    Each chunk runs under activation checkpointing, so its fp32 intermediates are freed after
    the forward pass and recomputed in backward: a 50k vocabulary at 4 x 1024 positions would
    otherwise keep 0.8 GB per fp32 copy of the logits, several copies per loss. Rows are
    independent, so the values equal ``fn`` on the whole tensors. Small inputs run in one call.
    """
    lead, vocab = tensors[0].shape[:-1], tensors[0].shape[-1]
    flat = [t.reshape(-1, vocab) for t in tensors]
    rows = max(1, ROWWISE_CHUNK_ELEMENTS // vocab)
    if flat[0].shape[0] <= rows:
        return fn(*tensors)
    track = torch.is_grad_enabled() and any(t.requires_grad for t in flat)
    outs = []
    for i in range(0, flat[0].shape[0], rows):
        chunk = [t[i:i + rows] for t in flat]
        outs.append(torch.utils.checkpoint.checkpoint(fn, *chunk, use_reentrant=False) if track else fn(*chunk))
    return torch.cat(outs).reshape(lead)


def _uniform_ce(z: Tensor) -> Tensor:
    """Per position CE(U, softmax(z)) = -(1/V) sum_i log p_i = logsumexp(z) - mean(z)."""
    return torch.logsumexp(z, dim=-1) - z.mean(dim=-1)


def max_entropy_kl(logits: Tensor, mask: Tensor) -> Tensor:
    """The max-entropy forget loss on the notebook's scale: CE(U, p) / log V.

    CE(U, p) = -(1/V) sum_i log p_i = log V + KL(U || p), so the value is
    ``1 + KL(U || p) / log V``: exactly 1.0 for a uniform output, larger the more peaked ``p``.
    Computed from logits as ``(logsumexp(z) - mean(z)) / log V`` (no [.., V] log-softmax kept).
    """
    m = bool_mask(mask, logits, "logits")
    return masked_mean(rowwise(lambda z: _uniform_ce(z.float()), logits) / math.log(logits.shape[-1]), m)


def topk_entropy(logits: Tensor, mask: Tensor, k: int) -> Tensor:
    """:func:`max_entropy_kl` over the K most likely tokens only, renormalised among themselves.

    Per position: CE(U_K, softmax(top-K logits)) / log K = 1 + KL(U_K || p_K) / log K, so a
    distribution uniform over its top K reads exactly 1.0 whatever happens outside them.
    Gradient flows to the top-K logits only.
    """
    vocab = logits.shape[-1]
    if not 2 <= k <= vocab:
        raise UserError(f"top_k: {k} is out of range; use an integer from 2 to the vocabulary "
                        f"size ({vocab})")
    m = bool_mask(mask, logits, "logits")
    top = torch.topk(logits.float(), k, dim=-1).values
    return masked_mean(_uniform_ce(top) / math.log(k), m)


def token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token log-probabilities, ``[batch, seq - 1]``: entry t is log p(labels[t+1] | logits[t]).

    The usual causal-LM shift: logits at position t predict the token at t+1, so the first
    token has no log-probability and the last logits predict nothing. Labels of -100 (ignored
    positions, as in Hugging Face) give an arbitrary finite value: mask them with
    :func:`next_token_mask`.
    """
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"labels have shape {tuple(labels.shape)} but the logits have "
                         f"[batch, seq] = {tuple(logits.shape[:2])}")
    z = logits[:, :-1].float()
    target = labels[:, 1:].long().clamp_min(0).unsqueeze(-1)
    return z.gather(-1, target).squeeze(-1) - torch.logsumexp(z, dim=-1)


def next_token_mask(mask: Tensor, labels: Tensor | None = None) -> Tensor:
    """The ``[batch, seq - 1]`` mask matching :func:`token_logprobs`: ``mask[:, 1:]``.

    A predicted token counts where its own position is valid (so a token mask restricting the
    loss to some tokens keeps its meaning), and, with ``labels``, where its label is not -100.
    """
    out = mask[:, 1:].to(torch.bool)
    if labels is not None:
        out = out & (labels[:, 1:] != -100)
    return out


def npo_per_sequence(logp_tokens: Tensor, ref_logp_tokens: Tensor, mask: Tensor, beta: float) -> Tensor:
    """NPO in the notebook's form, per sequence: mean over sequences of -log sigma(-beta * delta).

    delta = sum over the sequence's valid tokens of (log p_theta - log p_ref); sequences with no
    valid token are left out of the mean. Equals log 2 when p_theta = p_ref, and falls toward 0
    as the model's likelihood of the forget text drops below the reference's. (No 2/beta factor:
    the notebook's runs started at 0.69.) Inputs are ``[batch, n]`` token log-probabilities
    (e.g. from :func:`token_logprobs`) and a mask of the same shape.
    """
    m = bool_mask(mask, logp_tokens, "log-probabilities")
    diff = logp_tokens.float() - ref_logp_tokens.detach().float()
    delta = torch.where(m, diff, 0.0).sum(dim=-1)
    has_tokens = m.any(dim=-1)
    per_seq = F.softplus(beta * delta)  # -log sigmoid(-x) = log(1 + e^x)
    return torch.where(has_tokens, per_seq, 0.0).sum() / has_tokens.sum().clamp_min(1)


def npo_per_token(logp_tokens: Tensor, ref_logp_tokens: Tensor, mask: Tensor, beta: float) -> Tensor:
    """NPO per token: -log sigma(-beta (log p_theta - log p_ref)) at each valid token, then the mean.

    Equals log 2 when p_theta = p_ref.
    """
    m = bool_mask(mask, logp_tokens, "log-probabilities")
    diff = logp_tokens.float() - ref_logp_tokens.detach().float()
    return masked_mean(F.softplus(beta * diff), m)


# ----------------------------------------------------------------------------- retain losses

def kl_retain(current_logits: Tensor, original_logits: Tensor, mask: Tensor) -> Tensor:
    """KL(original || current) over the vocabulary at each valid position, then the mean.

    (The notebook's SFT runs summed over the sequence and divided by the batch size, giving
    retain losses of 10-200; this per-token mean reads those values divided by the length.)
    """
    m = bool_mask(mask, current_logits, "logits")
    return masked_mean(rowwise(_kl_rows, current_logits, original_logits.detach()), m)


def _kl_rows(current_logits: Tensor, original_logits: Tensor) -> Tensor:
    """KL(original || current) per row of logits, in fp32."""
    log_cur = F.log_softmax(current_logits.float(), dim=-1)
    log_orig = F.log_softmax(original_logits.float(), dim=-1)
    return F.kl_div(log_cur, log_orig, reduction="none", log_target=True).sum(dim=-1)


def kl_distill(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """Forward KL(teacher || student) of the temperature-softened distributions, times T^2
    (Hinton et al.: keeps the gradient's scale independent of T), mean over valid positions.

    At T = 1 this is :func:`kl_retain` with the teacher as the reference.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = float(temperature)
    return kl_retain(student_logits.float() / t, teacher_logits.float() / t, mask) * (t * t)


def nll(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Next-token negative log-likelihood, mean over valid predicted tokens.

    ``mask`` is over the input positions ``[batch, seq]``; the shift is done here
    (see :func:`token_logprobs` and :func:`next_token_mask`).
    """
    bool_mask(mask, logits, "logits")
    return -masked_mean(token_logprobs(logits, labels), next_token_mask(mask, labels))


# ----------------------------------------------------------------------------- metrics

def argmax_agreement(logits_a: Tensor, logits_b: Tensor, mask: Tensor) -> Tensor:
    """Share of valid positions whose arg-max token is the same under both logits (a metric, no
    gradient): the notebooks' ``retain_acc`` / ``forget_acc``. 0 when no position is valid."""
    m = bool_mask(mask, logits_a, "logits")
    with torch.no_grad():
        same = (logits_a.argmax(dim=-1) == logits_b.argmax(dim=-1)).float()
        return masked_mean(same, m)


# ----------------------------------------------------------------------------- regularisers and checks

def l2sp(params: Sequence[Tensor] | Mapping[str, Tensor],
         originals: Sequence[Tensor] | Mapping[str, Tensor]) -> Tensor:
    """L2-SP: sum over parameters of ||w - w0||^2 (float32). The coefficient is the caller's.

    Takes two parallel sequences, or two mappings keyed by parameter name (same keys).
    """
    if isinstance(params, Mapping):
        if not isinstance(originals, Mapping) or set(params) != set(originals):
            raise ValueError("l2sp: params and originals must be mappings with the same names")
        pairs = [(params[name], originals[name]) for name in params]
    else:
        params, originals = list(params), list(originals)
        if len(params) != len(originals):
            raise ValueError(f"l2sp: {len(params)} params but {len(originals)} originals")
        pairs = list(zip(params, originals))
    if not pairs:
        return torch.zeros(())
    total = sum((w.float() - w0.detach().float().to(w.device)).pow(2).sum() for w, w0 in pairs)
    return total


def check_finite(name: str, value: Tensor | float, step: int, layer: int | None = None,
                 phase_step: int | None = None, advice: str | None = None) -> None:
    """Raise :class:`NonFiniteLossError` naming the step, layer and loss term if ``value`` is NaN/inf;
    ``advice`` (``{name}``: the term) says what to change, from the run's settings (the loop's
    :func:`~unlearning.training.loop.nonfinite_advice`).

    (On a GPU this synchronises: call it once per step on the logged values.)
    """
    if isinstance(value, Tensor):
        finite = bool(torch.isfinite(value.detach()).all())
        shown = value.detach().float().item() if value.numel() == 1 else "not finite"
    else:
        finite, shown = math.isfinite(value), value
    if not finite:
        where = [f"layer {layer}"] if layer is not None else []
        where += [f"step {phase_step} of the phase"] if phase_step is not None else []
        raise NonFiniteLossError(
            f"loss term {name!r} is {shown} at step {step}" + (f" ({', '.join(where)})" if where else "")
            + ": the run stops here and keeps its last checkpoint; "
            + (advice or "lower the learning rate or the coefficient of {name}").format(name=repr(name)))
