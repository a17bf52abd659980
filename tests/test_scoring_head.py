"""The unembedding runs at the scored positions only, with the values of a full forward pass."""

from __future__ import annotations

import random

import pytest
import torch
from eval_setup import make_model, make_tokenizer

from unlearning.evaluation import scoring
from unlearning.evaluation.scoring import loglikelihoods, next_token_loglikelihoods
from unlearning.model.layers import get_parts
from unlearning.training.trainable import LoraSettings, add_lora

WORDS = ["the", "virus", "host", "binds", "receptor", "cell", "what", "is"]


def requests(n: int = 24, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))),
             " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))) for _ in range(n)]


def full_forward(monkeypatch):
    monkeypatch.setattr(scoring, "_split_head", lambda model: None)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def lora_model(tok):
    model = make_model(len(tok))
    model = add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0, init_b_std=0.5))
    return model.eval()


@pytest.mark.parametrize("wrap", ["plain", "lora"])
def test_scored_positions_equal_full_logits(tok, monkeypatch, wrap):
    model = make_model(len(tok)) if wrap == "plain" else lora_model(tok)
    assert scoring._split_head(model) is not None          # the fast path is the one under test
    reqs = requests()
    fast = loglikelihoods(model, tok, reqs, batch_size=5, progress=False)
    with monkeypatch.context() as m:
        full_forward(m)
        full = loglikelihoods(model, tok, reqs, batch_size=5, progress=False)
    assert [f.is_greedy for f in fast] == [f.is_greedy for f in full]
    assert torch.allclose(torch.tensor(fast), torch.tensor(full), rtol=0, atol=1e-5)


def test_letter_path_reads_the_last_position_alone(tok, monkeypatch):
    model = make_model(len(tok))
    contexts = [tok(c)["input_ids"] for c, _ in requests(16, seed=1)]
    letters = [[tok(" A")["input_ids"][-1], tok(" B")["input_ids"][-1]]] * len(contexts)
    fast = next_token_loglikelihoods(model, contexts, letters, batch_size=4, progress=False)
    with monkeypatch.context() as m:
        full_forward(m)
        full = next_token_loglikelihoods(model, contexts, letters, batch_size=4, progress=False)
    assert torch.allclose(torch.tensor(fast), torch.tensor(full), rtol=0, atol=1e-5)
    # the head saw one row per context, not one per position
    seen = []
    head = get_parts(model).lm_head
    handle = head.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    try:
        next_token_loglikelihoods(model, contexts, letters, batch_size=4, progress=False)
    finally:
        handle.remove()
    # (the first batch is batch_size rows; shorter rows fill later batches up to its token budget)
    assert sum(s[0] for s in seen) == len(contexts) and seen[0][0] == 4 and all(len(s) == 2 for s in seen)


def test_unknown_family_falls_back_to_the_full_forward(tok):
    model = make_model(len(tok))
    model.config.model_type = "some_new_family"
    assert scoring._split_head(model) is None
    model.config.model_type = "gpt_neox"
    model.config.logit_scale = 0.5   # a model whose logits are not just head(hidden)
    assert scoring._split_head(model) is None
