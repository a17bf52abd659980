"""Parity with lm-evaluation-harness itself (runs when ``lm_eval`` is importable, else skipped):
the same requests through ``HFLM.loglikelihood`` and through ours give the same log-likelihoods
(1e-4) and the same is-greedy flags, with lm-eval's default BOS handling for two kinds of
tokenizer, left truncation, a context with a trailing space, and an empty context."""

from __future__ import annotations

import random

import pytest
from eval_setup import CHOICES, WORDS, make_model, make_tokenizer

from unlearning.evaluation import loglikelihoods
from unlearning.evaluation.prompts import cloze_prompt, letter_prompt

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval)")


def parity_requests(seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    requests = []
    for _ in range(10):
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30))) + "?"
        for ctx, conts in (letter_prompt(question, CHOICES, "high_school_biology"),
                           cloze_prompt(question, CHOICES)):
            requests += [(ctx, c) for c in conts]
    return requests + [("the virus binds ", "the receptor"), ("", "the virus binds")]


@pytest.mark.parametrize("bos_template", [False, True], ids=["neox-like", "llama-like"])
def test_loglikelihoods_match_hflm(bos_template):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    tokenizer = make_tokenizer(bos_template=bos_template)
    model = make_model(len(tokenizer), max_positions=64)  # some requests exceed it: left truncation
    requests = parity_requests()
    hflm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=4)
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i) for i, r in enumerate(requests)]
    theirs = hflm.loglikelihood(instances, disable_tqdm=True)
    ours = loglikelihoods(model, tokenizer, requests, batch_size=7, progress=False)
    assert max(abs(t[0] - o) for t, o in zip(theirs, ours)) < 1e-4
    assert [t[1] for t in theirs] == [o.is_greedy for o in ours]


def test_task_pipeline_matches_lm_eval(tmp_path):
    """lm-eval's own task machinery (WMDP/MMLU letter template and the question template, from a
    local file) builds the same prompts and gives the same log-likelihoods and metrics as ours."""
    import json

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from unlearning.evaluation import evaluate
    from unlearning.tasks import get_tasks

    rng = random.Random(5)
    rows = [{"question": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 20))) + "? ",
             "choices": CHOICES, "answer": rng.randrange(4), "subject": "college_biology"} for _ in range(8)]
    path = tmp_path / "mmlu_like.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer))
    base = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}}, "test_split": "test",
            "output_type": "multiple_choice", "doc_to_target": "answer", "num_fewshot": 0,
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
    letter = dict(base, task="parity_letter", doc_to_choice=["A", "B", "C", "D"],
                  description="The following are multiple choice questions (with answers) about college biology.\n\n",
                  doc_to_text="{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                              "D. {{choices[3]}}\nAnswer:")
    cloze = dict(base, task="parity_cloze", doc_to_text="Question: {{question.strip()}}\nAnswer:",
                 doc_to_choice="{{choices}}")
    hflm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=4)
    theirs = simple_evaluate(model=hflm, tasks=[letter, cloze], log_samples=True, bootstrap_iters=1000,
                             task_manager=TaskManager(include_defaults=False))  # skip indexing every task
    ours = evaluate(model, tokenizer, get_tasks(f"{path},{path}:cloze"), log_samples=True)
    for their_name, our_name, metrics in (("parity_letter", str(path), ("acc",)),
                                          ("parity_cloze", f"{path}:cloze", ("acc", "acc_norm"))):
        for t, o in zip(theirs["samples"][their_name], ours[our_name]["samples"], strict=True):
            assert all(context == o["prompt"] for context, _ in t["arguments"])
            their_lls = [r[0] for r in t["filtered_resps"]]
            assert max(abs(a - b) for a, b in zip(their_lls, o["loglikelihoods"])) < 1e-4
        for metric in metrics:
            assert ours[our_name][metric] == pytest.approx(theirs["results"][their_name][f"{metric},none"])
            assert ours[our_name][f"{metric}_stderr"] == pytest.approx(
                theirs["results"][their_name][f"{metric}_stderr,none"])
