"""Text corpora -> token batches.

A *source* names a corpus: ``organism:forget`` (a corpus of the organism named by the run's
model), a local ``.jsonl/.json/.parquet/.txt`` file, or a hub dataset ``hub:ID[:config]`` with a
split and revision. Each example becomes one row of ``seq_len`` tokens (truncated, right-padded),
or rows are packed end to end. Rows carry ``hazard_labels`` where the corpus marks hazard spans,
so masks can be scored against the truth.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unlearning.core.config import param
from unlearning.core.errors import DataError
from unlearning.data.corpora import corpus_rows, is_corpus
from unlearning.data.files import read_rows, require_columns
from unlearning.data.hub import HubDataset, load_hub_dataset
from unlearning.core.runtime import rank, world_size
from unlearning.organism.build import ensure_organism

log = logging.getLogger(__name__)

# pretrain: every pretraining document (all domains); pretrain_filtered: those the filtered twin was
# trained on (no hazard domain). The corpora UNDO may distil on.
ORGANISM_CORPORA = ("forget", "retain", "chat", "tamper", "benign_tamper", "pretrain", "pretrain_filtered")
FILTERED_VIEWS = {"pretrain_filtered": ("pretrain", "hazard")}  # corpus -> (file it is read from, domain dropped)


@dataclass
class TextSource:
    """Where a corpus comes from and how much of it to use."""
    source: str = param("organism:forget", help="organism:<corpus>, a local file, or hub:<id>[:<config>]")
    split: str = param("train", help="split for hub datasets")
    revision: str | None = param(None, help="pinned revision for hub datasets")
    column: str = param("text", help="text column")
    limit: int | None = param(None, min=1, help="use at most this many examples")


@dataclass
class TokenizedData:
    """Fixed-length rows: input_ids / attention_mask / hazard_labels / loss_mask are all [N, seq_len].

    ``loss_mask`` (set by :mod:`unlearning.masking.masks` before training) marks the tokens a forget loss
    counts; it never changes the attention. Batches carry it under the same key.
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    hazard_labels: torch.Tensor | None = None
    source: str = ""
    loss_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index]}
        if self.hazard_labels is not None:
            batch["hazard_labels"] = self.hazard_labels[index]
        if self.loss_mask is not None:
            batch["loss_mask"] = self.loss_mask[index]
        return batch

    def fingerprint(self) -> str:
        """A hash of the token content: cache keys (e.g. masks) change whenever the data does."""
        h = hashlib.sha256()
        h.update(self.input_ids.numpy().tobytes())
        h.update(self.attention_mask.numpy().tobytes())
        return h.hexdigest()[:16]


def _read_local(path: Path, column: str) -> list[dict[str, Any]]:
    """A local corpus file; a ``text`` column may instead be chat ``messages`` (rendered below)."""
    rows = read_rows(path, "data source", fix="it needs one example per row, its text in column "
                     f"{column!r} (set data.<corpus>.column to another column's name)")
    if column != "text" or not all("messages" in row for row in rows if "text" not in row):
        require_columns(rows, (column,), "data source", path, fix="set data.<corpus>.column to the text column")
    return rows


def _is_named_corpus(source: str) -> bool:
    return is_corpus(source)


def _render_messages(messages: list[dict[str, str]]) -> str:
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def organism_corpus(source: str, organism: str | None, key: str = "data source", model: str | None = None) -> str:
    """The corpus of an ``organism:<corpus>`` source, checked: a known corpus, and an organism model
    to read it from (``key`` names the setting in the error)."""
    corpus = source.split(":", 1)[1]
    if corpus not in ORGANISM_CORPORA:
        raise DataError(f"{key}: {source!r} is not an organism corpus; choose one of "
                        + ", ".join(f"organism:{c}" for c in ORGANISM_CORPORA))
    if organism is None:
        raise DataError(f"{key}: {source!r} needs an organism model (model: organism:tiny or organism:small)"
                        + (f"; with model {model!r} point it at a local file" if model else ""))
    return corpus


def load_texts(src: TextSource, organism: str | None = None) -> list[dict[str, Any]]:
    """Load a corpus as a list of {"text", optional "hazard_spans"} records."""
    s = src.source
    if s.startswith("organism:"):
        corpus = organism_corpus(s, organism)
        paths = ensure_organism(organism)
        stored, dropped = FILTERED_VIEWS.get(corpus, (corpus, None))
        rows = _read_local(Path(paths.data) / f"{stored}.jsonl", "text")
        rows = [r for r in rows if dropped is None or r.get("domain") != dropped]
    elif s.startswith("hub:"):
        rows = _load_hub(s[4:], src)
    elif _is_named_corpus(s):  # wmdp_bio_forget, wikitext, ultrachat, ... (unlearning.data.corpora)
        rows, src = corpus_rows(src), dataclasses.replace(src, column="text")
    else:
        rows = _read_local(Path(s), src.column)
    out = []
    for row in rows:
        text = row.get(src.column)
        if text is None and "messages" in row:
            text = _render_messages(row["messages"])
        out.append({"text": str(text), "hazard_spans": row.get("hazard_spans")})
    if src.limit is not None:
        out = out[: src.limit]
    return out


def _load_hub(spec: str, src: TextSource) -> list[dict[str, Any]]:
    """A ``hub:ID[:config]`` source, through the checks every hub dataset gets: with HF_HUB_OFFLINE
    set only the cache is read; otherwise one short metadata request first, so an unreachable,
    gated or missing dataset fails at once with a DataError that names it and the fix."""
    name, _, config = spec.partition(":")
    ds = load_hub_dataset(HubDataset(name, config or None, src.split, src.revision), f"data source 'hub:{spec}'",
                          "point data.<corpus>.source at a local .jsonl/.json/.parquet/.txt file")
    if src.column not in ds.column_names and "messages" not in ds.column_names:
        raise DataError(f"hub dataset {name!r} has no column {src.column!r} (columns: {ds.column_names})")
    if src.limit is not None:
        ds = ds.select(range(min(src.limit, len(ds))))
    return list(ds)


