"""Parity with lm-evaluation-harness on real MMLU questions and the real GPT-NeoX-20B tokenizer.

A tiny random GPT-NeoX carrying the real tokenizer is evaluated by lm-eval (``simple_evaluate``
with its ``hf`` model on the saved folder, and lm-eval's own MMLU task template pointed at local
parquet files) and by ours (``unlearn``'s loaders and ``evaluate``) on the same questions: per-question
log-likelihoods agree to 1e-4, predictions are identical, and task and group metrics agree.

Needs lm-eval (``pip install lm-eval==0.4.13``) and the real data (``bash .ci/optional_real_data.sh``);
skipped with the reason otherwise.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from unlearning.data import real as realdata
from unlearning.evaluation import evaluate
from unlearning.tasks import get_tasks

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install lm-eval==0.4.13")
pytestmark = pytest.mark.skipif(not realdata.ensure(), reason=realdata.skip_reason())

SUBJECTS = ("abstract_algebra", "anatomy", "high_school_geography")  # two STEM, one social science
LETTER_N, CLOZE_N = 20, 8  # questions per subject


def lm_eval_mmlu_dir() -> Path:
    return Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import datasets

    tmp = tmp_path_factory.mktemp("parity")
    test = datasets.load_dataset("parquet", data_files=str(realdata.mmlu_path("test")), split="train")
    dev = datasets.load_dataset("parquet", data_files=str(realdata.mmlu_path("dev")), split="train")
    rows = []
    for subject in SUBJECTS:
        sub = test.filter(lambda r, s=subject: r["subject"] == s)
        rows.append(sub.select(range(LETTER_N)))
        sub.select(range(LETTER_N)).to_parquet(str(tmp / f"{subject}.test.parquet"))
        sub.select(range(CLOZE_N)).to_parquet(str(tmp / f"{subject}.cloze.parquet"))
        dev.filter(lambda r, s=subject: r["subject"] == s).to_parquet(str(tmp / f"{subject}.dev.parquet"))
    datasets.concatenate_datasets(rows).to_parquet(str(tmp / "mmlu_part.parquet"))

    # A tiny random GPT-NeoX with the real tokenizer, saved as a model folder both sides load.
    tokenizer = realdata.load_tokenizer()
    config = transformers.GPTNeoXConfig(vocab_size=50304, hidden_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=128, max_position_embeddings=2048,
                                        bos_token_id=0, eos_token_id=0, initializer_range=0.1)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")

    # lm-eval tasks: its own MMLU template and per-subject description, data from local parquet.
    tasks_dir = tmp / "tasks"
    tasks_dir.mkdir()
    for subject in SUBJECTS:
        theirs = yaml.safe_load((lm_eval_mmlu_dir() / f"mmlu_{subject}.yaml").read_text())
        files = {"test": str(tmp / f"{subject}.test.parquet"), "dev": str(tmp / f"{subject}.dev.parquet")}
        letter = {"include": str(lm_eval_mmlu_dir() / "_default_template_yaml"), "task": f"parity_mmlu_{subject}",
                  "dataset_path": "parquet", "dataset_kwargs": {"data_files": files},
                  "description": theirs["description"]}
        (tasks_dir / f"parity_mmlu_{subject}.yaml").write_text(yaml.safe_dump(letter))
        cloze = {"task": f"parity_cloze_{subject}", "dataset_path": "parquet",
                 "dataset_kwargs": {"data_files": {"test": str(tmp / f"{subject}.cloze.parquet")}},
                 "test_split": "test", "output_type": "multiple_choice",
                 "doc_to_text": "Question: {{question.strip()}}\nAnswer:", "doc_to_choice": "{{choices}}",
                 "doc_to_target": "answer",
                 "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                 {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
        (tasks_dir / f"parity_cloze_{subject}.yaml").write_text(yaml.safe_dump(cloze))
    group = {"group": "parity_mmlu", "task": [f"parity_mmlu_{s}" for s in SUBJECTS],
             "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}]}
    (tasks_dir / "parity_mmlu.yaml").write_text(yaml.safe_dump(group))

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    theirs = simple_evaluate(model="hf", model_args=f"pretrained={tmp / 'model'},dtype=float32",
                             tasks=["parity_mmlu", *(f"parity_cloze_{s}" for s in SUBJECTS)], batch_size=4,
                             device="cpu", log_samples=True, task_manager=TaskManager(include_path=str(tasks_dir),
                                                                      include_defaults=False))

    from unlearning.model.loading import load_model
    model, tokenizer = load_model(tmp / "model", device="cpu", dtype="fp32")
    part = tmp / "mmlu_part.parquet"
    letter_tasks = [dataclasses.replace(t, groups=("parity_mmlu",))
                    for t in get_tasks([f"mmlu_{s}={part}" for s in SUBJECTS])]
    cloze_tasks = [dataclasses.replace(t, name=f"{t.name}_cloze", format="cloze", questions=t.questions[:CLOZE_N])
                   for t in get_tasks([f"mmlu_{s}={part}" for s in SUBJECTS])]
    ours = evaluate(model, tokenizer, letter_tasks + cloze_tasks, batch_size=5, log_samples=True)
    return theirs, ours


def paired(setup, ours_name: str, theirs_name: str):
    theirs, ours = setup
    mine = ours[ours_name]["samples"]
    other = sorted(theirs["samples"][theirs_name], key=lambda s: s["doc_id"])
    assert len(mine) == len(other) > 0
    return mine, other


@pytest.mark.parametrize("subject", SUBJECTS)
@pytest.mark.parametrize("kind", ["letter", "cloze"])
def test_per_question_loglikelihoods_and_predictions_match(setup, subject, kind):
    ours_name, theirs_name = ((f"mmlu_{subject}", f"parity_mmlu_{subject}") if kind == "letter"
                              else (f"mmlu_{subject}_cloze", f"parity_cloze_{subject}"))
    mine, other = paired(setup, ours_name, theirs_name)
    for a, b in zip(mine, other):
        lls = [float(r[0]) for r in b["filtered_resps"]]
        assert len(a["loglikelihoods"]) == len(lls) == 4
        assert max(abs(x - y) for x, y in zip(a["loglikelihoods"], lls)) < 1e-4, (a["id"], a["loglikelihoods"], lls)
        assert a["prediction"] == max(range(4), key=lambda i: lls[i])
        assert a["gold"] == b["target"]
    ours, theirs = setup[1][ours_name], setup[0]["results"][theirs_name]
    assert ours["acc"] == pytest.approx(theirs["acc,none"], abs=1e-12)
    if kind == "cloze":
        assert ours["acc_norm"] == pytest.approx(theirs["acc_norm,none"], abs=1e-12)


def test_letter_prompts_are_lm_evals(setup):
    mine, other = paired(setup, "mmlu_anatomy", "parity_mmlu_anatomy")
    for a, b in zip(mine, other):
        assert a["prompt"] == b["arguments"][0][0]  # context, description included
        assert b["arguments"][0][1] == " A"  # lm-eval's target delimiter + letter


def test_group_is_lm_evals_size_weighted_mean(setup):
    theirs, ours = setup
    group, expected = ours["parity_mmlu"], theirs["results"]["parity_mmlu"]
    assert group["n"] == len(SUBJECTS) * LETTER_N
    assert group["acc"] == pytest.approx(expected["acc,none"], abs=1e-12)
    assert group["acc_stderr"] == pytest.approx(expected["acc_stderr,none"], abs=1e-9)
