"""``train.parallel: fsdp``: 2 CPU processes (gloo, FSDP2) at the same global batch give one process's loss curve.

One spawn of two real processes runs the jobs on the tiny organism, as ``tests/test_distributed.py``
does for DDP (its brief, helpers and tolerance): sequential LoRA (the probe is the adapters
switched off inside sharded layers), RMU with LoRA (a representation method: forget, retain and
no-grad reference passes, forwards stopped after the steered layer), and sequential and RMU full
fine-tuning (each changed layer's original kept as a sharded module of its own and swapped into
the layer list for the probe and the reference). Every rank builds the model on the meta device and
loads only its shards, from the file rank 0 alone reads (a spy on each rank checks that); the
evaluation before training runs on the sharded model. The model is saved from full tensors gathered
on rank 0, and the evaluation after training runs every question on every rank; all must match one
process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_distributed import BRIEF, MICRO_BATCHES, WORLD
from gloo import assert_same_curve, check_sharded_loading, curve, free_port, join_gloo, one_and_two_processes, spy_on_loading
from unlearning.core.config import from_dict, merge
from unlearning.core.errors import ConfigError
from unlearning.runner import RunConfig, run

FSDP = {"train": {"parallel": "fsdp"}, "save": {"model": True}, "eval": {"before": True}}
JOBS = {
    "sequential_lora": {"method": "sequential", "sequential": {
        "layers": "3->2:1", "steps_per_layer": 2, "finetune": "lora", "retain_losses": {"l2": 1.0},
        "lora": {"r": 4, "dropout": 0.0}}},
    "rmu_lora": {"method": "rmu", "rmu": {"layer": 2, "modules": ["mlp"], "finetune": "lora", "steps": 3,
                                          "metrics_every": 1, "lora": {"r": 4, "dropout": 0.0, "init_b_std": 0.02}}},
    "sequential_full": {"method": "sequential", "sequential": {
        "layers": "3->1:1", "steps_per_layer": 2, "finetune": "full", "retain_losses": {"l2": 1.0}}},
    # full fine-tuning of the MLPs of layers 0..2: originals of those parameters, kept as layer modules
    "rmu_full": {"method": "rmu", "rmu": {"layer": 2, "modules": ["mlp"], "finetune": "full", "steps": 3,
                                          "metrics_every": 1}},
}


RESUMED = "sequential_full"  # killed mid-phase and resumed, in the resume test


def job_config(name: str, out: Path, grad_accum: int) -> RunConfig:
    return from_dict(RunConfig, merge(merge(merge(BRIEF, FSDP), JOBS[name]), {
        "name": name, "output_dir": str(out), "train": {"grad_accum": grad_accum, "checkpoint_every": 1}}))


def run_jobs(out: Path, grad_accum: int) -> None:
    for name in JOBS:
        run(job_config(name, out, grad_accum))


def _worker(rank: int, port: int, out: str, mode: str = "all") -> None:
    import os
    if mode == "killed":  # both ranks SIGKILL themselves after step 3 (a checkpoint of phase 2, mid-phase)
        os.environ["UNLEARNING_FAULT"] = "train_step:3"
    join_gloo(rank, WORLD, port)
    spy_on_loading(rank, Path(out))
    try:
        if mode == "all":
            run_jobs(Path(out), MICRO_BATCHES // WORLD)
        else:
            run(job_config(RESUMED, Path(out), MICRO_BATCHES // WORLD), resume=mode == "resume")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def both(tiny_organism, tmp_path_factory):
    """(one process's output folder, two FSDP processes' output folder)."""
    return one_and_two_processes(_worker, lambda folder: run_jobs(folder, MICRO_BATCHES), tmp_path_factory, WORLD)


@pytest.mark.slow
@pytest.mark.parametrize("job", list(JOBS))
def test_fsdp_two_processes_give_one_process_loss_curve(both, job):
    import json
    assert_same_curve(*(curve(folder / job) for folder in both), job)
    after = [json.loads((folder / job / "results.json").read_text()) for folder in both]
    assert after[1]["status"] == "complete"
    for when in ("before", "after"):  # before: the sharded model just loaded, LoRA adapters off
        assert after[1][when]["organism_hazard_cloze"]["acc"] == after[0][when]["organism_hazard_cloze"]["acc"]
    # the saved model: full tensors gathered on rank 0 (LoRA merged) equal one process's merged weights.
    # Under full fine-tuning some gradients are float noise (a key bias moves no softmax: its exact
    # gradient is 0) and Adam moves such an element by ~lr per step whatever the noise's size; those
    # few (0.1-0.2% of the weights, measured) may differ by up to lr per step, the rest may not.
    from safetensors.torch import load_file
    saved = [load_file(str(folder / job / "model" / "model.safetensors")) for folder in both]
    assert saved[0].keys() == saved[1].keys(), (sorted(set(saved[0]) - set(saved[1])),
                                                sorted(set(saved[1]) - set(saved[0])))
    noisy = 2 * BRIEF["train"]["optimizer"]["lr"] if job.endswith("full") else 1e-5  # LoRA: 1e-6 measured
    off = 0
    for k, t in saved[0].items():
        torch.testing.assert_close(saved[1][k], t, rtol=1e-4, atol=noisy, msg=lambda m, k=k: f"{k}: {m}")
        off += int((~torch.isclose(saved[1][k], t, rtol=1e-4, atol=1e-6)).sum())
    assert off <= 5e-3 * sum(t.numel() for t in saved[0].values()), off
    if job.endswith("lora"):  # the adapter, saved by peft from the gathered tensors
        adapters = [load_file(str(folder / job / "adapter" / "adapter_model.safetensors")) for folder in both]
        assert adapters[0].keys() == adapters[1].keys() and adapters[0]
        for k, t in adapters[0].items():
            torch.testing.assert_close(adapters[1][k], t, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.slow
def test_fsdp_no_rank_but_rank_0_reads_the_weights_and_none_holds_the_whole_model(both):
    """Every rank builds the model on the meta device; only LoRA adapters (the method's own, new
    parameters) are real before sharding. Rank 0 alone reads the file; each rank then holds about
    half of every parameter, and nothing is left on meta."""
    check_sharded_loading(both[1], list(JOBS), WORLD, lora=lambda job: job.endswith("lora"))


@pytest.mark.slow
def test_fsdp_run_killed_mid_phase_resumes_to_the_uninterrupted_run(both, tmp_path):
    """Full-tensor checkpoints: weights and optimizer gathered on rank 0, loaded back into shards."""
    with pytest.raises(torch.multiprocessing.ProcessExitedException):
        torch.multiprocessing.spawn(_worker, args=(free_port(), str(tmp_path), "killed"), nprocs=WORLD)
    killed = curve(tmp_path / RESUMED)
    assert [r["step"] for r in killed][:3] == [1, 2, 3] and len(killed) < len(curve(both[1] / RESUMED))
    torch.multiprocessing.spawn(_worker, args=(free_port(), str(tmp_path), "resume"), nprocs=WORLD)
    resumed, uninterrupted = curve(tmp_path / RESUMED), curve(both[1] / RESUMED)
    assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted]
    for a, b in zip(uninterrupted, resumed):
        for k in [k for k in a if k.endswith(("_term", "_loss"))] + ["grad_norm"]:
            assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-9), (a["step"], k)


@pytest.mark.parametrize("train, key", [({"grad_filter": "asymmetric"}, "train.grad_filter"),
                                        ({"l2sp_coef": 0.1}, "train.l2sp_coef"),
                                        ({"optimizer": {"name": "muon"}}, "train.optimizer.name"),
                                        ({"dtype": "fp16"}, "train.dtype")])
def test_fsdp_refuses_what_it_cannot_shard_when_the_config_is_read(train, key):
    with pytest.raises(ConfigError, match=f"^{key}: .*train.parallel ddp"):
        from_dict(RunConfig, merge(BRIEF, {"train": {"parallel": "fsdp", **train}}))


def test_fsdp_refuses_methods_it_does_not_shard_before_weights_load(tiny_organism, tmp_path):
    from unlearning.preflight import preflight
    cfg = from_dict(RunConfig, merge(BRIEF, {"method": "undo", "model": "organism:tiny", "output_dir": str(tmp_path),
                                             "train": {"parallel": "fsdp"}}))
    with pytest.raises(ConfigError, match="^train.parallel: fsdp is wired for sequential.*use train.parallel ddp"):
        preflight(cfg)


def test_meta_build_gives_the_loaded_model_s_adapters_buffers_and_ties(tiny_organism):
    """What sharding cannot read from the file comes from the meta build itself: LoRA adapters drawn
    from the seeded RNG as on a loaded model (lora_B too, with init_b_std), the rotary buffers, the
    tied unembedding (one parameter under two names), the config and the generation config."""
    from unlearning.core.runtime import seed_everything
    from unlearning.model.loading import load_model
    from unlearning.model.meta import load_empty
    from unlearning.training.trainable import LoraSettings, add_lora
    lora = LoraSettings(r=4, dropout=0.0, init_b_std=0.02)
    seed_everything(0)
    loaded = add_lora(load_model("organism:tiny", dtype="fp32", device="cpu")[0], lora)
    after_loaded = torch.rand(4)
    seed_everything(0)
    empty = add_lora(load_empty("organism:tiny", dtype="fp32", device=torch.device("cpu"))[0], lora)
    assert torch.equal(torch.rand(4), after_loaded)  # the same draws: training's RNG stream is the same
    params = dict(loaded.named_parameters())
    assert [n for n, _ in empty.named_parameters()] == list(params)
    real = {n: p for n, p in empty.named_parameters() if not p.is_meta}
    assert real and all("lora_" in n for n in real) and all("lora_" not in n or n in real for n in params)
    for n, p in real.items():
        assert torch.equal(p, params[n]) and p.requires_grad == params[n].requires_grad, n
    buffers = dict(loaded.named_buffers())
    for n, b in empty.named_buffers():
        assert not b.is_meta and torch.equal(b, buffers[n]), n
    inner = empty.get_base_model()
    assert inner.lm_head.weight is inner.get_input_embeddings().weight
    for attribute in ("config", "generation_config"):  # what the saved model's json files are written from
        assert getattr(inner, attribute).to_dict() == getattr(loaded.get_base_model(), attribute).to_dict()


def test_meta_build_refuses_weights_it_cannot_read_after_sharding(tiny_organism, tmp_path):
    import shutil
    from unlearning.model.meta import load_empty
    folder = tmp_path / "bin-model"
    folder.mkdir()
    shutil.copy(tiny_organism.model / "config.json", folder / "config.json")
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="^train.parallel: fsdp loads the weights after sharding, from "
                                          "safetensors .* or use train.parallel ddp$"):
        load_empty(str(folder), device=torch.device("cpu"))


@pytest.mark.parametrize("method, section, key", [
    ("sequential", {"mask": {"kind": "activation"}}, "sequential.mask.kind"),
    ("circuit_breaker", {"mask": {"kind": "probe", "artifact": "x"}}, "circuit_breaker.mask.kind"),
    ("rmu", {"steering_relative": True}, "rmu.steering_relative")])
def test_fsdp_refuses_set_up_steps_that_run_the_model_before_it_loads(tiny_organism, tmp_path, monkeypatch,
                                                                      method, section, key):
    import unlearning.preflight as preflight_module
    monkeypatch.setattr(preflight_module, "world_size", lambda: WORLD)  # as under torchrun
    cfg = from_dict(RunConfig, merge(BRIEF, {"method": method, method: section, "output_dir": str(tmp_path),
                                             "train": {"parallel": "fsdp"}}))
    with pytest.raises(ConfigError, match=f"^{key}: .*weights load only after sharding.*train.parallel ddp$"):
        preflight_module.preflight(cfg)
