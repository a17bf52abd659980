"""benchmarks/lmeval_reference.py, the evaluation benchmark's lm-eval side, at tiny scale on CPU: lm-eval
0.4.13's HFLM scoring (its own requests, built from the local WMDP/MMLU task files the script writes)
gives our predictions and our log-likelihoods within 1e-4 in fp32, at a fixed and at the "auto" batch
size, zero- and 2-shot; and lm-eval's whole command runs offline on those task files."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
from eval_setup import WORDS, make_model, make_tokenizer, write_jsonl

from unlearning.evaluation import evaluate
from unlearning.tasks import get_tasks

pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install lm-eval==0.4.13")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "lmeval_reference.py"


def load_script():
    spec = importlib.util.spec_from_file_location("lmeval_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ref = load_script()


def rows(n: int, seed: int, subject: str | None = None) -> list[dict]:
    rng = random.Random(seed)
    words = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    out = [{"question": words(3, 20) + "?", "choices": [words(1, 3) for _ in range(4)], "answer": rng.randrange(4)}
           for _ in range(n)]
    return [{**r, "subject": subject} for r in out] if subject else out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lmeval_reference")
    wmdp = write_jsonl(tmp / "wmdp.jsonl", rows(8, 1))  # WMDP's columns: question, choices, answer
    mmlu = write_jsonl(tmp / "mmlu.jsonl", rows(5, 2, "anatomy") + rows(4, 3, "virology"))
    dev = write_jsonl(tmp / "dev.jsonl", rows(3, 4, "anatomy") + rows(3, 5, "virology"))
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer), seed=3)  # a seed whose predictions vary from question to question
    zero = get_tasks([f"wmdp_bio={wmdp}", f"mmlu_anatomy={mmlu}", f"mmlu_virology={mmlu}"])
    two = get_tasks([f"mmlu_anatomy={mmlu}", f"mmlu_virology={mmlu}"], num_fewshot=2, fewshot_data=str(dev))
    model.save_pretrained(tmp / "model")  # for the command line
    tokenizer.save_pretrained(tmp / "model")
    return {"tmp": tmp, "model": model, "tokenizer": tokenizer, "zero": zero, "two": two,
            "files": {"wmdp": wmdp, "mmlu": mmlu, "dev": dev}}


def ours(setup, tasks, num_fewshot):
    results = evaluate(setup["model"], setup["tokenizer"], tasks, log_samples=True, num_fewshot=num_fewshot)
    return [s for t in tasks for s in results[t.name]["samples"]]


@pytest.mark.parametrize("case", [("zero", 0, 3), ("zero", 0, "auto"), ("two", 2, 4)])
def test_lm_eval_scoring_matches_ours(setup, case):
    kind, shots, batch_size = case
    tasks = setup[kind]
    theirs = ref.lmeval_scores(setup["model"], setup["tokenizer"], tasks, batch_size=batch_size, num_fewshot=shots)
    mine = ours(setup, tasks, shots)
    assert len(theirs.predictions) == len(mine) == sum(len(t.questions) for t in tasks)
    assert theirs.prompts == [s["prompt"] for s in mine]  # lm-eval's own requests are ours
    assert theirs.predictions == [s["prediction"] for s in mine]
    assert len(set(theirs.predictions)) > 1  # a model that always says "A" would prove little
    assert ref.compare([s["loglikelihoods"] for s in mine], theirs)["max_abs_ll_diff"] < 1e-4
    assert theirs.requests == 4 * len(mine) and theirs.seconds > 0
    if batch_size == "auto":
        assert theirs.detected_batch_size is not None


def test_plain_questions_are_grouped_by_subject(setup):
    questions = [q for t in setup["zero"] for q in t.questions]  # our loaders leave q.subject empty
    tasks = ref.as_tasks(questions, subject="biology")
    assert [t.name for t in tasks] == ["mc_biology"] and len(tasks[0].questions) == len(questions)
    wmdp = ref.lmeval_scores(setup["model"], setup["tokenizer"], setup["zero"][0].questions, batch_size=8)
    assert wmdp.prompts == [s["prompt"] for s in ours(setup, setup["zero"][:1], 0)]


def test_the_script_reports_lm_evals_scoring_against_ours(setup, tmp_path):
    f = setup["files"]
    out = tmp_path / "reference.json"
    assert ref.main(["--model", str(setup["tmp"] / "model"), "--tasks", f"mmlu_anatomy={f['mmlu']}",
                     "--fewshot-data", str(f["dev"]), "--num-fewshot", "2", "--batch-size", "auto", "2",
                     "--compare", "--our-batch-size", "1", "4", "--device", "cpu", "--dtype", "float32",
                     "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["ours_by_batch"]) == {"1", "4"}  # each of ours timed, the fastest reported
    assert report["ours"]["evaluate_s"] == min(report["ours_by_batch"].values())
    assert report["prompt_tokens"] is None and report["peak_tflops"] is None  # few-shot prompts; a CPU has no peak
    assert report["questions"] == 5 and report["lm_eval"] == "0.4.13" and report["num_fewshot"] == 2
    for bs in ("auto", "2"):
        timing = report["in_process"][bs]
        assert timing["requests"] == 20 and timing["scoring_s"] > 0
        assert timing["vs_ours"]["same_predictions"] == 1.0 and timing["vs_ours"]["max_abs_ll_diff"] < 1e-4


def test_the_script_saves_and_scores_a_random_neox(setup, tmp_path):
    """benchmarks/scale_session.sh's first call: ``--random-neox`` saves the model for the later calls."""
    from unlearning.data import real as realdata
    if not realdata.ensure():
        pytest.skip(realdata.skip_reason())
    out = tmp_path / "reference.json"
    assert ref.main(["--random-neox", "--shape", "tiny", "--model", str(tmp_path / "neox"), "--tasks",
                     f"wmdp_bio={setup['files']['wmdp']}", "--batch-size", "4", "--compare", "--device", "cpu",
                     "--dtype", "float32", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert (tmp_path / "neox" / "config.json").is_file() and (tmp_path / "neox" / "tokenizer.json").is_file()
    assert report["ours"]["same_predictions"] == 1.0 and report["ours"]["max_abs_ll_diff"] < 1e-4
    assert report["prompt_tokens"] > 20 * report["questions"] and report["params"] > 0  # zero-shot: counted
    assert report["in_process"]["4"]["vs_ours"]["questions"] == 8


@pytest.mark.slow  # lm-eval's command line indexes every task it ships: about 15 s of CPU
def test_the_whole_command_runs_offline_on_the_task_files(setup):
    folder, tmp = setup["tmp"] / "tasks", setup["tmp"]
    names = ref.write_lmeval_tasks(folder, setup["zero"])
    assert names == ["ref_wmdp_bio", "ref_mmlu_anatomy", "ref_mmlu_virology"]
    timed = ref.time_lmeval_command(tmp / "model", folder, ["ref_all"], batch_size="4", dtype="float32",
                                    device="cpu", timeout=600)
    mine = evaluate(setup["model"], setup["tokenizer"], setup["zero"])
    assert timed["seconds"] > 0 and "--batch_size" in timed["argv"]
    for name in names:
        assert timed["acc"][name] == pytest.approx(mine[name[len("ref_"):]]["acc"], abs=1e-12)
    n = {t.name: len(t.questions) for t in setup["zero"]}
    assert timed["acc"]["ref_all"] == pytest.approx(
        sum(mine[k]["acc"] * v for k, v in n.items()) / sum(n.values()), abs=1e-12)


def test_mfu_is_two_flops_per_parameter_and_token_against_the_peak():
    # the arithmetic: 1,273 WMDP prompts (~133k tokens) on 6.9B parameters at 989 TFLOP/s take ~1.86 s
    assert ref.mfu(6_900_000_000, 133_000, 1.856, 989.0) == pytest.approx(1.0, abs=0.002)
    assert ref.mfu(6_900_000_000, 133_000, 3.712, 989.0) == pytest.approx(0.5, abs=0.002)
    assert ref.mfu(1, 1, 1.0, None) is None
