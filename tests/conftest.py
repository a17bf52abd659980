"""Shared test set-up: CPU threads, a repo-local cache, and one tiny organism build for the session."""

from __future__ import annotations

import os
from pathlib import Path

# Before torch is imported: passive OpenMP waits (2-thread runs otherwise crawl on small machines).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
# Tests share one organism build: a repo-local cache survives between local runs and is built once in CI.
os.environ.setdefault("UNLEARNING_HOME", str(REPO / ".cache" / "unlearning"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture
def tmp_runs(tmp_path, monkeypatch):
    """Run directories go under a temp folder."""
    monkeypatch.setenv("UNLEARNING_RUNS", str(tmp_path / "runs"))
    return tmp_path / "runs"


@pytest.fixture(scope="session")
def tiny_organism():
    """The tiny organism (OrganismPaths) at its default seed, built once per cache and shared by the session."""
    from unlearning.organism import PRESETS, ensure_organism
    return ensure_organism("tiny", seed=PRESETS["tiny"].seed)


@pytest.fixture(scope="module")
def tokenizer():
    """The evaluation tests' tiny byte-level BPE (tests/eval_setup.py); a module may define its own."""
    from eval_setup import make_tokenizer
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    """A random tiny GPT-NeoX over ``tokenizer`` (tests/eval_setup.py)."""
    from eval_setup import make_model
    return make_model(len(tokenizer))
