"""Evaluation: exact lm-eval prompt strings, tokenization, padding invariance, the letter fast path,
scores and metrics. Tiny random GPT-NeoX models and tokenizers (eval_setup.py); task files and their
errors: test_eval_tasks.py."""

from __future__ import annotations

import importlib
import json
import math
import pickle
import random

import numpy as np
import pytest
import torch
from eval_setup import WORDS, make_model, make_tokenizer, random_question

from unlearning.core.errors import NonFiniteScoreError
from unlearning.evaluation import Task, evaluate, loglikelihoods
from unlearning.evaluation.evaluate import mean_stderr, pooled_stderr, score_question
from unlearning.evaluation.prompts import cloze_prompt, letter_prompt, subject_header
from unlearning.evaluation.scoring import encode_pair, next_token_loglikelihoods, tok_encode

# the package exports the function ``evaluate``, which shadows the submodule's name
evaluate_module = importlib.import_module("unlearning.evaluation.evaluate")


def reference_loglikelihood(model, ctx: list[int], cont: list[int]) -> float:
    """One unpadded sequence, positions read by hand: the independent reference."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = model(ids).logits[0].float().log_softmax(-1)
    return sum(logprobs[len(ctx) - 1 + k, tok].item() for k, tok in enumerate(cont))


# --------------------------------------------------------------------------------------------- prompts


def test_letter_prompt_is_lm_eval_wmdp_format():
    context, continuations = letter_prompt("  What binds the receptor?\n", ["a", "b", "c", "d"], "biology")
    assert context == ("The following are multiple choice questions (with answers) about biology.\n\n"
                       "What binds the receptor?\nA. a\nB. b\nC. c\nD. d\nAnswer:")
    assert continuations == [" A", " B", " C", " D"]


def test_mmlu_subject_header_turns_underscores_into_spaces():
    assert subject_header("high_school_biology") == \
        "The following are multiple choice questions (with answers) about high school biology.\n\n"


def test_cloze_prompt_is_question_format():
    context, continuations = cloze_prompt(" Which host? ", ["bat", "the cave rat"])
    assert context == "Question: Which host?\nAnswer:"
    assert continuations == [" bat", " the cave rat"]


def test_letter_prompt_needs_four_choices():
    with pytest.raises(ValueError, match="exactly 4"):
        letter_prompt("q", ["a", "b", "c"], "biology")


# --------------------------------------------------------------------------------------------- tokenization


def test_encode_pair_moves_trailing_space_and_splits_whole_encoding(tokenizer):
    ctx, cont = encode_pair(tokenizer, "what is the ", "virus")
    assert ctx == tokenizer.encode("what is the", add_special_tokens=False)
    whole = tokenizer.encode("what is the virus", add_special_tokens=False)
    assert ctx + cont == whole and len(cont) >= 1


def test_bos_handling_follows_hflm(tokenizer):
    bos = tokenizer.bos_token_id
    plain = tokenizer.encode("the virus", add_special_tokens=False)
    assert tok_encode(tokenizer, "the virus") == plain  # GPT-NeoX-like: adds nothing by itself
    assert tok_encode(tokenizer, "the virus", add_bos_token=True) == [bos, *plain]
    llama_like = make_tokenizer(bos_template=True)
    plain = llama_like.encode("the virus", add_special_tokens=False)
    assert tok_encode(llama_like, "the virus") == [bos, *plain]  # the tokenizer's own default
    assert tok_encode(llama_like, "the virus", add_bos_token=False) == plain
    assert tok_encode(llama_like, "<|endoftext|>the virus") == [bos, *plain]  # no second BOS
    # the context keeps its BOS; the continuation is what follows the context in the whole encoding
    ctx, cont = encode_pair(llama_like, "what is", " the virus")
    assert ctx[0] == bos and ctx[1:] + cont == llama_like.encode("what is the virus", add_special_tokens=False)


def test_empty_context_uses_prefix_token(tokenizer):
    ctx, cont = encode_pair(tokenizer, "", "the virus")
    assert ctx == [tokenizer.bos_token_id] and cont == tokenizer.encode("the virus", add_special_tokens=False)


# --------------------------------------------------------------------------------------------- scoring


def test_batching_and_padding_change_no_loglikelihood(model, tokenizer):
    rng = random.Random(1)
    requests = []
    for i in range(30):
        q = random_question(rng, i)
        ctx, conts = (letter_prompt(q.question, q.choices, "biology") if i % 2
                      else cloze_prompt(q.question, q.choices))
        requests.append((ctx, rng.choice(conts)))
    one = loglikelihoods(model, tokenizer, requests, batch_size=1, progress=False)
    for batch_size in (3, 8, 64):
        batched = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, progress=False)
        assert max(abs(a - b) for a, b in zip(one, batched)) < 1e-4
        assert [a.is_greedy for a in one] == [b.is_greedy for b in batched]
    lengths = {len(tok_encode(tokenizer, c + x)) for c, x in requests}
    assert len(lengths) > 10  # the batches really mixed lengths
    for (ctx, cont), ll in zip(requests[:6], one):
        c, x = encode_pair(tokenizer, ctx, cont)
        assert abs(reference_loglikelihood(model, c, x) - ll) < 1e-4


def test_long_requests_are_truncated_from_the_left(model, tokenizer):
    ctx_text = " ".join(WORDS * 4)
    c, x = encode_pair(tokenizer, ctx_text, " the virus host")
    limit = 16
    assert len(c) + len(x) > limit + 1
    (ll,) = loglikelihoods(model, tokenizer, [(ctx_text, " the virus host")], max_length=limit, progress=False)
    kept = (c + x)[-(limit + 1):]
    assert abs(reference_loglikelihood(model, kept[:len(kept) - len(x)], x) - ll) < 1e-4


def test_loglikelihood_is_a_float_with_is_greedy(model, tokenizer):
    (ll,) = loglikelihoods(model, tokenizer, [("the virus", " host")], progress=False)
    assert isinstance(ll, float) and ll < 0 and isinstance(ll.is_greedy, bool)
    again = pickle.loads(pickle.dumps(ll))
    assert float(again) == float(ll) and again.is_greedy == ll.is_greedy
    assert json.loads(json.dumps([ll])) == [float(ll)]


def test_training_mode_is_restored(model, tokenizer):
    model.train()
    loglikelihoods(model, tokenizer, [("the virus", " host")], progress=False)
    assert model.training
    model.eval()


def test_fast_letter_path_equals_general_path(model, tokenizer, monkeypatch):
    rng = random.Random(2)
    task = Task("letters", [random_question(rng, i) for i in range(20)], format="letter", subject="biology")
    calls = {"fast": 0}
    real = evaluate_module.next_token_loglikelihoods

    def counting(*args, **kwargs):
        calls["fast"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "next_token_loglikelihoods", counting)
    fast = evaluate(model, tokenizer, [task], batch_size=6, log_samples=True)["letters"]
    assert calls["fast"] == 1  # each " A".." D" is one token here, so the fast path ran
    general = evaluate(model, tokenizer, [task], batch_size=6, log_samples=True, fast_letter=False)["letters"]
    assert calls["fast"] == 1
    for a, b in zip(fast["samples"], general["samples"]):
        assert np.allclose(a["loglikelihoods"], b["loglikelihoods"], atol=1e-5)
        assert a["prediction"] == b["prediction"] and a["is_greedy"] == b["is_greedy"]
    assert fast["acc"] == general["acc"]
    # and the fast scorer itself equals the request-level API
    ctx, conts = letter_prompt(task.questions[0].question, task.questions[0].choices, "biology")
    expected = loglikelihoods(model, tokenizer, [(ctx, c) for c in conts], progress=False)
    c0 = encode_pair(tokenizer, ctx, conts[0])[0]
    (got,) = next_token_loglikelihoods(model, [c0], [[encode_pair(tokenizer, ctx, c)[1][0] for c in conts]])
    assert np.allclose(got, expected, atol=1e-5)


def test_multi_token_letters_fall_back_to_general_path(monkeypatch):
    tokenizer = make_tokenizer(vocab_size=257)  # no merges: " A" is two tokens
    assert len(tokenizer.encode(" A")) == 2
    model = make_model(len(tokenizer))
    rng = random.Random(3)
    task = Task("letters", [random_question(rng, i) for i in range(4)], format="letter", subject="biology")
    monkeypatch.setattr(evaluate_module, "next_token_loglikelihoods",
                        lambda *a, **k: pytest.fail("fast path used for multi-token letters"))
    result = evaluate(model, tokenizer, [task], log_samples=True)["letters"]
    q = task.questions[0]
    ctx, conts = letter_prompt(q.question, q.choices, "biology")
    expected = loglikelihoods(model, tokenizer, [(ctx, c) for c in conts], progress=False)
    assert np.allclose(result["samples"][0]["loglikelihoods"], expected, atol=1e-5)


def test_nan_model_is_an_error_not_an_accuracy(tokenizer):
    broken = make_model(len(tokenizer), seed=1)
    with torch.no_grad():
        broken.get_output_embeddings().weight[0, 0] = float("nan")
    task = Task("t", [random_question(random.Random(7), 0)], format="cloze")
    with pytest.raises(NonFiniteScoreError, match="question 'q0'"):
        evaluate(broken, tokenizer, [task])


def test_bf16_autocast_path_runs_close_to_fp32(model, tokenizer):
    requests = [("what is the virus", " host"), ("the cell line of the", " bat")]
    fp32 = loglikelihoods(model, tokenizer, requests, progress=False)
    bf16 = loglikelihoods(model, tokenizer, requests, mixed_precision=True, progress=False)
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.2 and fp32 != bf16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_scores_match_cpu(tokenizer):
    cpu_model = make_model(len(tokenizer))
    requests = [("what is the virus", " host binds"), ("the cell line of the", " bat")] * 5
    cpu = loglikelihoods(cpu_model, tokenizer, requests, progress=False)
    gpu_model = make_model(len(tokenizer)).cuda()
    exact = loglikelihoods(gpu_model, tokenizer, requests, mixed_precision=False, progress=False)
    assert max(abs(a - b) for a, b in zip(cpu, exact)) < 1e-3
    autocast = loglikelihoods(gpu_model, tokenizer, requests, progress=False)  # bf16 by default on GPU
    assert max(abs(a - b) for a, b in zip(cpu, autocast)) < 0.2


# --------------------------------------------------------------------------------------------- metrics


def test_question_scores_on_hand_made_loglikelihoods():
    choices = ["ab", "abcdefgh", "a", "abcd"]
    lls = [-4.0, -6.0, -3.0, -5.0]
    scores = score_question(lls, choices, gold=1, format="cloze")
    assert scores["prediction"] == 2 and scores["acc"] == 0.0
    # per character: -2, -0.75, -3, -1.25 -> choice 1
    assert scores["prediction_norm"] == 1 and scores["acc_norm"] == 1.0
    probs = np.exp(lls) / np.exp(lls).sum()
    assert scores["correct_prob"] == pytest.approx(probs[1])
    assert scores["correct_prob"] == pytest.approx(math.exp(-6) / sum(math.exp(x) for x in lls))
    assert "correct_prob" not in score_question(lls, choices, gold=2, format="letter")


def test_stderr_is_sample_std_over_sqrt_n():
    values = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    assert mean_stderr(values) == pytest.approx(np.std(values, ddof=1) / math.sqrt(len(values)))
    assert mean_stderr([1.0]) is None
    # lm-eval's pooled_sample_stderr, worked by hand for two subtasks
    se, n = [0.1, 0.2], [10, 30]
    expected = math.sqrt(((9 * 0.01 * 10) + (29 * 0.04 * 30)) / (40 - 2) / 40)
    assert pooled_stderr(se, n) == pytest.approx(expected)


def test_results_shape_attributes_limit_and_groups(model, tokenizer):
    rng = random.Random(4)
    a = Task("a", [random_question(rng, i, attribute=["host", "receptor"][i % 2]) for i in range(6)],
             format="cloze", groups=("both",))
    b = Task("b", [random_question(rng, i) for i in range(3)], format="cloze", groups=("both",))
    results = evaluate(model, tokenizer, [a, b], batch_size=5, log_samples=True)
    ra = results["a"]
    assert ra["format"] == "cloze" and ra["n"] == 6
    for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "correct_prob", "correct_prob_stderr"):
        assert isinstance(ra[key], float)
    assert set(ra["by_attribute"]) == {"host", "receptor"} and ra["by_attribute"]["host"]["n"] == 3
    assert ra["acc"] == pytest.approx(np.mean([s["acc"] for s in ra["samples"]]))
    assert ra["correct_prob"] == pytest.approx(np.mean([s["correct_prob"] for s in ra["samples"]]))
    s = ra["samples"][0]
    assert s["id"] == "q0" and s["prompt"].startswith("Question: ") and len(s["loglikelihoods"]) == 4
    assert s["gold"] == a.questions[0].answer and s["prediction"] == int(np.argmax(s["loglikelihoods"]))
    group = results["both"]
    all_acc = [x["acc"] for x in ra["samples"] + results["b"]["samples"]]
    assert group["n"] == 9 and group["acc"] == pytest.approx(np.mean(all_acc))  # per-question mean
    assert group["subtasks"] == ["a", "b"]
    limited = evaluate(model, tokenizer, [a], limit=2)
    assert limited["a"]["n"] == 2 and "samples" not in limited["a"]
    json.dumps(results)  # results.json-ready
