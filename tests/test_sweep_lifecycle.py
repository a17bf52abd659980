"""Sweeps: command-line overrides apply to every row, a killed sweep resumes, a failing row does not stop
the others, and each row's log.txt holds only its own lines."""

from __future__ import annotations

import pytest
import yaml

from run_setup import Job
from unlearning import sweep
from unlearning.cli import main
from unlearning.core.config import ConfigError
from unlearning.methods import sequential as seq
from unlearning.sweep import load_grid, row_config, run_grid

COEFS = (1.0, 2.0, 3.0)


@pytest.fixture
def job(tmp_path):
    return Job(tmp_path)


def _grid(job: Job):
    base = job.data("unused")
    del base["name"]
    (job.root / "base.yaml").write_text(yaml.safe_dump(base))
    rows = "".join(f"  - {{sequential.remove_coef: {c}}}\n" for c in COEFS)
    (job.root / "grid.yaml").write_text(f"base: base.yaml\nname: g\nrows:\n{rows}")
    return load_grid(job.root / "grid.yaml")


def _break_row(monkeypatch, coef: float, exc: BaseException):
    """Raise ``exc`` in the second layer phase of the row whose remove_coef is ``coef``."""
    original = seq.Sequential.loss_stages  # the hook the loop calls

    def loss_stages(self, model, batches, ctx):
        if self.cfg.remove_coef == coef and ctx.phase.index == 1:
            raise exc
        return original(self, model, batches, ctx)

    monkeypatch.setattr(seq.Sequential, "loss_stages", loss_stages)
    return lambda: monkeypatch.setattr(seq.Sequential, "loss_stages", original)


def _spy_runs(monkeypatch) -> list[tuple[str, bool]]:
    calls, original = [], sweep.run

    def spy(cfg, *, resume=False, **kwargs):
        calls.append((cfg.name, resume))
        return original(cfg, resume=resume, **kwargs)

    monkeypatch.setattr(sweep, "run", spy)
    return calls


def test_command_line_overrides_win_over_rows_and_base(job):
    grid = _grid(job)
    cfg = row_config(grid, grid.rows[1], overrides={"sequential": {"remove_coef": 9, "steps_per_layer": 1}})
    assert cfg.sequential["remove_coef"] == 9 and cfg.sequential["steps_per_layer"] == 1
    assert cfg.sequential["finetune"] == "full" and cfg.name == f"g/{grid.rows[1].name}"
    with pytest.raises(ConfigError, match="train.nope"):
        row_config(grid, grid.rows[0], overrides={"train": {"nope": 1}})
    with pytest.raises(ConfigError, match="name: a sweep names its rows"):
        row_config(grid, grid.rows[0], overrides={"name": "x"})


def test_unlearn_sweep_refuses_an_unknown_option_before_any_row_runs(job, capsys):
    _grid(job)
    assert main(["sweep", str(job.root / "grid.yaml"), "--train.nope=1"]) == 2
    assert "train.nope" in capsys.readouterr().err
    assert not job.runs.exists()


def test_a_killed_sweep_resumes_and_each_row_logs_only_its_own_lines(job, monkeypatch):
    grid = _grid(job)
    overrides = {"train": {"seed": 3}}
    restore = _break_row(monkeypatch, COEFS[1], KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, overrides=overrides)
    restore()
    folders = [job.runs / "g" / row.name for row in grid.rows]
    assert job.results(f"g/{grid.rows[0].name}")["status"] == "complete"
    assert job.results(f"g/{grid.rows[1].name}")["status"] == "running"
    assert (folders[1] / "checkpoint" / "state.pt").exists() and not folders[2].exists()

    calls = _spy_runs(monkeypatch)
    outcomes = run_grid(grid, overrides=overrides)
    assert calls == [(f"g/{grid.rows[1].name}", True), (f"g/{grid.rows[2].name}", False)]  # row 1 skipped
    assert [o.status for o in outcomes] == ["complete"] * 3
    assert [o.note for o in outcomes] == ["complete, skipped", "resumed", "ran"]
    assert "resuming at step 2 of 6 (phase 1, step 0 of the phase)" in (folders[1] / "log.txt").read_text()
    for i, folder in enumerate(folders):
        text = (folder / "log.txt").read_text()
        assert f"run {folder} " in text and yaml.safe_load((folder / "config.yaml").read_text())["train"]["seed"] == 3
        for other in folders[:i] + folders[i + 1:]:
            assert str(other) not in text, (folder, other)


def test_a_failing_row_does_not_stop_the_others_and_is_retried_only_when_asked(job, monkeypatch):
    grid = _grid(job)
    restore = _break_row(monkeypatch, COEFS[1], RuntimeError("row two breaks"))
    outcomes = run_grid(grid)
    assert [o.status for o in outcomes] == ["complete", "failed", "complete"]
    assert outcomes[1].note == "RuntimeError: row two breaks"
    assert job.results(f"g/{grid.rows[1].name}")["status"] == "failed"
    restore()
    calls = _spy_runs(monkeypatch)
    again = run_grid(grid)
    assert calls == [] and again[1].status == "skipped-failed" and "--retry-failed" in again[1].note
    assert "row two breaks" in again[1].note
    retried = run_grid(grid, retry_failed=True)
    assert calls == [(f"g/{grid.rows[1].name}", False)] and [o.status for o in retried] == ["complete"] * 3
