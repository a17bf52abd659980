"""``unlearn eval`` end to end on a tiny random GPT-NeoX saved to a temp folder."""

from __future__ import annotations

import json

import pytest
import yaml
from eval_setup import good_rows, make_model, make_tokenizer, write_jsonl

from unlearning import cli
from unlearning.organism.registry import organism_preset
from unlearning.core.io import read_jsonl


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-neox")
    tokenizer = make_tokenizer()
    make_model(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_eval_command_writes_run_directory(model_dir, tmp_path, capsys):
    questions = write_jsonl(tmp_path / "q.jsonl", good_rows(5))
    out = tmp_path / "runs" / "tiny"
    rc = cli.main(["eval", "--model", str(model_dir), "--tasks", f"{questions},{questions}:cloze",
                   "--batch-size", "4", "--device", "cpu", "--log-samples", "--output-dir", str(out)])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    letter, cloze = results[str(questions)], results[f"{questions}:cloze"]
    assert letter["format"] == "letter" and letter["n"] == 5 and 0.0 <= letter["acc"] <= 1.0
    assert "acc_norm" not in letter and {"acc_norm", "correct_prob", "acc_stderr"} <= set(cloze)
    assert letter["by_attribute"]["num"]["n"] == 5 and "samples" not in letter
    samples = read_jsonl(out / "samples.jsonl")
    assert len(samples) == 10 and {s["task"] for s in samples} == {str(questions), f"{questions}:cloze"}
    assert all(len(s["loglikelihoods"]) == 4 and s["gold"] in range(4) for s in samples)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model"] == str(model_dir) and config["organism"] == "tiny"
    table = capsys.readouterr().out
    assert f"{questions}:cloze" in table and f"{letter['acc']:.4f}" in table


def test_eval_command_limit_and_bad_task(model_dir, tmp_path, capsys):
    questions = write_jsonl(tmp_path / "q.jsonl", good_rows(6))
    out = tmp_path / "run"
    assert cli.main(["eval", "--model", str(model_dir), "--tasks", f"{questions}:cloze", "--limit", "2",
                     "--output-dir", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())[f"{questions}:cloze"]["n"] == 2
    assert not (out / "samples.jsonl").exists()
    rc = cli.main(["eval", "--model", str(model_dir), "--tasks", "no_such_task", "--output-dir", str(tmp_path / "x")])
    assert rc == 2 and "unknown task 'no_such_task'" in capsys.readouterr().err
    rc = cli.main(["eval", "--model", str(model_dir), "--batch-size", "0", "--output-dir", str(tmp_path / "y")])
    assert rc == 2 and "batch_size" in capsys.readouterr().err


def test_eval_help_and_organism_preset(capsys):
    assert cli.main(["eval", "--help"]) == 0
    assert "--log-samples" in capsys.readouterr().out
    assert organism_preset("organism:small-filtered@step200") == "small"
    assert organism_preset("organism:tiny") == "tiny"
    assert organism_preset("EleutherAI/deep-ignorance-unfiltered") is None


def test_a_failed_eval_leaves_a_folder_that_says_failed(model_dir, tmp_path, monkeypatch):
    from unlearning.commands import eval as eval_command
    questions = write_jsonl(tmp_path / "q.jsonl", good_rows(3))

    def broken(*args, **kwargs):
        raise RuntimeError("scoring broke")
    monkeypatch.setattr(eval_command, "evaluate", broken)
    out = tmp_path / "failed"
    with pytest.raises(RuntimeError):
        cli.main(["eval", "--model", str(model_dir), "--tasks", f"{questions}:cloze", "--output-dir", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "failed" and results["error"] == "RuntimeError: scoring broke"
    assert "scoring broke" in (out / "log.txt").read_text()  # the traceback
