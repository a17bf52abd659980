"""Named training corpora (``source: wmdp_bio_forget``, ``wikitext``, ``ultrachat``, ...) on fixture
files in the hub datasets' columns, their overrides, and clear failures without the hub."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from tiny_models import tiny_tokenizer

from unlearning.data import corpora
from unlearning.data.text import TextSource, load_texts, tokenize
from unlearning.core.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures" / "corpora"


@pytest.fixture
def data_dir(monkeypatch):
    monkeypatch.setenv("UNLEARNING_DATA_DIR", str(FIXTURES))


@pytest.mark.parametrize("name", sorted(corpora.CORPORA))
def test_every_named_corpus_loads_from_its_fixture(data_dir, name):
    records = load_texts(TextSource(source=name))
    assert records and all(r["text"].strip() and r["text"] != "None" for r in records)
    data = tokenize(records, tiny_tokenizer(with_pad=True), seq_len=16, source=name)
    assert len(data) == len(records)


def test_columns_and_blank_rows(data_dir):
    wikitext = load_texts(TextSource(source="wikitext"))  # the 'page' column of the document-level set
    assert len(wikitext) == 3 and wikitext[0]["text"].startswith(" = Article 0 =")
    lines = load_texts(TextSource(source="wikitext2"))  # blank lines skipped
    assert [r["text"] for r in lines] == [" = Valkyria = \n", " The game was released in Japan . \n"]
    chat = load_texts(TextSource(source="ultrachat"))
    assert chat[0]["text"] == "User: What is a river?\nAssistant: A natural stream of water."
    forget = load_texts(TextSource(source="wmdp_bio_forget", limit=2))
    assert len(forget) == 2 and forget[0]["text"].startswith("Cells divide by mitosis.")


def test_overrides_of_split_revision_and_column():
    corpus, hub, column = corpora.resolve(TextSource(source="ultrachat"))
    assert (hub.path, hub.split, hub.revision, column) == (
        "HuggingFaceH4/ultrachat_200k", "train_sft", "8049631c405ae6576f93f445c6b8166f76f5505a", "messages")
    _, hub, column = corpora.resolve(TextSource(source="ultrachat", split="test_sft", revision="abc",
                                                column="prompt"))
    assert (hub.split, hub.revision, column) == ("test_sft", "abc", "prompt")
    _, hub, column = corpora.resolve(TextSource(source="wmdp_bio_retain"))
    assert (hub.path, hub.name, column) == ("cais/wmdp-corpora", "bio-retain-corpus", "text")


def test_wrong_column_in_a_local_file_names_it(data_dir):
    with pytest.raises(DataError, match="row 1: missing column 'title'"):
        load_texts(TextSource(source="wmdp_bio_retain", column="title"))


def test_offline_without_local_data_fails_at_once(monkeypatch, tmp_path):
    import datasets
    from huggingface_hub import constants
    monkeypatch.delenv("UNLEARNING_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    start = time.time()
    with pytest.raises(DataError) as err:
        load_texts(TextSource(source="wmdp_bio_forget"))
    assert time.time() - start < 20
    for part in ("Unlearning/WMDP-Bio-Remove-Dataset", "UNLEARNING_DATA_DIR", "HF_HUB_OFFLINE", "HF_HOME"):
        assert part in str(err.value)
