"""``train.parallel: fsdp`` with ``checkpoint_transfer``: the teacher is sharded as the model is.

One spawn of two gloo processes runs a LoRA checkpoint-transfer job on the tiny organism (its teacher:
the build's early checkpoint, ``organism:tiny@early``) and one process runs it too, as
``tests/test_fsdp.py`` does for the other methods: the same losses, ``forget_acc`` (the teacher's
logits, on the metric steps only, so both kinds of teacher forward run), evaluations and saved model.
A spy on each rank records that the teacher, like the model, was on the meta device until sharded,
that each rank then holds half of it and that rank 0 alone read its file. A teacher that cannot be
sharded like the model is refused in one line before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gloo import assert_same_curve, check_sharded_loading, curve, join_gloo, one_and_two_processes, spy_on_loading
from test_distributed import BRIEF, MICRO_BATCHES, WORLD
from test_fsdp import FSDP
from unlearning.core.config import from_dict, merge
from unlearning.core.errors import ConfigError
from unlearning.runner import RunConfig, run

NAME = "checkpoint_transfer_lora"
# metrics_every 2 of 3 steps: step 1 runs the teacher only to layer 2, steps 2 and 3 to its logits
JOB = {"method": "checkpoint_transfer", "checkpoint_transfer": {
    "target_layers": [1, 2], "finetune": "lora", "steps": 3, "metrics_every": 2,
    "lora": {"r": 4, "dropout": 0.0, "init_b_std": 0.02}}}


def job_config(out: Path, grad_accum: int, **extra) -> RunConfig:
    return from_dict(RunConfig, merge(merge(merge(BRIEF, FSDP), JOB), {
        "name": NAME, "output_dir": str(out), "train": {"grad_accum": grad_accum}, **extra}))


def spy_on_the_teacher(rank: int, out: Path) -> None:
    """Record each teacher forward on this rank (with logits or not, and whether every teacher
    parameter was a shard again after it) and whether the teacher was dropped when training ended."""
    from torch.distributed.tensor import DTensor
    from unlearning.methods.checkpoint_transfer import CheckpointTransfer
    forward, end = CheckpointTransfer.teacher_hidden, CheckpointTransfer.end_phase

    def write(record):
        with open(out / f"teacher-rank{rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def teacher_hidden(self, batch, logits):
        result = forward(self, batch, logits)
        write({"logits": logits, "resharded": all(isinstance(p, DTensor) for p in self.teacher.parameters())})
        return result

    def end_phase(self, model, phase):
        end(self, model, phase)
        write({"dropped": self.teacher is None})

    CheckpointTransfer.teacher_hidden, CheckpointTransfer.end_phase = teacher_hidden, end_phase


def _worker(rank: int, port: int, out: str) -> None:
    join_gloo(rank, WORLD, port)
    spy_on_loading(rank, Path(out))
    spy_on_the_teacher(rank, Path(out))
    try:
        run(job_config(Path(out), MICRO_BATCHES // WORLD))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def both(tiny_organism, tmp_path_factory):
    """(one process's output folder, two FSDP processes' output folder)."""
    return one_and_two_processes(_worker, lambda folder: run(job_config(folder, MICRO_BATCHES)),
                                 tmp_path_factory, WORLD)


@pytest.mark.slow
def test_fsdp_sharded_teacher_gives_one_process_losses_evaluations_and_model(both):
    single, double = (curve(folder / NAME) for folder in both)
    assert [r["step"] for r in single] == [r["step"] for r in double] == [1, 2, 3]
    assert [("forget_acc" in r) for r in double] == [False, True, True]  # the teacher's logits: metric steps
    assert "cb_loss" in assert_same_curve(single, double, extra=("forget_acc",))
    results = [json.loads((folder / NAME / "results.json").read_text()) for folder in both]
    assert results[1]["status"] == "complete"  # the after-evaluation ran once the teacher was dropped
    for when in ("before", "after"):
        assert results[1][when]["organism_hazard_cloze"]["acc"] == results[0][when]["organism_hazard_cloze"]["acc"]
    from safetensors.torch import load_file
    for file in ("model/model.safetensors", "adapter/adapter_model.safetensors"):
        saved = [load_file(str(folder / NAME / file)) for folder in both]
        assert saved[0].keys() == saved[1].keys() and saved[0]
        for k, t in saved[0].items():
            torch.testing.assert_close(saved[1][k], t, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.slow
def test_fsdp_teacher_is_meta_until_sharded_and_only_rank_0_reads_its_file(both):
    """Each rank shards the teacher (built by the method, so first) and then the model; the teacher
    is frozen and wholly meta before, and each rank then holds about half of it."""
    check_sharded_loading(both[1], ["teacher", "model"], WORLD, lora=lambda name: name == "model")
    for rank in range(WORLD):
        teacher, model = (json.loads(line) for line in (both[1] / f"spy-rank{rank}.jsonl").read_text().splitlines())
        assert teacher["frozen"] and teacher["meta"] == teacher["total"] and not model["frozen"], rank


@pytest.mark.slow
def test_fsdp_teacher_runs_alike_on_every_rank_reshards_and_is_dropped(both):
    """The teacher's forwards are collectives: every rank ran the same ones (one per forget micro-batch,
    logits on the metric steps), each left it sharded, and training's end dropped it on every rank."""
    ranks = [[json.loads(line) for line in (both[1] / f"teacher-rank{r}.jsonl").read_text().splitlines()]
             for r in range(WORLD)]
    micro = MICRO_BATCHES // WORLD
    assert ranks[0] == ranks[1]
    assert [r.get("logits") for r in ranks[0]] == [False] * micro + [True] * 2 * micro + [None]
    assert all(r["resharded"] for r in ranks[0][:-1]) and ranks[0][-1] == {"dropped": True}


