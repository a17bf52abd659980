"""torchrun equivalence: 2 CPU processes (gloo, DDP) at the same global batch give one process's loss curve.

One spawn of two real processes runs four jobs on the tiny organism, one after another: sequential
LoRA, sequential full fine-tuning (a new DDP wrapper per layer phase), RMU (a representation
method: forget, retain and no-grad reference passes in one DDP forward) and the tamper attack
(``unlearn tamper``'s own entry point). One process runs each with micro-batches of 2 and 4 of
them per step; two processes with 2 each, so the global batch holds the same 8 examples and the
micro-batches before the last run under ``no_sync``. The evaluations after training are scored
data-parallel (a shard per rank) and must equal one process's too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gloo import assert_same_curve, curve, join_gloo, one_and_two_processes
from unlearning.core.config import from_dict, merge
from unlearning.runner import RunConfig, run

BRIEF = {"model": "organism:tiny", "save": {"model": False},
         "data": {"num_train_examples": 16, "seq_len": 32},
         "train": {"batch_size": 2, "optimizer": {"lr": 2e-3, "warmup_ratio": 0.0}},
         "eval": {"before": False, "reference": None, "limit": 4, "batch_size": 8,
                  "tasks": ["organism_hazard_cloze"]}}
JOBS = {
    # L2 retain: a KL term between the nearly equal original and current logits is ~1e-4, a difference
    # of nearly equal log-probabilities, and its float noise (1e-5 relative) grows through Adam's
    # first step of the next phase beyond rtol 1e-4 (measured: 2e-3 at step 4 with kl, 6e-7 without).
    "sequential_lora": {"method": "sequential", "sequential": {
        "layers": "3->2:1", "steps_per_layer": 2, "finetune": "lora", "retain_losses": {"l2": 1.0},
        "lora": {"r": 4, "dropout": 0.0}}},
    # the gradient filter takes the forget and retain gradients apart (autograd.grad, which DDP does
    # not see) and accumulates the filtered one through DDP's hooks
    "sequential_full": {"method": "sequential", "train": {"grad_filter": "asymmetric"}, "sequential": {
        "layers": "3->1:1", "steps_per_layer": 2, "finetune": "full", "retain_losses": {"l2": 1.0}}},
    "rmu": {"method": "rmu", "rmu": {"layer": 2, "modules": ["mlp"], "finetune": "full", "steps": 3,
                                     "metrics_every": 1}},
}
TAMPER = ["--model", "organism:tiny", "--steps", "3", "--eval-every", "3", "--examples", "16", "--seq-len", "32",
          "--batch-size", "2", "--base", "none", "--reference", "none", "--limit", "4", "--dtype", "fp32",
          "--lr", "1e-3", "--name", "tamper"]
WORLD = 2
MICRO_BATCHES = 4  # per step in one process; WORLD processes run MICRO_BATCHES // WORLD each


def run_jobs(out: Path, grad_accum: int) -> None:
    """Every job into ``out`` (run as one process, or as each rank of a group)."""
    from unlearning.commands.tamper import main as tamper_main
    for name, job in JOBS.items():
        data = merge(merge(BRIEF, job), {"name": name, "output_dir": str(out), "train": {"grad_accum": grad_accum}})
        run(from_dict(RunConfig, data))
    assert tamper_main([*TAMPER, "--grad-accum", str(grad_accum), "--output-dir", str(out)]) == 0


def _worker(rank: int, port: int, out: str) -> None:
    join_gloo(rank, WORLD, port)
    try:
        run_jobs(Path(out), MICRO_BATCHES // WORLD)
    finally:
        torch.distributed.destroy_process_group()



@pytest.fixture(scope="module")
def both(tiny_organism, tmp_path_factory):
    """(one process's output folder, two processes' output folder)."""
    return one_and_two_processes(_worker, lambda folder: run_jobs(folder, MICRO_BATCHES), tmp_path_factory, WORLD)


@pytest.mark.slow
@pytest.mark.parametrize("job", list(JOBS))
def test_two_processes_give_one_process_loss_curve(both, job):
    single, double = (curve(folder / job) for folder in both)
    assert len(assert_same_curve(single, double, job)) >= 3
    if job == "sequential_full":
        assert [r["layer"] for r in single] == [3, 3, 2, 2, 1, 1]  # three phases: DDP wrapped three times
    # the evaluation after training, scored a shard per rank, is one process's
    after = [json.loads((folder / job / "results.json").read_text()) for folder in both]
    assert after[1]["status"] == "complete"
    assert after[1]["after"]["organism_hazard_cloze"]["acc"] == after[0]["after"]["organism_hazard_cloze"]["acc"]


@pytest.mark.slow
def test_tamper_attack_under_two_processes_gives_one_process_curve(both):
    paths = [next((folder / "tamper" / "attacks").glob("*/tamper.json")) for folder in both]
    single, double = (json.loads(p.read_text()) for p in paths)
    assert double["status"] == "complete" and len(single["train_losses"]) == 3
    assert double["train_losses"] == pytest.approx(single["train_losses"], rel=1e-4)
    assert [p["step"] for p in double["points"]] == [0, 3]
    for a, b in zip(single["points"], double["points"]):  # trained weights equal up to float noise
        for task, result in a["eval"].items():
            assert b["eval"][task]["acc"] == result["acc"]
            assert b["eval"][task]["correct_prob"] == pytest.approx(result["correct_prob"], rel=1e-4)
    assert not (paths[1].parent / "state.pt").exists()  # rank 0 removed the state once both were done
