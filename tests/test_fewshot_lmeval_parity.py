"""5-shot MMLU against lm-evaluation-harness 0.4.13 itself, with contexts cut to a small max_length.

lm-eval builds its own requests: its MMLU task template (``lm_eval/tasks/mmlu/default``, sampler
``first_n`` over the ``dev`` split) and each subject's description, pointed at local files (one
test and one dev file per subject, as the hub's subject configs are), run by ``simple_evaluate``
with ``num_fewshot=5`` and ``HFLM(max_length=L)``. Ours reads one test file and one dev file
holding every subject, with the subjects' rows interleaved (so "the first 5 dev rows of the same
subject, in file order" is tested, not "the first 5 rows"). The request strings must be equal,
the log-likelihoods within 1e-4 (fp32), the predictions and accuracies identical; ``L`` is chosen
so that some prompts are cut from the left and others are not.

Two data sets: synthetic questions over the tests' byte-level BPE (always), and real MMLU dev and
test rows with the real GPT-NeoX-20B tokenizer (when ``bash .ci/optional_real_data.sh`` has run).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from eval_setup import WORDS, make_model, make_tokenizer

from unlearning.data import real as realdata
from unlearning.evaluation import evaluate
from unlearning.evaluation.prompts import build_prompt
from unlearning.evaluation.scoring import encode_pairs
from unlearning.tasks import get_tasks

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install lm-eval==0.4.13")

SUBJECTS = ("anatomy", "college_biology")
SHOTS = 5


def lm_eval_mmlu_dir() -> Path:
    return Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def synthetic_rows(seed: int = 3) -> tuple[list[dict], list[dict]]:
    """(test, dev): 4 test and 7 dev rows per subject, the subjects interleaved row by row."""
    rng = random.Random(seed)

    def row(subject: str) -> dict:
        words = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
        # a trailing space on some questions: doc_to_text strips it, as ours does
        return {"question": words(3, 40) + "?" + rng.choice(["", " "]), "subject": subject,
                "choices": [words(1, 4) for _ in range(4)], "answer": rng.randrange(4)}

    test = [row(s) for _ in range(4) for s in SUBJECTS]
    dev = [row(s) for _ in range(7) for s in SUBJECTS]
    return test, dev


def real_rows() -> tuple[list[dict], list[dict]]:
    import pandas as pd

    def take(split: str, n: int) -> list[dict]:
        frame = pd.read_parquet(realdata.mmlu_path(split))
        rows = []
        for subject in SUBJECTS:
            part = frame[frame["subject"] == subject].head(n)
            rows += [{"question": r.question, "subject": r.subject, "choices": [str(c) for c in r.choices],
                      "answer": int(r.answer)} for r in part.itertuples()]
        return rows
    return take("test", 6), take("dev", SHOTS)


def tiny_neox(vocab_size: int) -> transformers.PreTrainedModel:
    if vocab_size < 1000:
        return make_model(vocab_size, max_positions=2048)
    config = transformers.GPTNeoXConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=128, max_position_embeddings=2048,
                                        bos_token_id=0, eos_token_id=0, initializer_range=0.1)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def lm_eval_tasks(tmp: Path, test: list[dict], dev: list[dict]) -> Path:
    """A task folder: lm-eval's own MMLU template and descriptions, one local test/dev pair per subject."""
    folder = tmp / "lm_eval_tasks"
    folder.mkdir()
    for subject in SUBJECTS:
        theirs = yaml.safe_load((lm_eval_mmlu_dir() / f"mmlu_{subject}.yaml").read_text())
        files = {split: str(write_jsonl(tmp / f"{subject}.{split}.jsonl", [r for r in rows if r["subject"] == subject]))
                 for split, rows in (("test", test), ("dev", dev))}
        task = {"include": str(lm_eval_mmlu_dir() / "_default_template_yaml"), "task": f"fewshot_mmlu_{subject}",
                "dataset_path": "json", "dataset_kwargs": {"data_files": files},
                "description": theirs["description"]}
        (folder / f"fewshot_mmlu_{subject}.yaml").write_text(yaml.safe_dump(task))
    return folder


