"""Log-likelihoods of continuations, tokenized and batched as lm-evaluation-harness's ``HFLM`` does.

Tokenization is lm-eval's (``tokens.py``; its names are re-exported here).

Scoring (``HFLM._loglikelihood_tokens``): the model reads ``(ctx + cont)[-(max_length + 1):][:-1]``
(truncated from the left), the continuation's log-probabilities are read from the last
``len(cont)`` positions and summed; ``is_greedy`` says whether arg-max decoding gives the
continuation. Requests are sorted longest first, right-padded and put back in their original
order. Log-softmax is taken in float32.

The loop is built to keep a GPU busy (issue 18): every batch is built before the first forward
(``batches.py``, pinned, copied ``non_blocking``), no attention mask is passed (as lm-eval: right
padding is never read, see :func:`_forward_batches`), each batch's results stay on the device, and
the host reads them once, after the last forward: that ``.tolist()`` is the loop's only sync point.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from unlearning.core.faults import fault_point
from unlearning.core.runtime import autocast, is_main_process, resolve_device
from unlearning.evaluation.batches import Batch, build_batches, longest_first, max_scored_positions, plan_batches
from unlearning.evaluation.tokens import (  # noqa: F401  (re-exported: the scoring module's public names)
    TokenPair,
    encode_pair,
    encode_pairs,
    prefix_token_id,
    tok_encode,
    tok_encode_batch,
)
from unlearning.model.layers import is_sharded, reshard, unwrap_model

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer names one
TOKENIZER_INFINITY = 1000000000000000019884624838656  # transformers' "no limit" model_max_length


class LogLikelihood(float):
    """A summed log-probability (a plain float to arithmetic) that also carries ``is_greedy``."""

    is_greedy: bool

    def __new__(cls, value: float, is_greedy: bool) -> "LogLikelihood":
        obj = super().__new__(cls, value)
        obj.is_greedy = bool(is_greedy)
        return obj

    def __repr__(self) -> str:
        return f"LogLikelihood({float(self)!r}, is_greedy={self.is_greedy})"

    def __reduce__(self):  # keep is_greedy through pickling (torch.distributed gathers, workers)
        return (LogLikelihood, (float(self), self.is_greedy))


def model_max_length(model, tokenizer=None, default: int = DEFAULT_MAX_LENGTH) -> int:
    """lm-eval's ``resolve_max_length``: config length fields, then the tokenizer, then 2048."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit != TOKENIZER_INFINITY:
        return int(limit)
    return default


# ---------------------------------------------------------------------------------------------
# running the model


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _mixed_precision_dtype(model, device: torch.device, mixed_precision: bool | None) -> torch.dtype:
    """bf16 autocast on a GPU for an fp32 model (``None``), always (``True``) or never (``False``)."""
    if mixed_precision is None:
        param_dtype = next(model.parameters()).dtype
        mixed_precision = (device.type == "cuda" and param_dtype == torch.float32
                           and torch.cuda.is_bf16_supported())
    return torch.bfloat16 if mixed_precision else torch.float32


@contextlib.contextmanager
def inference(model, device: str | torch.device | None = None) -> Iterator[torch.device]:
    """Eval mode and ``torch.inference_mode`` for the block; the training mode is restored after.

    A model sharded by FSDP2 gets ``torch.no_grad`` instead: the buffers its all-gathers fill are
    made at the first forward and kept, and made under inference mode no later training step could
    write into them (a run evaluates its sharded model before training, too)."""
    dev = model_device(model) if device is None else resolve_device(str(device))
    if model_device(model) != dev:
        model.to(dev)
    was_training = model.training
    sharded = is_sharded(model)
    model.eval()
    try:
        with torch.no_grad() if sharded else torch.inference_mode():
            yield dev
    finally:
        if sharded:  # the root's forward left its parameters gathered (model.layers.reshard says why)
            reshard(model)
        model.train(was_training)


def _warn_truncated(count: int, limit: int) -> None:
    if count:
        log.warning("%d requests are longer than the model's %d tokens; their contexts were truncated "
                    "from the left (as lm-eval does)", count, limit)


# Families whose base model ends in the final norm and whose logits are just the output embedding
# of its hidden states (no soft-capping or logit scale), so the head can run on scored positions only.
HEAD_SPLIT_MODEL_TYPES = frozenset({"gpt_neox", "llama", "mistral", "qwen2", "gpt2"})


