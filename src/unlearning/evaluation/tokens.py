"""Tokenization of ``(context, continuation)`` requests exactly as lm-evaluation-harness 0.4.x does
(``TemplateLM._encode_pair`` and ``HFLM.tok_encode``):

* trailing whitespace of the context moves to the front of the continuation;
* ``whole = encode(context + continuation)``, ``ctx = encode(context)``, and the continuation's
  tokens are ``whole[len(ctx):]`` (so a merge across the boundary is scored as lm-eval scores it);
* special tokens: ``add_bos_token=None`` (HFLM's default) keeps the tokenizer's own behaviour
  (Llama adds BOS, GPT-NeoX and GPT-2 add nothing), except that a text already starting with
  the BOS (or EOS) string gets no second one; ``True`` puts BOS first; ``False`` adds nothing;
* an empty context is replaced by the prefix token (BOS, else EOS).

On MMLU this is ~70k texts (each context once, each context + continuation once), seconds of host
time before the first forward, so the texts are encoded in chunks on a few threads: a fast
(Rust) tokenizer releases the GIL while it encodes, even with ``TOKENIZERS_PARALLELISM=false``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

TokenPair = tuple[list[int], list[int]]

CHUNK = 512  # texts per tokenizer call on a worker thread
MAX_THREADS = 8


def _encode(tokenizer, texts: Sequence[str], **kwargs) -> list[list[int]]:
    """``tokenizer(texts, **kwargs)["input_ids"]`` as lists, chunked over threads when there are many."""
    def call(chunk: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in tokenizer(list(chunk), **kwargs)["input_ids"]] if chunk else []

    threads = min(MAX_THREADS, os.cpu_count() or 1, -(-len(texts) // CHUNK))
    if threads <= 1 or not getattr(tokenizer, "is_fast", False):  # a Python tokenizer holds the GIL
        return call(texts)
    # the first chunk on this thread: transformers sets the backend's truncation/padding state on
    # its first call, so the workers find it set and only read the tokenizer
    first = call(texts[:CHUNK])
    chunks = [texts[i:i + CHUNK] for i in range(CHUNK, len(texts), CHUNK)]
    with ThreadPoolExecutor(threads) as pool:
        return first + [ids for part in pool.map(call, chunks) for ids in part]


def prefix_token_id(tokenizer) -> int | None:
    """The token that stands in for an empty context: BOS, else EOS (lm-eval's ``prefix_token_id``)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def tok_encode_batch(tokenizer, texts: Sequence[str], add_bos_token: bool | None = None,
                     add_special_tokens: bool | None = None) -> list[list[int]]:
    """Token ids of each text with lm-eval's special-token rule (see the module docstring);
    one batched tokenizer call per rule (the same ids as one ``encode`` per text)."""
    if add_special_tokens is None and add_bos_token is True:
        bos = tokenizer.bos_token_id
        if bos is None:
            raise ValueError("add_bos_token: the tokenizer has no BOS token; use add_bos_token false or auto")
        return [ids if ids[:1] == [bos] else [bos, *ids] for ids in _encode(tokenizer, texts, add_special_tokens=False)]
    if add_special_tokens is not None:
        return _encode(tokenizer, texts, add_special_tokens=add_special_tokens)
    if add_bos_token is not None:
        return _encode(tokenizer, texts, add_special_tokens=add_bos_token)
    prefix = prefix_token_id(tokenizer)
    prefix_text = tokenizer.decode([prefix]) if prefix is not None else ""
    # a text that already starts with the BOS string gets no second one (lm-eval's has_bos_prefix)
    has_prefix = [bool(prefix_text) and text.startswith(prefix_text) for text in texts]
    plain = iter(_encode(tokenizer, [t for t, h in zip(texts, has_prefix) if h], add_special_tokens=False))
    default = iter(_encode(tokenizer, [t for t, h in zip(texts, has_prefix) if not h]))
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
