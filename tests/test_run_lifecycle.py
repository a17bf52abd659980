"""The run life cycle: status in results.json, failed runs rerun cleanly, complete and unfinished runs are
kept unless --resume / --overwrite, a changed config on resume is shown, corrupt results are one line."""

from __future__ import annotations

import json

import pytest

from run_setup import Job, fail_in_second_phase
from unlearning import runner
from unlearning.cli import main
from unlearning.core.config import ConfigError
from unlearning.core.errors import UserError
from unlearning.core.rundir import config_changes
from unlearning.preflight import FREE_ON_RESUME
from unlearning.runner import run


@pytest.fixture
def job(tmp_path):
    return Job(tmp_path)


def _no_loading(monkeypatch):
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(runner, "load_model", load_model)


def test_a_failed_run_records_its_error_and_traceback_then_reruns_cleanly(job, monkeypatch):
    restore = fail_in_second_phase(monkeypatch, RuntimeError("boom in phase 2"))
    with pytest.raises(RuntimeError, match="boom"):
        run(job.config("x"))
    failed = job.results("x")
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: boom in phase 2"
    assert failed["started_at"] and failed["failed_at"] and "before" in failed
    log_text = (job.runs / "x" / "log.txt").read_text()
    assert "Traceback (most recent call last)" in log_text and "boom in phase 2" in log_text
    restore()
    results = run(job.config("x"))  # no flag needed after a failure
    assert results["status"] == "complete" and "error" not in results and results["finished_at"]
    steps = [json.loads(line)["step"] for line in (job.runs / "x" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # a clean start: nothing left of the failed attempt
    assert "boom" not in (job.runs / "x" / "log.txt").read_text()
    assert not (job.runs / "x" / "checkpoint").exists()  # removed after success


def test_a_complete_run_is_refused_unless_resume_returns_it_or_overwrite_starts_afresh(job, monkeypatch):
    first = run(job.config("x", save={"keep_checkpoint": True}))
    assert (job.runs / "x" / "checkpoint" / "state.pt").exists()  # kept when asked
    with pytest.raises(ConfigError, match=r"holds a complete run; pass --resume .* --overwrite"):
        run(job.config("x", save={"keep_checkpoint": True}))
    with monkeypatch.context() as m:
        _no_loading(m)
        assert run(job.config("x", save={"keep_checkpoint": True}), resume=True) == first  # a no-op
    (job.runs / "x" / "marker").write_text("from the first run")
    again = run(job.config("x"), overwrite=True)
    assert again["status"] == "complete" and not (job.runs / "x" / "marker").exists()
    assert not (job.runs / "x" / "checkpoint").exists()


def test_an_unfinished_run_is_refused_and_a_changed_config_on_resume_is_shown(job, monkeypatch):
    restore = fail_in_second_phase(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        run(job.config("x"))
    restore()
    assert job.results("x")["status"] == "running"  # a kill is not a failure: it resumes
    assert (job.runs / "x" / "checkpoint" / "state.pt").exists()
    with pytest.raises(ConfigError, match="unfinished run .*--resume to continue it from its checkpoint"):
        run(job.config("x"))
    changed = job.config("x", train={"optimizer": {"lr": 0.02}}, device="cpu", eval={"batch_size": 2})
    with pytest.raises(ConfigError) as e:
        run(changed, resume=True)
    assert "train.optimizer.lr: 0.01 -> 0.02" in str(e.value) and "--force" in str(e.value)
    assert "device" not in str(e.value) and "batch_size" not in str(e.value)  # free to change on resume
    results = run(changed, resume=True, force=True)
    assert results["status"] == "complete" and results["resumed_at"]
    log_text = (job.runs / "x" / "log.txt").read_text()
    assert "resuming at step 2 of 6 (phase 1, step 0 of the phase)" in log_text and "--force: resuming with train.optimizer.lr" in log_text


def test_resume_continues_a_failed_run_from_its_checkpoint(job, monkeypatch):
    restore = fail_in_second_phase(monkeypatch, RuntimeError("transient"))
    with pytest.raises(RuntimeError):
        run(job.config("x"))
    restore()
    assert run(job.config("x"), resume=True)["status"] == "complete"
    assert "resuming at step 2 of 6 (phase 1, step 0 of the phase)" in (job.runs / "x" / "log.txt").read_text()


def test_a_corrupt_results_json_is_one_line_naming_the_file_and_the_fix(job, capsys):
    folder = job.runs / "x"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text('{"status": "running", "before": {"q": {"acc": 0.')
    with pytest.raises(UserError, match=r"results\.json: not valid JSON .*--overwrite"):
        run(job.config("x"))
    assert main(["run", str(job.yaml("x")), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(folder / "results.json") in err and "--overwrite" in err
    assert run(job.config("x"), overwrite=True)["status"] == "complete"


def test_a_folder_that_is_not_a_run_directory_is_never_replaced(job):
    (job.runs / "x").mkdir(parents=True)
    (job.runs / "x" / "notes.txt").write_text("mine")
    for flags in ({}, {"overwrite": True}):
        with pytest.raises(ConfigError, match="not a run directory"):
            run(job.config("x"), **flags)
    assert (job.runs / "x" / "notes.txt").read_text() == "mine"


def test_config_changes_lists_dotted_keys_except_the_free_ones():
    old = {"device": "auto", "train": {"seed": 0, "optimizer": {"lr": 0.01}}, "logging": {"level": "INFO"},
           "eval": {"batch_size": 32, "limit": None}, "gone": 1}
    new = {"device": "cpu", "train": {"seed": 1, "optimizer": {"lr": 0.01}}, "logging": {"level": "DEBUG"},
           "eval": {"batch_size": 8, "limit": 5}, "added_since": True}
    assert config_changes(old, new, FREE_ON_RESUME) == ["eval.limit: null -> 5", "gone: 1 -> (unset)",
                                                        "train.seed: 0 -> 1"]