def _split_head(model) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """``(trunk, head)`` with ``logits == head(trunk(...).last_hidden_state)``, or None to run in full.

    Only scored positions are read back, and on a small model the unembedding at every position is
    most of the compute and memory (a 50k vocabulary at every position of a batch), so the head is
    applied to the scored positions alone.
    """
    inner = unwrap_model(model)
    config = getattr(inner, "config", None)
    if getattr(config, "model_type", None) not in HEAD_SPLIT_MODEL_TYPES:
        return None
    if is_sharded(inner):  # FSDP2 gathers the head's shards only in the root's own forward
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    trunk, head = getattr(inner, "base_model", None), inner.get_output_embeddings()
    if trunk is None or trunk is inner or head is None:
        return None
    return trunk, head




def _plan(model, rows: Sequence[list[int]], spans: Sequence[tuple[int, int]], batch_size: int,
          device: torch.device, extra=None) -> list[Batch]:
    """All batches of ``rows``, longest first, built on the host (pinned when they go to a GPU)."""
    order = longest_first(rows)
    plan = plan_batches(order, [len(r) for r in rows], [end - start for start, end in spans], batch_size,
                        max_scored_positions(unwrap_model(model)))
    return build_batches(rows, spans, plan, pin=device.type == "cuda", extra=extra)


def _forward_batches(model, batches: Sequence[Batch], *, device: torch.device, mixed_precision: bool | None,
                     desc: str, progress: bool) -> Iterator[tuple[Batch, list[torch.Tensor], torch.Tensor]]:
    """Yield ``(batch, its extra tensors on the device, logits (N, V) at its scored positions)``.

    No attention mask, as lm-eval's ``HFLM._model_call``: rows are right-padded, so every real
    token keeps its position and causal attention never lets it see the padding to its right;
    the padding's own outputs are never read. Without a mask SDPA runs its causal (flash) kernel,
    and transformers skips the mask check that reads the mask back to the host (a sync per forward).
    """
    amp = _mixed_precision_dtype(model, device, mixed_precision)
    split = _split_head(model)
    bar = tqdm(total=sum(len(b.index) for b in batches), desc=desc,
               disable=not progress or not is_main_process(), leave=False)
    for batch in batches:
        # pinned host memory: the copies are queued behind the previous forward, the host goes on
        input_ids, row_of, pos_of, *extra = (t.to(device, non_blocking=True) for t in
                                             (batch.input_ids, batch.row_of, batch.pos_of, *batch.extra))
        with autocast(device, amp):
            if split is None:
                logits = model(input_ids=input_ids, use_cache=False).logits[row_of, pos_of]  # (N, V)
            else:
                trunk, head = split
                hidden = trunk(input_ids=input_ids, use_cache=False).last_hidden_state     # (B, T, C)
                logits = head(hidden[row_of, pos_of])                                       # (N, V)
        yield batch, extra, logits
        bar.update(len(batch.index))  # counts launched batches: without syncs the host runs ahead
        fault_point("eval_batch")
    bar.close()


def loglikelihood_tokens(model, pairs: Sequence[TokenPair], *, batch_size: int = 32,
                         max_length: int | None = None, device: str | torch.device | None = None,
                         mixed_precision: bool | None = None, progress: bool = True,
                         ) -> list[LogLikelihood]:
    """Summed log-probability of each tokenized continuation given its tokenized context."""
    limit = max_length or model_max_length(model)
    inputs = []
    for ctx, cont in pairs:
        if not ctx or not cont:
            raise ValueError("every request needs at least one context and one continuation token")
        if len(cont) > limit:
            raise ValueError(f"a continuation of {len(cont)} tokens exceeds the model's maximum length {limit}")
        inputs.append((ctx + cont)[-(limit + 1):][:-1])  # truncated from the left, as lm-eval
    _warn_truncated(sum(len(c) + len(x) > limit + 1 for c, x in pairs), limit)
    if not pairs:
        return []

    def targets(index: list[int]) -> tuple[torch.Tensor, ...]:
        # per scored position: the continuation token it must predict, its batch row, its place in
        # the continuation (N,) each; the row's sum is over a zero-padded (B, longest continuation)
        conts = [pairs[i][1] for i in index]
        return (torch.tensor([t for c in conts for t in c]),
                torch.repeat_interleave(torch.arange(len(index)), torch.tensor([len(c) for c in conts])),
                torch.cat([torch.arange(len(c)) for c in conts]))

    sums, greedy, order = [], [], []
    with inference(model, device) as dev:
        spans = [(len(row) - len(cont), len(row)) for row, (_, cont) in zip(inputs, pairs)]
        batches = _plan(model, inputs, spans, batch_size, dev, extra=targets)
        for batch, (target, row, place), logits in _forward_batches(
                model, batches, device=dev, mixed_precision=mixed_precision, desc="log-likelihoods",
                progress=progress):
            logprobs = logits.float().log_softmax(-1)                                   # (N, V)
            shape = (len(batch.index), max(len(pairs[i][1]) for i in batch.index))      # (B, L)
            token_lp = logprobs.gather(-1, target[:, None])[:, 0]                      # (N,)
            sums.append(logprobs.new_zeros(shape).index_put_((row, place), token_lp).sum(-1))
            hits = torch.ones(shape, dtype=torch.bool, device=dev)
            greedy.append(hits.index_put_((row, place), logprobs.argmax(-1) == target).all(-1))
            order += batch.index
        # the one CPU-GPU sync point: every batch's results come to the host together
        values, is_greedy = torch.cat(sums).tolist(), torch.cat(greedy).tolist()
    results: list[LogLikelihood | None] = [None] * len(pairs)
    for i, value, hit in zip(order, values, is_greedy):
        results[i] = LogLikelihood(value, hit)
    return results  # type: ignore[return-value]