@pytest.fixture(scope="module", params=["synthetic", "real"])
def parity(request, tmp_path_factory):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if request.param == "real":
        if not realdata.ensure():
            pytest.skip(realdata.skip_reason())
        tokenizer, (test, dev) = realdata.load_tokenizer(), real_rows()
    else:
        tokenizer, (test, dev) = make_tokenizer(), synthetic_rows()
    tmp = tmp_path_factory.mktemp(f"fewshot_{request.param}")
    model = tiny_neox(len(tokenizer))
    test_file, dev_file = write_jsonl(tmp / "test.jsonl", test), write_jsonl(tmp / "dev.jsonl", dev)
    tasks = get_tasks([f"mmlu_{s}={test_file}" for s in SUBJECTS], num_fewshot=SHOTS, fewshot_data=str(dev_file))

    # max_length: the median request length, so some prompts are cut from the left and some are not
    prompts = [build_prompt("letter", q.question, q.choices, t.subject, fewshot=t.fewshot[:SHOTS])[0]
               for t in tasks for q in t.questions]
    lengths = sorted(len(c) + len(x) for c, x in encode_pairs(tokenizer, [(p, " A") for p in prompts]))
    max_length = lengths[len(lengths) // 2] - 1

    ours = evaluate(model, tokenizer, tasks, num_fewshot=SHOTS, log_samples=True, max_length=max_length,
                    batch_size=3)
    # the general scoring path too (one request per choice, as lm-eval runs them)
    general = evaluate(model, tokenizer, tasks, num_fewshot=SHOTS, log_samples=True, max_length=max_length,
                       batch_size=5, fast_letter=False)
    hflm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=4, max_length=max_length)
    theirs = simple_evaluate(model=hflm, tasks=[f"fewshot_mmlu_{s}" for s in SUBJECTS], num_fewshot=SHOTS,
                             log_samples=True, bootstrap_iters=0,
                             task_manager=TaskManager(include_path=str(lm_eval_tasks(tmp, test, dev)),
                                                      include_defaults=False))
    return {"ours": ours, "general": general, "theirs": theirs, "lengths": lengths, "max_length": max_length, "dev": dev}


def paired(parity, subject: str, ours: str = "ours"):
    mine = parity[ours][f"mmlu_{subject}"]["samples"]
    other = sorted(parity["theirs"]["samples"][f"fewshot_mmlu_{subject}"], key=lambda s: s["doc_id"])
    assert len(mine) == len(other) > 0
    return mine, other


@pytest.mark.parametrize("subject", SUBJECTS)
def test_fewshot_requests_are_lm_evals(parity, subject):
    mine, other = paired(parity, subject)
    for a, b in zip(mine, other):
        assert [arg[0] for arg in b["arguments"]] == [a["prompt"]] * 4  # the exact context string
        assert [arg[1] for arg in b["arguments"]] == [" A", " B", " C", " D"]
    # the examples are this subject's first 5 dev rows, in file order, after the description
    prompt = mine[0]["prompt"]
    dev = [r for r in parity["dev"] if r["subject"] == subject]
    starts = [prompt.index(r["question"].strip() + "\nA. ") for r in dev[:SHOTS]]
    assert starts == sorted(starts) and starts[0] == len(f"The following are multiple choice questions (with "
                                                          f"answers) about {subject.replace('_', ' ')}.\n\n")
    assert prompt.count("\n\n") == SHOTS + 1
    assert all(r["question"].strip() + "\nA. " not in prompt for r in dev[SHOTS:])


@pytest.mark.parametrize("path", ["ours", "general"])
@pytest.mark.parametrize("subject", SUBJECTS)
def test_fewshot_loglikelihoods_and_predictions_match(parity, subject, path):
    mine, other = paired(parity, subject, path)
    for a, b in zip(mine, other):
        lls = [float(r[0]) for r in b["filtered_resps"]]
        assert max(abs(x - y) for x, y in zip(a["loglikelihoods"], lls)) < 1e-4, (a["id"], a["loglikelihoods"], lls)
        assert a["prediction"] == max(range(4), key=lambda i: lls[i])
        assert a["gold"] == b["target"]
    ours, theirs = parity[path][f"mmlu_{subject}"], parity["theirs"]["results"][f"fewshot_mmlu_{subject}"]
    assert ours["acc"] == pytest.approx(theirs["acc,none"], abs=1e-12)
    assert ours["num_fewshot"] == parity["theirs"]["n-shot"][f"fewshot_mmlu_{subject}"] == SHOTS


def test_some_prompts_are_truncated_and_some_are_not(parity):
    limit = parity["max_length"] + 1  # lm-eval keeps the last max_length + 1 tokens of context + continuation
    assert any(n > limit for n in parity["lengths"]) and any(n <= limit for n in parity["lengths"])
