"""``unlearn tamper --parallel fsdp``: 2 CPU processes (gloo, FSDP2) at the same global batch give one process's curve.

One spawn of two real processes runs one grid of a full fine-tuning and a LoRA attack on the tiny
organism through the command's own entry point, as ``tests/test_fsdp.py`` does for ``unlearn run``
(its tolerance): every rank builds the attacked model on the meta device, LoRA adapters get their
one-process initial values there, and rank 0 alone reads the weights file (a spy on each rank
records that). The evaluations at step 0 and every ``--eval-every`` steps run on the sharded model
(every question on every rank); rank 0 writes the curve. One process runs the same command with
4 micro-batches per step, each rank 2. A 2-process attack SIGKILLed mid-way resumes to the
uninterrupted curve; the combinations FSDP cannot run are refused before anything is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from gloo import check_sharded_loading, free_port, join_gloo, one_and_two_processes, spy_on_loading
from unlearning.core.errors import ConfigError

WORLD = 2
MICRO_BATCHES = 4  # per step in one process; WORLD processes run MICRO_BATCHES // WORLD each
# evaluated at steps 0, 2 and 4; a checkpoint (state.pt) at each of them
RECIPE = ["--model", "organism:tiny", "--steps", "4", "--eval-every", "2", "--examples", "16", "--seq-len", "32",
          "--batch-size", "2", "--base", "none", "--reference", "none", "--limit", "4", "--dtype", "fp32",
          "--lr", "1e-3", "--parallel", "fsdp"]
GRID = ["--attacks", "full,lora4", "--name", "tamper"]
CELLS = ("organism_tiny-full", "organism_tiny-lora4")  # in the order the grid runs (and shards) them


def tamper(out: Path, grad_accum: int, *args: str) -> int:
    from unlearning.commands.tamper import main
    return main([*RECIPE, *args, "--grad-accum", str(grad_accum), "--output-dir", str(out)])


def _worker(rank: int, port: int, out: str, mode: str = "grid") -> None:
    if mode == "killed":  # both ranks SIGKILL themselves after step 3: state.pt holds step 2
        os.environ["UNLEARNING_FAULT"] = "train_step:3"
    join_gloo(rank, WORLD, port)
    spy_on_loading(rank, Path(out))
    try:
        if mode == "grid":
            assert tamper(Path(out), MICRO_BATCHES // WORLD, *GRID) == 0
        else:
            assert tamper(Path(out), MICRO_BATCHES // WORLD, "--attacks", "full", "--name", "killed",
                          *(["--resume"] if mode == "resume" else [])) == 0
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def both(tiny_organism, tmp_path_factory):
    """(one process's output folder, two FSDP processes' output folder)."""
    return one_and_two_processes(_worker, lambda folder: tamper(folder, MICRO_BATCHES, *GRID), tmp_path_factory,
                                 WORLD)


def read_curve(folder: Path, cell: str) -> dict:
    return json.loads((folder / cell / "tamper.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("cell", CELLS)
def test_fsdp_attack_under_two_processes_gives_one_process_curve(both, cell):
    single, double = (read_curve(folder / "tamper" / "attacks", cell) for folder in both)
    assert double["status"] == "complete" and len(single["train_losses"]) == 4
    assert double["config"]["parallel"] == "fsdp"
    assert double["train_losses"] == pytest.approx(single["train_losses"], rel=1e-4)
    assert [p["step"] for p in double["points"]] == [p["step"] for p in single["points"]] == [0, 2, 4]
    for a, b in zip(single["points"], double["points"]):  # scored on the sharded model, every question per rank
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        for task, result in a["eval"].items():
            assert b["eval"][task]["acc"] == result["acc"], (cell, a["step"])
            assert b["eval"][task]["correct_prob"] == pytest.approx(result["correct_prob"], rel=1e-4)
    record = json.loads((both[1] / "tamper" / "attacks" / cell / "attack.json").read_text())
    assert record["status"] == "complete" and record["headline"]["value"] == pytest.approx(
        json.loads((both[0] / "tamper" / "attacks" / cell / "attack.json").read_text())["headline"]["value"])
    assert not (both[1] / "tamper" / "attacks" / cell / "state.pt").exists()


@pytest.mark.slow
def test_fsdp_attack_no_rank_but_rank_0_reads_the_weights_and_none_holds_the_whole_model(both):
    """Every rank builds the attacked model on the meta device; only the LoRA adapters are real
    before sharding. Rank 0 alone reads the file; each rank then holds about half of every parameter."""
    check_sharded_loading(both[1], list(CELLS), WORLD, lora=lambda cell: "lora" in cell)


@pytest.mark.slow
def test_fsdp_attack_killed_mid_way_resumes_to_the_uninterrupted_curve(both, tmp_path):
    """The loop's full-tensor checkpoint at step 2, loaded back into shards, continues the attack."""
    with pytest.raises(torch.multiprocessing.ProcessExitedException):
        torch.multiprocessing.spawn(_worker, args=(free_port(), str(tmp_path), "killed"), nprocs=WORLD)
    attacks = tmp_path / "killed" / "attacks"
    killed = read_curve(attacks, "organism_tiny")
    assert killed["status"] == "running" and [p["step"] for p in killed["points"]] == [0, 2]
    torch.multiprocessing.spawn(_worker, args=(free_port(), str(tmp_path), "resume"), nprocs=WORLD)
    resumed, uninterrupted = read_curve(attacks, "organism_tiny"), read_curve(both[1] / "tamper" / "attacks", CELLS[0])
    assert resumed["status"] == "complete"
    assert resumed["train_losses"] == pytest.approx(uninterrupted["train_losses"], rel=1e-6)
    assert [p["step"] for p in resumed["points"]] == [0, 2, 4]
    for a, b in zip(uninterrupted["points"], resumed["points"]):
        for task, result in a["eval"].items():
            assert b["eval"][task]["acc"] == result["acc"]
            assert b["eval"][task]["correct_prob"] == pytest.approx(result["correct_prob"], rel=1e-6)


@pytest.mark.parametrize("args, setting", [(["--dtype", "fp16"], "dtype fp16"),
                                           (["--optimizer", "muon"], "optimizer muon")])
def test_fsdp_attack_refuses_what_it_cannot_shard_before_anything_is_written(tiny_organism, tmp_path, args,
                                                                             setting):
    from unlearning.commands.tamper import main
    with pytest.raises(ConfigError, match=f"^attack.parallel: fsdp with {setting} .*--parallel ddp$") as e:
        main(["--model", "organism:tiny", "--parallel", "fsdp", *args, "--output-dir", str(tmp_path)])
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_fsdp_attack_refuses_weights_it_cannot_read_after_sharding_before_anything_is_written(
        tiny_organism, tmp_path, monkeypatch):
    import shutil
    import unlearning.preflight as preflight_module
    from unlearning.commands.tamper import main
    monkeypatch.setattr(preflight_module, "world_size", lambda: WORLD)  # as under torchrun
    folder = tmp_path / "bin-model"
    folder.mkdir()
    shutil.copy(tiny_organism.model / "config.json", folder / "config.json")
    torch.save({}, folder / "pytorch_model.bin")
    out = tmp_path / "runs"
    with pytest.raises(ConfigError, match="^attack.parallel: fsdp loads the weights after sharding, from "
                                          "safetensors .* or use attack.parallel ddp$"):
        main(["--model", str(folder), "--organism", "tiny", "--base", "none", "--reference", "none",
              "--parallel", "fsdp", "--output-dir", str(out)])
    assert not out.exists()
