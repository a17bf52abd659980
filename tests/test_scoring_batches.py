"""The batched scoring loop (pre-built batches grown past batch_size, no attention mask, results read
once at the end) gives the values of a plain, unbatched reference: one request, one full forward,
lm-eval's arithmetic written out (tiny random GPT-NeoX, fp32)."""

from __future__ import annotations

import random

import pytest
import torch
from eval_setup import make_model

from unlearning.evaluation.batches import longest_first, plan_batches
from unlearning.evaluation.scoring import loglikelihood_tokens, next_token_loglikelihoods

VOCAB = 97


def reference(model, ctx: list[int], cont: list[int], limit: int) -> tuple[float, bool]:
    """lm-eval's ``_loglikelihood_tokens`` for one request: the input is ``(ctx + cont)`` cut to
    ``limit + 1`` tokens from the left, less its last; the continuation is read at the last positions."""
    inp = (ctx + cont)[-(limit + 1):][:-1]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([inp])).logits[0, -len(cont):]     # (len(cont), V)
    logprobs = logits.float().log_softmax(-1)
    target = torch.tensor(cont)
    return float(logprobs.gather(-1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


def requests(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    # many equal and near-equal lengths (batches grow past batch_size) and a long tail
    rng = random.Random(seed)
    lengths = [rng.choice([12, 13, 13, 14, 40, 41]) for _ in range(n - 3)] + [90, 70, 3]
    return [([rng.randrange(VOCAB) for _ in range(k)], [rng.randrange(VOCAB) for _ in range(rng.randint(1, 4))])
            for k in lengths]


@pytest.fixture(scope="module")
def model():
    return make_model(VOCAB, max_positions=128).eval()


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_loglikelihood_tokens_equals_unbatched_reference(model, batch_size):
    pairs = requests(60)
    limit = 64  # the 90-token request is cut from the left
    got = loglikelihood_tokens(model, pairs, batch_size=batch_size, max_length=limit, progress=False)
    for (ctx, cont), ll in zip(pairs, got):
        value, greedy = reference(model, ctx, cont, limit)
        assert float(ll) == pytest.approx(value, abs=1e-5) and ll.is_greedy == greedy


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_next_token_loglikelihoods_equals_unbatched_reference(model, batch_size):
    pairs = requests(50, seed=1)
    contexts = [ctx for ctx, _ in pairs]
    rng = random.Random(2)
    candidates = [rng.sample(range(VOCAB), rng.choice([2, 4])) for _ in contexts]  # ragged on purpose
    limit = 64
    got = next_token_loglikelihoods(model, contexts, candidates, batch_size=batch_size, max_length=limit,
                                    progress=False)
    for ctx, cands, lls in zip(contexts, candidates, got):
        assert len(lls) == len(cands)
        for c, ll in zip(cands, lls):
            # one token after the context: the reference request (context, [candidate])
            value, greedy = reference(model, ctx, [c], limit)
            assert float(ll) == pytest.approx(value, abs=1e-5) and ll.is_greedy == greedy


def test_empty_inputs_score_nothing(model):
    assert loglikelihood_tokens(model, [], progress=False) == []
    assert next_token_loglikelihoods(model, [], [], progress=False) == []


def test_plan_batches_covers_every_row_once_within_the_budget():
    rng = random.Random(3)
    rows = [[0] * rng.choice([5, 6, 6, 7, 30, 31, 80]) for _ in range(300)]
    lengths, order = [len(r) for r in rows], longest_first(rows)
    scored = [rng.randint(1, 3) for _ in rows]
    for batch_size in (1, 8, 32):
        plan = plan_batches(order, lengths, scored, batch_size, max_scored=40)
        assert [i for b in plan for i in b] == order                      # longest first, each row once
        budget = batch_size * lengths[order[0]]
        cap = max(40, sum(scored[i] for i in order[:batch_size]))
        for b in plan:
            assert len(b) * lengths[b[0]] <= budget
            assert sum(scored[i] for i in b) <= max(cap, sum(scored[i] for i in b[:batch_size]))
            # no batch is smaller than batch_size but the last; growth only with rows near its width
            assert len(b) >= batch_size or b is plan[-1]
            assert all(lengths[i] >= 0.9 * lengths[b[0]] for i in b[batch_size:])
        assert any(len(b) > batch_size for b in plan)                    # grown where lengths repeat


def test_tokenizing_on_threads_gives_the_ids_of_one_call(monkeypatch):
    from eval_setup import make_tokenizer

    from unlearning.evaluation import tokens
    tok = make_tokenizer()
    rng = random.Random(4)
    texts = ["".join(rng.choice("the virus host A B\n") for _ in range(rng.randint(1, 60))) for _ in range(50)]
    expected = [tok(t)["input_ids"] for t in texts]
    monkeypatch.setattr(tokens, "CHUNK", 7)  # 8 chunks: the first on this thread, the rest on workers
    monkeypatch.setattr(tokens.os, "cpu_count", lambda: 4)
    assert tokens.tok_encode_batch(tok, texts) == expected