def _smaller_model(source: Path, folder: Path) -> Path:
    """A copy of ``source`` without its last decoder layer: another size, in safetensors."""
    import shutil
    from safetensors.torch import load_file, save_file
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    last = config["num_hidden_layers"] - 1
    config["num_hidden_layers"] = last
    (folder / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(source / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if f"layers.{last}." not in k}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("teacher", ["bin", "smaller"])
def test_fsdp_refuses_a_teacher_it_cannot_shard_like_the_model_before_writing(tiny_organism, tmp_path,
                                                                            monkeypatch, teacher):
    import unlearning.preflight as preflight_module
    if teacher == "bin":
        folder = tmp_path / "bin-teacher"
        folder.mkdir()
        (folder / "config.json").write_text((tiny_organism.model / "config.json").read_text())
        torch.save({}, folder / "pytorch_model.bin")
        expected = "^checkpoint_transfer.checkpoint: fsdp loads the weights after sharding, from safetensors"
    else:
        folder = _smaller_model(tiny_organism.model, tmp_path / "smaller-teacher")
        expected = r"^checkpoint_transfer.checkpoint: under train.parallel fsdp the teacher .* must have its " \
                   r"architecture and size, .* differs at \S*layers\.3\.\S* \(absent in the teacher"
    monkeypatch.setattr(preflight_module, "world_size", lambda: WORLD)  # as under torchrun
    out = tmp_path / "runs"
    cfg = job_config(out, MICRO_BATCHES, checkpoint_transfer={"checkpoint": str(folder)})
    with pytest.raises(ConfigError, match=expected + ".* use train.parallel ddp[^\n]*$") as error:
        run(cfg)
    assert "\n" not in str(error.value)
    assert not (out / NAME).exists()


def test_fsdp_preflight_accepts_the_organism_s_early_checkpoint(tiny_organism, tmp_path, monkeypatch):
    import unlearning.preflight as preflight_module
    monkeypatch.setattr(preflight_module, "world_size", lambda: WORLD)
    preflight_module.preflight(job_config(tmp_path, MICRO_BATCHES))
