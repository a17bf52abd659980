"""Named training corpora: ``source: wmdp_bio_forget`` in a run config instead of a hub id.

Each name maps to a hub dataset at a revision, a split and a text column (docs/benchmarks.md):

=====================  =================================================  ==========  =========
name                   hub id (config)                                    split       column
=====================  =================================================  ==========  =========
``wmdp_bio_forget``    Unlearning/WMDP-Bio-Remove-Dataset                 train       text
``wmdp_bio_forget_corpus``  cais/wmdp-bio-forget-corpus (gated)            train       text
``wmdp_bio_retain``    cais/wmdp-corpora (bio-retain-corpus)              train       text
``wikitext``           EleutherAI/wikitext_document_level (wikitext-103-raw-v1)  train  page
``wikitext2``          Salesforce/wikitext (wikitext-2-raw-v1)            train       text
``wikitext103``        Salesforce/wikitext (wikitext-103-raw-v1)          train       text
``ultrachat``          HuggingFaceH4/ultrachat_200k                       train_sft   messages
=====================  =================================================  ==========  =========

A local file in the same columns stands in for a name: ``$UNLEARNING_DATA_DIR/<name>.jsonl``
(or ``.parquet`` / ``.json``). In a :class:`~unlearning.data.text.TextSource`, ``split``,
``revision`` and ``column`` override the name's own when set to other than their defaults
(``train``, unset, ``text``). Blank texts (WikiText's empty lines) are skipped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from unlearning.core.errors import DataError
from unlearning.data.files import read_rows
from unlearning.data.hub import LOCAL_SUFFIXES, HubDataset, load_hub_dataset, local_override


@dataclass(frozen=True)
class Corpus:
    """A named corpus: where it lives, which column holds the text, and what it is for."""

    name: str
    hub: HubDataset
    column: str  # the text column, or "messages" for chat data
    role: str  # forget / retain / chat
    note: str = ""


CORPORA: dict[str, Corpus] = {c.name: c for c in (
    Corpus("wmdp_bio_forget", HubDataset("Unlearning/WMDP-Bio-Remove-Dataset", None, "train", None), "text",
           "forget", "bio forget corpus used with the deep-ignorance models (also their tamper-attack data); "
                     "columns title, abstract, text"),
    Corpus("wmdp_bio_forget_corpus", HubDataset("cais/wmdp-bio-forget-corpus", None, "train", None), "text",
           "forget", "WMDP's original bio forget corpus (gated: request access on the hub); "
                     "columns title, abstract, text, doi"),
    Corpus("wmdp_bio_retain", HubDataset("cais/wmdp-corpora", "bio-retain-corpus", "train", None), "text",
           "retain", "WMDP's bio retain corpus (benign biology papers)"),
    Corpus("wikitext", HubDataset("EleutherAI/wikitext_document_level", "wikitext-103-raw-v1", "train", None),
           "page", "retain", "WikiText-103, one row per article"),
    Corpus("wikitext2", HubDataset("Salesforce/wikitext", "wikitext-2-raw-v1", "train",
                                   "b08601e04326c79dfdd32d625aee71d232d685c3"), "text", "retain",
           "WikiText-2, one row per line (blank lines skipped)"),
    Corpus("wikitext103", HubDataset("Salesforce/wikitext", "wikitext-103-raw-v1", "train",
                                     "b08601e04326c79dfdd32d625aee71d232d685c3"), "text", "retain",
           "WikiText-103, one row per line (blank lines skipped)"),
    Corpus("ultrachat", HubDataset("HuggingFaceH4/ultrachat_200k", None, "train_sft",
                                   "8049631c405ae6576f93f445c6b8166f76f5505a"), "messages", "chat",
           "UltraChat 200k dialogues, extra retain data; columns prompt, prompt_id, messages"),
)}


def is_corpus(source: str) -> bool:
    return source in CORPORA


def resolve(source: Any) -> tuple[Corpus, HubDataset, str]:
    """The corpus of a TextSource-like object (``source``, ``split``, ``revision``, ``column``),
    with its overrides applied: ``(corpus, hub dataset, text column)``."""
    corpus = CORPORA.get(source.source)
    if corpus is None:
        raise DataError(f"data source {source.source!r}: not a named corpus; known: {', '.join(CORPORA)}")
    hub = corpus.hub
    if getattr(source, "split", "train") not in (None, "train"):
        hub = dataclasses.replace(hub, split=source.split)
    if getattr(source, "revision", None):
        hub = dataclasses.replace(hub, revision=source.revision)
    column = source.column if getattr(source, "column", "text") not in (None, "text") else corpus.column
    return corpus, hub, column


def _record(row: dict[str, Any], column: str, where: str) -> dict[str, Any] | None:
    """``{"text"}`` (or ``{"messages"}`` for chat data); ``None`` for a blank text."""
    value = row.get(column)
    if column == "messages":
        if not isinstance(value, list) or not all(isinstance(m, dict) and "content" in m for m in value):
            raise DataError(f"{where}: 'messages' must be a list of {{role, content}} dicts")
        return {"messages": [{"role": str(m.get("role", "user")), "content": str(m["content"])} for m in value]}
    if not isinstance(value, str):
        raise DataError(f"{where}: column {column!r} must hold text, got {type(value).__name__}")
    return {"text": value} if value.strip() else None


def corpus_rows(source: Any) -> list[dict[str, Any]]:
    """Records of a named corpus: ``{"text"}`` or ``{"messages"}``, at most ``source.limit``.

    Read from ``$UNLEARNING_DATA_DIR/<name>.*`` when present, else from the hub (cache)."""
    corpus, hub, column = resolve(source)
    limit = getattr(source, "limit", None)
    what = f"data source {corpus.name}"
    path = local_override(corpus.name)
    if path is not None:
        rows: Any = read_rows(path, what, columns=(column,), suffixes=LOCAL_SUFFIXES,
                              fix="set the source's column to the text column")
        origin = str(path)
    else:
        hint = f"source: /path/file.jsonl, or $UNLEARNING_DATA_DIR/{corpus.name}.jsonl, with a {column!r} column"
        rows = load_hub_dataset(hub, what, hint)
        if column not in rows.column_names:
            raise DataError(f"{what}: {hub.describe()} has no column {column!r} (columns: {rows.column_names})")
        origin = hub.describe()
    out: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        record = _record(row, column, f"{what}: {origin}, row {i + 1}")
        if record is not None:
            out.append(record)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{what}: {origin} holds no non-blank {column!r} rows")
    return out
