"""Log-likelihoods of continuations, tokenized and batched as lm-evaluation-harness's ``HFLM`` does.

Tokenization (lm-eval 0.4.x, ``TemplateLM._encode_pair`` and ``HFLM.tok_encode``):

* trailing whitespace of the context moves to the front of the continuation;
* ``whole = encode(context + continuation)``, ``ctx = encode(context)``, and the continuation's
  tokens are ``whole[len(ctx):]`` (so a merge across the boundary is scored as lm-eval scores it);
* special tokens: ``add_bos_token=None`` (HFLM's default) keeps the tokenizer's own behaviour
  (Llama adds BOS, GPT-NeoX and GPT-2 add nothing), except that a text already starting with
  the BOS (or EOS) string gets no second one; ``True`` puts BOS first; ``False`` adds nothing;
* an empty context is replaced by the prefix token (BOS, else EOS).

Scoring (``HFLM._loglikelihood_tokens``): the model reads ``(ctx + cont)[-(max_length + 1):][:-1]``
(truncated from the left), the continuation's log-probabilities are read from the last
``len(cont)`` positions and summed; ``is_greedy`` says whether arg-max decoding gives the
continuation. Requests are sorted longest first, right-padded (with an attention mask) and put
back in their original order. Log-softmax is taken in float32.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from unlearning.core.faults import fault_point
from unlearning.core.runtime import autocast, is_main_process, resolve_device
from unlearning.model.layers import is_sharded, unwrap_model

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer names one
TOKENIZER_INFINITY = 1000000000000000019884624838656  # transformers' "no limit" model_max_length

TokenPair = tuple[list[int], list[int]]


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


# ---------------------------------------------------------------------------------------------
# tokenization


def prefix_token_id(tokenizer) -> int | None:
    """The token that stands in for an empty context: BOS, else EOS (lm-eval's ``prefix_token_id``)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def tok_encode_batch(tokenizer, texts: Sequence[str], add_bos_token: bool | None = None,
                     add_special_tokens: bool | None = None) -> list[list[int]]:
    """Token ids of each text with lm-eval's special-token rule (see the module docstring);
    one batched tokenizer call per rule (the same ids as one ``encode`` per text)."""
    def run(batch: Sequence[str], **kwargs) -> list[list[int]]:
        return [list(ids) for ids in tokenizer(list(batch), **kwargs)["input_ids"]] if batch else []

    if add_special_tokens is None and add_bos_token is True:
        bos = tokenizer.bos_token_id
        if bos is None:
            raise ValueError("add_bos_token: the tokenizer has no BOS token; use add_bos_token false or auto")
        return [ids if ids[:1] == [bos] else [bos, *ids] for ids in run(texts, add_special_tokens=False)]
    if add_special_tokens is not None:
        return run(texts, add_special_tokens=add_special_tokens)
    if add_bos_token is not None:
        return run(texts, add_special_tokens=add_bos_token)
    prefix = prefix_token_id(tokenizer)
    prefix_text = tokenizer.decode([prefix]) if prefix is not None else ""
    # a text that already starts with the BOS string gets no second one (lm-eval's has_bos_prefix)
    has_prefix = [bool(prefix_text) and text.startswith(prefix_text) for text in texts]
    plain = iter(run([t for t, h in zip(texts, has_prefix) if h], add_special_tokens=False))
    default = iter(run([t for t, h in zip(texts, has_prefix) if not h]))
    return [next(plain) if h else next(default) for h in has_prefix]


def tok_encode(tokenizer, text: str, add_bos_token: bool | None = None,
               add_special_tokens: bool | None = None) -> list[int]:
    """Token ids of one text (lm-eval's ``HFLM.tok_encode``)."""
    return tok_encode_batch(tokenizer, [text], add_bos_token, add_special_tokens)[0]


def encode_pairs(tokenizer, requests: Sequence[tuple[str, str]],
                 add_bos_token: bool | None = None) -> list[TokenPair]:
    """``(context_ids, continuation_ids)`` of each request exactly as lm-eval's causal
    ``_encode_pair`` (plus its empty-context rule from ``TemplateLM.loglikelihood``); each
    distinct context is encoded once."""
    out: list[TokenPair | None] = [None] * len(requests)
    empty = [i for i, (ctx, _) in enumerate(requests) if ctx == ""]
    if empty:
        prefix = prefix_token_id(tokenizer)
        if prefix is None:
            raise ValueError("an empty context needs a BOS or EOS token to stand in for it")
        conts = tok_encode_batch(tokenizer, [requests[i][1] for i in empty], add_special_tokens=False)
        for i, cont in zip(empty, conts):
            out[i] = (cont[:1], cont[1:]) if cont[:1] == [prefix] else ([prefix], cont)
    rest = [i for i, (ctx, _) in enumerate(requests) if ctx != ""]
    split = []
    for i in rest:
        context, continuation = requests[i]
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:  # trailing whitespace belongs to the continuation
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        split.append((context, continuation))
    contexts = list(dict.fromkeys(ctx for ctx, _ in split))
    context_ids = dict(zip(contexts, tok_encode_batch(tokenizer, contexts, add_bos_token)))
    wholes = tok_encode_batch(tokenizer, [ctx + cont for ctx, cont in split], add_bos_token)
    for i, (ctx, _), whole in zip(rest, split, wholes):
        out[i] = (context_ids[ctx], whole[len(context_ids[ctx]):])
    return out  # type: ignore[return-value]


