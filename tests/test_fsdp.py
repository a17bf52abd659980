"""``train.parallel: fsdp``: 2 CPU processes (gloo, FSDP2) at the same global batch give one process's loss curve.

One spawn of two real processes runs the jobs on the tiny organism, as ``tests/test_distributed.py``
does for DDP (its brief, helpers and tolerance): sequential LoRA (the probe is the adapters
switched off inside sharded layers), RMU with LoRA (a representation method: forget, retain and
no-grad reference passes, forwards stopped after the steered layer), and sequential full
fine-tuning (each changed layer's original kept as a sharded module of its own and swapped into
the layer list for the probe). The model is saved from full tensors gathered on rank 0, and the
evaluation after training runs every question on every rank; both must match one process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_distributed import BRIEF, MICRO_BATCHES, WORLD, _free_port, curve
from unlearning.core.config import from_dict, merge
from unlearning.core.errors import ConfigError
from unlearning.runner import RunConfig, run

FSDP = {"train": {"parallel": "fsdp"}, "save": {"model": True}}
JOBS = {
    "sequential_lora": {"method": "sequential", "sequential": {
        "layers": "3->2:1", "steps_per_layer": 2, "finetune": "lora", "retain_losses": {"l2": 1.0},
        "lora": {"r": 4, "dropout": 0.0}}},
    "rmu_lora": {"method": "rmu", "rmu": {"layer": 2, "modules": ["mlp"], "finetune": "lora", "steps": 3,
                                          "metrics_every": 1, "lora": {"r": 4, "dropout": 0.0, "init_b_std": 0.02}}},
    "sequential_full": {"method": "sequential", "sequential": {
        "layers": "3->1:1", "steps_per_layer": 2, "finetune": "full", "retain_losses": {"l2": 1.0}}},
}


def run_jobs(out: Path, grad_accum: int) -> None:
    for name, job in JOBS.items():
        data = merge(merge(merge(BRIEF, FSDP), job), {"name": name, "output_dir": str(out),
                                                      "train": {"grad_accum": grad_accum}})
        run(from_dict(RunConfig, data))


def _worker(rank: int, port: int, out: str) -> None:
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        run_jobs(Path(out), MICRO_BATCHES // WORLD)
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def both(tiny_organism, tmp_path_factory):
    """(one process's output folder, two FSDP processes' output folder)."""
    single, double = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(double)), nprocs=WORLD)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_jobs(single, MICRO_BATCHES)
    finally:
        torch.set_num_threads(threads)
    return single, double


@pytest.mark.slow
@pytest.mark.parametrize("job", list(JOBS))
def test_fsdp_two_processes_give_one_process_loss_curve(both, job):
    import json
    single, double = (curve(folder / job) for folder in both)
    assert len(single) == len(double) > 0
    terms = [k for k in single[0] if k.endswith(("_term", "_loss"))] + ["grad_norm"]
    for a, b in zip(single, double):
        assert (a["step"], a["phase"]) == (b["step"], b["phase"])
        for k in terms:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-7), (job, a["step"], k)
    after = [json.loads((folder / job / "results.json").read_text()) for folder in both]
    assert after[1]["status"] == "complete"
    assert after[1]["after"]["organism_hazard_cloze"]["acc"] == after[0]["after"]["organism_hazard_cloze"]["acc"]
    # the saved model: full tensors gathered on rank 0 (LoRA merged) equal one process's merged weights.
    # Under full fine-tuning some gradients are float noise (a key bias moves no softmax: its exact
    # gradient is 0) and Adam moves such an element by ~lr per step whatever the noise's size; those
    # few (0.1-0.2% of the weights, measured) may differ by up to lr per step, the rest may not.
    from safetensors.torch import load_file
    saved = [load_file(str(folder / job / "model" / "model.safetensors")) for folder in both]
    assert saved[0].keys() == saved[1].keys(), (sorted(set(saved[0]) - set(saved[1])),
                                                sorted(set(saved[1]) - set(saved[0])))
    noisy = 2 * BRIEF["train"]["optimizer"]["lr"] if job.endswith("full") else 1e-6
    off = 0
    for k, t in saved[0].items():
        torch.testing.assert_close(saved[1][k], t, rtol=1e-4, atol=noisy, msg=lambda m, k=k: f"{k}: {m}")
        off += int((~torch.isclose(saved[1][k], t, rtol=1e-4, atol=1e-6)).sum())
    assert off <= 5e-3 * sum(t.numel() for t in saved[0].values()), off


def test_fsdp_refuses_what_it_cannot_shard():
    data = merge(BRIEF, {"train": {"parallel": "fsdp", "grad_filter": "asymmetric"}})
    with pytest.raises(ConfigError, match="train.grad_filter"):
        from_dict(RunConfig, data)
