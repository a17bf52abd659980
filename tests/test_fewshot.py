"""Few-shot MMLU (``num_fewshot``, ``fewshot_data``): the rendering, which dev rows, where they come
from, and the one-line errors of ``unlearn eval``, ``unlearn run`` and ``unlearn tamper`` (before any
model loads, nothing written). Parity with lm-eval itself: tests/test_fewshot_lmeval_parity.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from eval_setup import make_model, make_tokenizer, write_jsonl
from run_setup import Job

from unlearning import cli, runner
from unlearning.core.errors import DataError, UserError
from unlearning.evaluation import MCQuestion, evaluate
from unlearning.evaluation.prompts import build_prompt, fewshot_block
from unlearning.tasks import get_tasks

HEADER = "The following are multiple choice questions (with answers) about {}.\n\n"


def mmlu_row(subject: str, i: int, answer: int = 0) -> dict:
    return {"question": f"{subject} q{i} ", "subject": subject, "choices": [f"c{i}{k}" for k in "abcd"],
            "answer": answer}


@pytest.fixture
def files(tmp_path):
    """A test file (3 questions each of anatomy and astronomy) and a dev file whose subjects interleave,
    with 3 anatomy rows, 2 astronomy rows and 1 virology row."""
    test = write_jsonl(tmp_path / "test.jsonl", [mmlu_row(s, i) for i in range(3) for s in ("anatomy", "astronomy")])
    dev_rows = [mmlu_row("astronomy", 10, 1), mmlu_row("anatomy", 20, 2), mmlu_row("virology", 30),
                mmlu_row("anatomy", 21, 3), mmlu_row("astronomy", 11, 0), mmlu_row("anatomy", 22, 1)]
    return test, write_jsonl(tmp_path / "dev.jsonl", dev_rows)


def test_fewshot_block_is_lm_evals_turns():
    examples = [MCQuestion("d0", " Why? ", ["a", "b", "c", "d"], 2), MCQuestion("d1", "How", ["e", "f", "g", "h"], 0)]
    assert fewshot_block("letter", examples) == ("Why?\nA. a\nB. b\nC. c\nD. d\nAnswer: C\n\n"
                                                 "How\nA. e\nB. f\nC. g\nD. h\nAnswer: A\n\n")
    assert fewshot_block("cloze", examples) == "Question: Why?\nAnswer: c\n\nQuestion: How\nAnswer: e\n\n"
    context, conts = build_prompt("letter", "Q?", ["w", "x", "y", "z"], "college_biology", fewshot=examples[:1])
    assert context == (HEADER.format("college biology") + "Why?\nA. a\nB. b\nC. c\nD. d\nAnswer: C\n\n"
                       "Q?\nA. w\nB. x\nC. y\nD. z\nAnswer:")
    assert conts == [" A", " B", " C", " D"]
    assert build_prompt("letter", "Q?", ["w", "x", "y", "z"], "anatomy")[0] == \
        HEADER.format("anatomy") + "Q?\nA. w\nB. x\nC. y\nD. z\nAnswer:"


def test_the_first_k_dev_rows_of_the_same_subject_in_file_order(files):
    test, dev = files
    names = [f"mmlu_anatomy={test}", f"mmlu_astronomy={test}"]
    anatomy, astronomy = get_tasks(names, num_fewshot=2, fewshot_data=str(dev))
    assert [q.question for q in anatomy.fewshot] == ["anatomy q20 ", "anatomy q21 ", "anatomy q22 "]
    assert [q.question for q in astronomy.fewshot] == ["astronomy q10 ", "astronomy q11 "]
    assert all(t.fewshot is None for t in get_tasks(names))  # zero-shot reads no dev rows

    tokenizer = make_tokenizer()
    results = evaluate(make_model(len(tokenizer)), tokenizer, [anatomy, astronomy], num_fewshot=2,
                       log_samples=True, batch_size=4)
    prompt = results["mmlu_anatomy"]["samples"][1]["prompt"]
    assert prompt == (HEADER.format("anatomy") + "anatomy q20\nA. c20a\nB. c20b\nC. c20c\nD. c20d\nAnswer: C\n\n"
                      "anatomy q21\nA. c21a\nB. c21b\nC. c21c\nD. c21d\nAnswer: D\n\n"
                      "anatomy q1\nA. c1a\nB. c1b\nC. c1c\nD. c1d\nAnswer:")
    assert results["mmlu_anatomy"]["num_fewshot"] == 2 and results["mmlu_anatomy"]["n"] == 3
    zero = evaluate(make_model(len(tokenizer)), tokenizer, names, log_samples=True, batch_size=4)
    assert "num_fewshot" not in zero["mmlu_anatomy"]
    assert zero["mmlu_anatomy"]["samples"][1]["prompt"] == HEADER.format("anatomy") + \
        "anatomy q1\nA. c1a\nB. c1b\nC. c1c\nD. c1d\nAnswer:"
    # names resolved by evaluate itself load the pool too
    by_name = evaluate(make_model(len(tokenizer)), tokenizer, names, num_fewshot=2, log_samples=True,
                       task_context={"fewshot_data": str(dev)})
    assert by_name["mmlu_anatomy"]["samples"][1]["prompt"] == prompt


def test_the_data_dir_pair_and_the_errors(files, tmp_path, monkeypatch):
    test, dev = files
    with pytest.raises(UserError, match=r"^fewshot_data: .*local questions .*set fewshot_data"):
        get_tasks([f"mmlu_anatomy={test}"], num_fewshot=1)  # never the hub's dev rows beside local questions
    with pytest.raises(DataError, match=r"^fewshot_data: .* 2 dev row\(s\) for subject astronomy, fewer than "
                                        r"num_fewshot 3"):
        get_tasks([f"mmlu_astronomy={test}"], num_fewshot=3, fewshot_data=str(dev))
    with pytest.raises(DataError, match=r"0 dev row\(s\) for subject abstract_algebra"):
        get_tasks([f"mmlu_abstract_algebra={test}"], num_fewshot=1, fewshot_data=str(dev))
    # refused by name, before the (missing) file is read
    for name in ("wmdp_bio=/no/such/file.parquet", "organism_hazard_cloze", str(test)):
        with pytest.raises(UserError, match=r"^num_fewshot: 1 is set, but task .* no few-shot form .*mmlu, mmlu_\*"):
            get_tasks([name], num_fewshot=1)
    with pytest.raises(UserError, match=r"^num_fewshot: task mmlu_anatomy has no few-shot examples loaded"):
        tokenizer = make_tokenizer()
        evaluate(make_model(len(tokenizer)), tokenizer, get_tasks([f"mmlu_anatomy={test}"]), num_fewshot=1)

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "mmlu.jsonl").write_text(test.read_text())
    monkeypatch.setenv("UNLEARNING_DATA_DIR", str(data_dir))
    with pytest.raises(UserError, match=r"UNLEARNING_DATA_DIR/mmlu\) needs their dev rows"):
        get_tasks(["mmlu_anatomy"], num_fewshot=1)
    (data_dir / "mmlu_dev.jsonl").write_text(dev.read_text())
    (anatomy,) = get_tasks(["mmlu_anatomy"], num_fewshot=1)
    assert [q.question for q in anatomy.fewshot] == ["anatomy q20 ", "anatomy q21 ", "anatomy q22 "]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    job = Job(tmp_path_factory.mktemp("fewshot_cli"))
    write_jsonl(job.root / "mmlu_test.jsonl", [mmlu_row("anatomy", i) for i in range(3)])
    write_jsonl(job.root / "mmlu_dev.jsonl", [mmlu_row("anatomy", 20 + i, i) for i in range(2)])
    return job


def bad_cases(job: Job) -> dict[str, tuple[list[str], str]]:
    """argv -> (the key named, the fix) for each command that takes the evaluation settings."""
    r = job.root
    mmlu = f"mmlu_anatomy={r / 'mmlu_test.jsonl'}"
    dev = f"{r / 'mmlu_dev.jsonl'}"
    return {
        "eval, not MMLU": (["eval", "--model", str(r / "model"), "--tasks", f"{r / 'q.jsonl'}:cloze",
                            "--num-fewshot", "1"], "num_fewshot", "set num_fewshot 0"),
        "eval, no dev file": (["eval", "--model", str(r / "model"), "--tasks", mmlu, "--num-fewshot", "1"],
                              "fewshot_data", "real/mmlu/dev.parquet"),
        "eval, too few dev rows": (["eval", "--model", str(r / "model"), "--tasks", mmlu, "--num-fewshot", "3",
                                    "--fewshot-data", dev], "fewshot_data", "lower num_fewshot"),
        "run, not MMLU": (["run", str(job.yaml("x")), "--name=x", "--eval.num_fewshot=1"], "eval.num_fewshot",
                          "set num_fewshot 0"),
        "run, too few dev rows": (["run", str(job.yaml("x")), "--name=x", f"--eval.tasks=[{mmlu}]",
                                   "--eval.num_fewshot=5", f"--eval.fewshot_data={dev}"], "eval.fewshot_data",
                                  "lower num_fewshot"),
        "run, missing dev file": (["run", str(job.yaml("x")), "--name=x", f"--eval.tasks=[{mmlu}]",
                                   "--eval.num_fewshot=1", f"--eval.fewshot_data={r / 'gone.jsonl'}"],
                                  "eval.fewshot_data", "does not exist"),
        "tamper, not MMLU": (["tamper", "--model", str(r / "model"), "--data", str(r / "forget.jsonl"),
                              "--tasks", f"{r / 'q.jsonl'}:cloze", "--attack.eval.num_fewshot", "1"],
                             "attack.eval.num_fewshot", "set num_fewshot 0"),
    }


def test_bad_fewshot_input_is_one_line_before_any_model_loads(job, tmp_path, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(runner, "load_model", no_loading)
    monkeypatch.setattr("unlearning.commands.eval.load_model", no_loading)
    monkeypatch.setattr("unlearning.attacks.session.load_model", no_loading)
    monkeypatch.setenv("UNLEARNING_RUNS", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    for case, (argv, named, fix) in bad_cases(job).items():
        start = time.perf_counter()
        code = cli.main(argv)
        seconds = time.perf_counter() - start
        err = [line for line in capsys.readouterr().err.splitlines() if " error: " in line or "Error" in line]
        assert code == 2 and len(err) == 1, (case, err)
        assert f": error: {named}: " in err[0] and fix in err[0], (case, err[0])
        assert seconds < 5, (case, seconds)
    assert not (tmp_path / "runs").exists() and not (job.runs / "x").exists()


def test_eval_command_with_num_fewshot(job, tmp_path):
    out = tmp_path / "eval"
    rc = cli.main(["eval", "--model", str(job.root / "model"), "--tasks", f"mmlu_anatomy={job.root / 'mmlu_test.jsonl'}",
                   "--num-fewshot", "2", "--fewshot-data", str(job.root / "mmlu_dev.jsonl"), "--device", "cpu",
                   "--log-samples", "--output-dir", str(out)])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())["mmlu_anatomy"]
    assert results["num_fewshot"] == 2 and results["n"] == 3
    prompts = [json.loads(line)["prompt"] for line in (out / "samples.jsonl").read_text().splitlines()]
    assert all(p.startswith(HEADER.format("anatomy") + "anatomy q20\nA. c20a") and "Answer: A\n\nanatomy q21" in p
               and p.count("Answer:") == 3 for p in prompts)


def test_every_command_takes_the_setting():
    from unlearning.attacks.tamper import AttackEvalSettings
    from unlearning.commands.eval import EvalConfig as EvalCommandConfig
    from unlearning.evaluation.settings import EvalSettings
    from unlearning.runner import EvalConfig as RunEvalConfig
    for cls in (EvalCommandConfig, RunEvalConfig, AttackEvalSettings):
        assert issubclass(cls, EvalSettings)
    settings = EvalSettings(num_fewshot=5, fewshot_data="dev.parquet")
    assert settings.evaluate_kwargs()["num_fewshot"] == 5
    assert settings.task_context() == {"num_fewshot": 5, "fewshot_data": "dev.parquet"}