def encode_pair(tokenizer, context: str, continuation: str,
                add_bos_token: bool | None = None) -> TokenPair:
    """One request's ``(context_ids, continuation_ids)``; see :func:`encode_pairs`."""
    return encode_pairs(tokenizer, [(context, continuation)], add_bos_token)[0]


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
    """Eval mode and ``torch.inference_mode`` for the block; the training mode is restored after."""
    dev = model_device(model) if device is None else resolve_device(str(device))
    if model_device(model) != dev:
        model.to(dev)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield dev
    finally:
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


def _forward_longest_first(model, rows: Sequence[list[int]], spans: Sequence[tuple[int, int]], *,
                           batch_size: int, device: torch.device, mixed_precision: bool | None, desc: str,
                           progress: bool) -> Iterator[tuple[list[int], list[torch.Tensor]]]:
    """Yield ``(row indices, [logits (end - start, V) of each row])`` for batches of rows sorted
    longest first; ``spans[i] = (start, end)`` are the positions of row ``i`` whose logits are read.

    Rows are right-padded, so every real token keeps its position; the attention mask hides the
    padding from nothing that is read back (causal attention never looks right).
    """
    amp = _mixed_precision_dtype(model, device, mixed_precision)
    split = _split_head(model)
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), rows[i]))
    bar = tqdm(total=len(rows), desc=desc, disable=not progress or not is_main_process(), leave=False)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = len(rows[idx[0]])
        input_ids = torch.zeros(len(idx), width, dtype=torch.long)
        attention_mask = torch.zeros(len(idx), width, dtype=torch.long)
        for r, i in enumerate(idx):
            input_ids[r, :len(rows[i])] = torch.tensor(rows[i], dtype=torch.long)
            attention_mask[r, :len(rows[i])] = 1
        # the (batch row, position) of every scored logit, flattened: (N,) each
        lengths = [spans[i][1] - spans[i][0] for i in idx]
        row_of = torch.repeat_interleave(torch.arange(len(idx)), torch.tensor(lengths)).to(device)
        pos_of = torch.cat([torch.arange(*spans[i]) for i in idx]).to(device)
        with autocast(device, amp):
            if split is None:
                logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                               use_cache=False).logits[row_of, pos_of]                      # (N, V)
            else:
                trunk, head = split
                hidden = trunk(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                               use_cache=False).last_hidden_state                           # (B, T, C)
                logits = head(hidden[row_of, pos_of])                                       # (N, V)
        yield idx, list(logits.split(lengths))
        bar.update(len(idx))
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
    results: list[LogLikelihood | None] = [None] * len(pairs)
    with inference(model, device) as dev:
        spans = [(len(row) - len(cont), len(row)) for row, (_, cont) in zip(inputs, pairs)]
        for idx, logits in _forward_longest_first(model, inputs, spans, batch_size=batch_size, device=dev,
                                                  mixed_precision=mixed_precision,
                                                  desc="log-likelihoods", progress=progress):
            sums, greedy = [], []
            for r, i in enumerate(idx):
                cont = torch.tensor(pairs[i][1], device=logits[r].device)
                logprobs = logits[r].float().log_softmax(-1)                           # (len(cont), V)
                sums.append(logprobs.gather(-1, cont[:, None]).sum())
                greedy.append((logprobs.argmax(-1) == cont).all())
            for i, value, is_greedy in zip(idx, torch.stack(sums).tolist(), torch.stack(greedy).tolist()):
                results[i] = LogLikelihood(value, is_greedy)
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
    results: list[list[LogLikelihood] | None] = [None] * len(rows)
    with inference(model, device) as dev:
        spans = [(len(row) - 1, len(row)) for row in rows]  # the last position alone
        for idx, logits in _forward_longest_first(model, rows, spans, batch_size=batch_size, device=dev,
                                                  mixed_precision=mixed_precision,
                                                  desc="letter log-likelihoods", progress=progress):
            logprobs = torch.cat(logits).float().log_softmax(-1)                       # (b, V)
            best = logprobs.argmax(-1).tolist()
            for r, i in enumerate(idx):
                values = logprobs[r, list(candidates[i])].tolist()
                results[i] = [LogLikelihood(v, best[r] == c) for v, c in zip(values, candidates[i])]
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
