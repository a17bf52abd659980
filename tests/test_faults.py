"""Fault injection: real processes killed with SIGKILL at named points (``UNLEARNING_FAULT``, see
:mod:`unlearning.core.faults`), then resumed, must end bit-identical to an uninterrupted run.

Each case runs the real ``unlearn`` entry point in a subprocess (a kill takes no ``finally`` and no
atexit with it), on the tiny local job of :mod:`run_setup`. The uninterrupted reference is a
subprocess too, so both sides share thread counts and start-up state.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from run_setup import Job
from unlearning.core.faults import ENV
from unlearning.core.io import read_jsonl

KILLED = -signal.SIGKILL
VOLATILE = {"started_at", "finished_at", "resumed_at", "failed_at", "run_dir", "curve", "time", "eval_seconds"}


def unlearn(*args: str, fault: str | None = None, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    if fault:
        env[ENV] = fault
    return subprocess.run([sys.executable, "-m", "unlearning.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def expect(proc: subprocess.CompletedProcess, code: int) -> None:
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}:\n{proc.stderr[-3000:]}"


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    assert out, f"no weights in {folder}"
    return out


def same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def strip(obj):
    """Results without wall-clock stamps and paths (the two runs live in different folders)."""
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return Job(tmp_path_factory.mktemp("faults"))


# ------------------------------------------------------------------------------------------------- run

def test_a_run_killed_at_every_point_resumes_to_the_uninterrupted_run(job):
    """One run killed five times: mid-phase, between phases, while saving, during the final evaluation
    and after it; each time ``--resume`` continues from what is on disk."""
    sections = {"sequential": {"steps_per_layer": 3, "finetune": "lora"},
                "train": {"checkpoint_every": 1}, "save": {"adapter": True}}
    ref_cfg, cfg = job.yaml("ref", **sections), job.yaml("killed", **sections)
    expect(unlearn("run", str(ref_cfg), cwd=job.root), 0)
    ref, rundir = job.runs / "ref", job.runs / "killed"

    chain = [
        ("train_step:2", "step 2 of phase 0 is checkpointed"),   # mid-phase
        ("phase_end:2", "phases 0 and 1 are done"),              # between phases
        ("save_model:1", "the adapter is half-saved"),           # during the save
        ("eval_batch:3", "the final evaluation is half-scored"),  # during the final evaluation
        ("final_eval:1", "after is written, complete is not"),   # after the final evaluation
    ]
    for i, (fault, why) in enumerate(chain):
        args = ["run", str(cfg)] + (["--resume"] if i else [])
        expect(unlearn(*args, fault=fault, cwd=job.root), KILLED)
        assert results(rundir)["status"] == "running", (fault, why)
        assert (rundir / "checkpoint" / "state.pt").exists(), (fault, why)
    expect(unlearn("run", str(cfg), "--resume", cwd=job.root), 0)

    assert results(rundir)["status"] == "complete"
    assert strip(results(rundir)) == strip(results(ref))
    same_weights(rundir / "model", ref / "model")
    same_weights(rundir / "adapter", ref / "adapter")
    assert strip(read_jsonl(rundir / "metrics.jsonl")) == strip(read_jsonl(ref / "metrics.jsonl"))
    assert [r["step"] for r in read_jsonl(rundir / "metrics.jsonl")] == list(range(1, 10))  # each step once
    assert not (rundir / "checkpoint").exists() and not list(rundir.glob("*.tmp"))
    log = (rundir / "log.txt").read_text()
    assert "resuming at step 2 of 9 (phase 0, step 2 of the phase)" in log
    assert "resuming at step 6 of 9 (phase 2, step 0 of the phase)" in log


# ----------------------------------------------------------------------------------------------- sweep

def _grid(job: Job, name: str) -> Path:
    base = job.data("unused", train={"checkpoint_every": 1})
    del base["name"]
    (job.root / f"{name}-base.yaml").write_text(yaml.safe_dump(base))
    rows = "".join(f"  - {{sequential.remove_coef: {c}}}\n" for c in (1.0, 4.0))
    path = job.root / f"{name}.yaml"
    path.write_text(f"base: {name}-base.yaml\nname: {name}\nrows:\n{rows}")
    return path


def test_a_sweep_killed_mid_row_and_between_rows_resumes_to_the_uninterrupted_sweep(job):
    ref_dir, out = job.root / "sweep-ref", job.root / "sweep-killed"
    expect(unlearn("sweep", str(_grid(job, "g")), "--output-dir", str(ref_dir), cwd=job.root), 0)
    grid = _grid(job, "g")
    # 6 steps a row: step 9 is row 2's phase 1, step 1; then a kill after row 2 finishes
    expect(unlearn("sweep", str(grid), "--output-dir", str(out), fault="train_step:9", cwd=job.root), KILLED)
    rows = sorted(p.name for p in (ref_dir / "g").iterdir() if p.is_dir())
    assert [results(out / "g" / r)["status"] for r in rows] == ["complete", "running"]
    expect(unlearn("sweep", str(grid), "--output-dir", str(out), fault="sweep_row:1", cwd=job.root), KILLED)
    assert [results(out / "g" / r)["status"] for r in rows] == ["complete", "complete"]
    done = unlearn("sweep", str(grid), "--output-dir", str(out), cwd=job.root)
    expect(done, 0)
    for r in rows:
        same_weights(out / "g" / r / "model", ref_dir / "g" / r / "model")
        assert strip(results(out / "g" / r)) == strip(results(ref_dir / "g" / r))
        assert strip(read_jsonl(out / "g" / r / "metrics.jsonl")) == strip(read_jsonl(ref_dir / "g" / r / "metrics.jsonl"))
    assert "resuming at step 3 of 6 (phase 1, step 1 of the phase)" in (out / "g" / rows[1] / "log.txt").read_text()


# ---------------------------------------------------------------------------------------------- tamper

def test_an_attack_killed_after_an_evaluation_and_mid_interval_resumes_to_the_same_curve(job):
    common = ["tamper", "--model", str(job.root / "model"), "--data", str(job.root / "forget.jsonl"),
              "--tasks", f"{job.root / 'q.jsonl'}:cloze", "--steps", "6", "--eval-every", "2", "--examples", "8",
              "--seq-len", "16", "--batch-size", "2", "--lr", "1e-2", "--device", "cpu", "--base", "none",
              "--reference", "none", "--output-dir", str(job.root / "tamper")]
    expect(unlearn(*common, "--name", "ref", cwd=job.root), 0)
    # the second point (step 2) is on disk; then killed at step 5 (its state: step 4's checkpoint)
    expect(unlearn(*common, "--name", "killed", fault="attack_eval:2", cwd=job.root), KILLED)
    expect(unlearn(*common, "--name", "killed", "--resume", fault="train_step:3", cwd=job.root), KILLED)
    expect(unlearn(*common, "--name", "killed", "--resume", cwd=job.root), 0)
    ref, killed = job.root / "tamper" / "ref", job.root / "tamper" / "killed"
    [attack] = [p.name for p in (ref / "attacks").iterdir()]
    curve, ref_curve = (json.loads((d / "attacks" / attack / "tamper.json").read_text()) for d in (killed, ref))
    assert [p["step"] for p in curve["points"]] == [0, 2, 4, 6] and curve["status"] == "complete"
    assert strip(curve["points"]) == strip(ref_curve["points"])
    assert curve["train_losses"] == ref_curve["train_losses"]
    assert strip(results(killed)["attacks"]) == strip(results(ref)["attacks"])


# ------------------------------------------------------------------------------------------------ eval

def test_an_eval_killed_mid_scoring_leaves_no_results_and_reruns_to_the_same_ones(job):
    common = ["eval", "--model", str(job.root / "model"), "--tasks",
              f"{job.root / 'q.jsonl'}:cloze,{job.root / 'q.jsonl'}", "--batch-size", "2", "--device", "cpu"]
    ref, out = job.root / "eval-ref", job.root / "eval-killed"
    expect(unlearn(*common, "--output-dir", str(ref), cwd=job.root), 0)
    expect(unlearn(*common, "--output-dir", str(out), fault="eval_batch:5", cwd=job.root), KILLED)
    assert (out / "config.yaml").exists() and not (out / "results.json").exists()
    expect(unlearn(*common, "--output-dir", str(out), cwd=job.root), 0)
    assert results(out) == results(ref)