def next_token_loglikelihoods(model, contexts: Sequence[list[int]], candidates: Sequence[list[int]], *,
                              batch_size: int = 32, max_length: int | None = None,
                              device: str | torch.device | None = None,
                              mixed_precision: bool | None = None, progress: bool = True,
                              ) -> list[list[LogLikelihood]]:
    """Log-probability of each one-token candidate after its context, all from ONE forward pass of
    the context (the letter format's ``" A"``..``" D"``). Equal to :func:`loglikelihood_tokens` on
    the pairs ``(context, [candidate])``: lm-eval reads the same position of the same input."""
    limit = max_length or model_max_length(model)
    rows = [list(ctx[-limit:]) for ctx in contexts]
    _warn_truncated(sum(len(ctx) > limit for ctx in contexts), limit)
    if any(not row for row in rows):
        raise ValueError("every context needs at least one token")

    def letters(index: list[int]) -> tuple[torch.Tensor, ...]:
        # per candidate of the batch's questions, flattened: its batch row and its token (M,) each
        return (torch.repeat_interleave(torch.arange(len(index)), torch.tensor([len(candidates[i]) for i in index])),
                torch.tensor([c for i in index for c in candidates[i]]))

    values, greedy = [], []
    with inference(model, device) as dev:
        spans = [(len(row) - 1, len(row)) for row in rows]  # the last position alone
        batches = _plan(model, rows, spans, batch_size, dev, extra=letters)
        for _, (row, token), logits in _forward_batches(model, batches, device=dev, mixed_precision=mixed_precision,
                                                         desc="letter log-likelihoods", progress=progress):
            logprobs = logits.float().log_softmax(-1)                                   # (B, V)
            values.append(logprobs[row, token])                                         # (M,)
            greedy.append(logprobs.argmax(-1)[row] == token)                            # (M,)
        # the one CPU-GPU sync point: every batch's results come to the host together
        flat = zip(torch.cat(values).tolist(), torch.cat(greedy).tolist()) if values else iter(())
    results: list[list[LogLikelihood] | None] = [None] * len(rows)
    for batch in batches:  # the candidates come back in batch order
        for i in batch.index:
            results[i] = [LogLikelihood(*next(flat)) for _ in candidates[i]]
    return results  # type: ignore[return-value]


def loglikelihoods(model, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 32,
                   device: str | torch.device | None = None, *, add_bos_token: bool | None = None,
                   max_length: int | None = None, mixed_precision: bool | None = None,
                   progress: bool = True) -> list[LogLikelihood]:
    """Summed log-probability of each ``(context, continuation)`` request, lm-eval's way.

    Each result is a float (the summed log-probability) with an ``is_greedy`` attribute.
    ``device=None`` uses the model's device; ``max_length=None`` the model's (lm-eval's rule).
    """
    pairs = encode_pairs(tokenizer, requests, add_bos_token)
    limit = max_length or model_max_length(model, tokenizer)
    return loglikelihood_tokens(model, pairs, batch_size=batch_size, max_length=limit, device=device,
                                mixed_precision=mixed_precision, progress=progress)