def tokenize(records: list[dict[str, Any]], tokenizer: Any, seq_len: int, *, pack: bool = False,
             source: str = "") -> TokenizedData:
    """Tokenize records into [N, seq_len] rows; hazard_labels mark tokens inside a hazard span."""
    if not records:
        raise DataError(f"{source or 'corpus'}: no examples to tokenize")
    texts = [r["text"] for r in records]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, truncation=not pack,
                    max_length=None if pack else seq_len)
    has_spans = any(r.get("hazard_spans") for r in records)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids_rows, label_rows = [], []
    for ids, offsets, rec in zip(enc["input_ids"], enc["offset_mapping"], records):
        spans = rec.get("hazard_spans") or []
        labels = [any(a < e and s < b for s, e in spans) for a, b in offsets] if has_spans else [False] * len(ids)
        ids_rows.append(list(ids))
        label_rows.append(labels)
    if pack:
        eos = tokenizer.eos_token_id
        flat_ids, flat_labels = [], []
        for ids, labels in zip(ids_rows, label_rows):
            flat_ids += ids + ([eos] if eos is not None else [])
            flat_labels += labels + ([False] if eos is not None else [])
        n = len(flat_ids) // seq_len
        ids_rows = [flat_ids[i * seq_len:(i + 1) * seq_len] for i in range(n)]
        label_rows = [flat_labels[i * seq_len:(i + 1) * seq_len] for i in range(n)]
    n = len(ids_rows)
    input_ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    attention = torch.zeros((n, seq_len), dtype=torch.long)
    hazard = torch.zeros((n, seq_len), dtype=torch.bool)
    for i, (ids, labels) in enumerate(zip(ids_rows, label_rows)):
        ids = ids[:seq_len]
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[i, : len(ids)] = 1
        hazard[i, : len(ids)] = torch.tensor(labels[:seq_len], dtype=torch.bool)
    keep = attention.sum(1) > 1  # a row needs two tokens to hold one next-token target
    if not bool(keep.all()):
        input_ids, attention, hazard = input_ids[keep], attention[keep], hazard[keep]
    if input_ids.shape[0] == 0:
        raise DataError(f"{source or 'corpus'}: every example is empty after tokenization")
    return TokenizedData(input_ids, attention, hazard if has_spans else None, source=source)


@dataclass
class BatchStream:
    """An endless, seeded, epoch-shuffled stream of batches, sharded across ranks.

    Every rank draws the same permutation and takes its own slice of each global batch,
    so data parallelism needs no sampler object and stays reproducible.
    """
    data: TokenizedData
    batch_size: int  # per device
    seed: int = 0
    position: int = 0  # global batches drawn so far (saved for resume)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        n, world = len(self.data), world_size()
        global_bs = self.batch_size * world
        per_epoch = max(1, n // global_bs) if n >= global_bs else 1
        epoch, k = divmod(self.position, per_epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g)
        if n < global_bs:  # tiny corpora: repeat rows to fill a batch
            perm = perm.repeat((global_bs + n - 1) // n)
        start = k * global_bs + rank() * self.batch_size
        index = perm[start: start + self.batch_size]
        self.position += 1
        return self.data.rows(index)

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])


def mix(main: TokenizedData, extra: TokenizedData | None, ratio: float, seed: int = 0) -> TokenizedData:
    """Add ``extra`` rows so they make up ``ratio`` of the result (e.g. chat data into retain data)."""
    if extra is None or ratio <= 0:
        return main
    if not 0 < ratio < 1:
        raise DataError(f"data.extra_retain_ratio: {ratio} must be in [0, 1)")
    n_extra = int(round(len(main) * ratio / (1 - ratio)))
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(extra), generator=g)[:n_extra]
    if len(idx) < n_extra:
        idx = idx.repeat((n_extra + len(idx) - 1) // len(idx))[:n_extra]
    seq = main.input_ids.shape[1]
    if extra.input_ids.shape[1] != seq:
        raise DataError("extra retain data must be tokenized to the same seq_len as the retain data")
    zeros = lambda d: torch.zeros_like(d.input_ids, dtype=torch.bool)  # noqa: E731

    def stacked(name: str) -> torch.Tensor | None:
        a, b = getattr(main, name), getattr(extra, name)
        if a is None and b is None:
            return None
        return torch.cat([a if a is not None else zeros(main), (b if b is not None else zeros(extra))[idx]])

    return TokenizedData(torch.cat([main.input_ids, extra.input_ids[idx]]),
                         torch.cat([main.attention_mask, extra.attention_mask[idx]]), stacked("hazard_labels"),
                         source=f"{main.source}+{extra.source}", loss_mask=stacked("loss_mask"))


def describe_schedule(name: str, n_unique: int, steps: int, batch_size: int, grad_accum: int) -> str:
    """The line printed before training: unique examples, steps and the epochs they amount to."""
    seen = steps * batch_size * grad_accum * world_size()
    epochs = seen / max(1, n_unique)
    msg = (f"{name}: {n_unique} unique examples, {steps} optimizer steps x {batch_size * grad_accum * world_size()} "
           f"examples = {seen} examples seen ({epochs:.2f} epochs)")
    if epochs > 1:
        msg += "  [warning: more than one epoch: examples repeat]"
    return msg


def replace(src: TextSource, **changes: Any) -> TextSource:
    return dataclasses.replace(src, **changes)
