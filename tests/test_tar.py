"""TAR (`method: tar`): the inner attack really moves a functional copy of the parameters (never the
model's own), the outer gradient is the gradient at the attacked parameters (first-order), the
adversary draws repeat through state_dict, and a killed run resumes bit-identically."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call

from run_setup import Job
from test_faults import KILLED, expect, results, same_weights, strip, unlearn
from tiny_models import tiny_batch, tiny_model
from unlearning.core.errors import ConfigError
from unlearning.core.io import read_jsonl
from unlearning.data.text import TokenizedData
from unlearning.methods import tar
from unlearning.methods.context import BuildContext
from unlearning.methods.sequential_losses import forget_loss
from unlearning.runner import load_run_config
from unlearning.training.loop import TrainConfig


def _setup(seed: int = 0, **cfg):
    model = tiny_model("gpt_neox", layers=3, seed=seed).train()
    ids, mask = tiny_batch(4, 9, seed=2)
    data = {"forget": TokenizedData(ids, mask), "retain": TokenizedData(*tiny_batch(4, 9, seed=3))}
    ctx = BuildContext(model_name="unused", tokenizer=None, data=data, device=torch.device("cpu"),
                       train=TrainConfig(batch_size=2, grad_accum=1), seed=seed)
    model, method = tar.build(model, ctx, tar.Config(**cfg))
    method.begin_phase(model, method.phases()[0])
    batches = {"forget": data["forget"].rows(torch.arange(2)), "retain": data["retain"].rows(torch.arange(2))}
    return model, method, batches


@pytest.mark.parametrize("rank", [0, 4])
def test_the_inner_attack_moves_a_functional_copy_and_lowers_its_loss(rank):
    model, method, _ = _setup(adversary_lrs=[1e-2], adversary_steps=[6], adversary_lora_ranks=[rank])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    attack = method.inner_attack(model, method.sample_adversary())
    assert attack.adapted and all(n in before for n in attack.adapted)
    moved = [n for n, w in attack.adapted.items() if not torch.equal(w, before[n])]
    assert len(moved) == len(attack.adapted)  # every attacked tensor changed
    assert attack.nll[-1] < attack.nll[0]  # the adversary learns its text
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())  # the model did not
    assert all(p.grad is None for p in model.parameters())
    if rank:  # LoRA: only the 2-D weights, each moved by a rank-r delta
        assert all(w.dim() == 2 for w in attack.adapted.values())
        n = next(iter(attack.adapted))
        assert torch.linalg.matrix_rank(attack.adapted[n] - before[n]) <= rank


def test_the_outer_gradient_is_the_tamper_resistance_gradient_at_the_attacked_parameters():
    model, method, batches = _setup(adversary_lrs=[5e-2], adversary_steps=[4], retain_coef=0.0)
    state = copy.deepcopy(method.state_dict())
    method.losses(model, batches, None).total().backward()
    outer = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert outer and set(outer) == set(method.trainable)

    method.load_state_dict(state)  # the same adversary, the same inner batches
    adapted = method.inner_attack(model, method.sample_adversary()).adapted
    leaves = {n: w.clone().requires_grad_(True) for n, w in adapted.items()}
    kwargs = {"input_ids": batches["forget"]["input_ids"], "attention_mask": batches["forget"]["attention_mask"]}

    def tr_grad(params):
        loss = forget_loss("max_entropy_kl", functional_call(model, params, (), kwargs).logits, batches["forget"])
        return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))

    at_attacked = tr_grad(leaves)
    for n in outer:
        torch.testing.assert_close(outer[n], at_attacked[n], rtol=1e-4, atol=1e-7)
    at_start = tr_grad({n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()
                        if n in outer})
    assert any(not torch.allclose(outer[n], at_start[n], rtol=1e-2, atol=1e-6) for n in outer)


def test_adversaries_are_drawn_from_the_grid_and_repeat_after_load_state_dict():
    _, method, _ = _setup(adversary_lrs=[1e-4, 1e-3], adversary_steps=[2, 4, 8], adversary_lora_ranks=[0, 8])
    state = copy.deepcopy(method.state_dict())
    draws = [method.sample_adversary() for _ in range(40)]
    assert {d.lr for d in draws} == {1e-4, 1e-3} and {d.steps for d in draws} == {2, 4, 8}
    assert {d.lora_rank for d in draws} == {0, 8}
    method.load_state_dict(state)
    assert [method.sample_adversary() for _ in range(40)] == draws


def test_bad_tar_settings_are_one_line_errors_naming_the_key():
    with pytest.raises(ConfigError, match="tar.adversary_lrs"):
        load_run_config(None, ["--method", "tar", "--tar.adversary_lrs", "[]"])
    with pytest.raises(ConfigError, match="tar.adversary_steps"):
        load_run_config(None, ["--method", "tar", "--tar.adversary_steps", "[0]"])
    with pytest.raises(ConfigError, match="tar.layers"):
        tar.validate(tar.Config(layers=[9]), depth=4)


def test_a_killed_tar_run_resumes_to_the_uninterrupted_run(tmp_path):
    job = Job(tmp_path)
    sections = {"method": "tar", "tar": {"steps": 4, "adversary_steps": [1, 2], "adversary_lora_ranks": [0, 2],
                                         "adversary_lrs": [1e-3, 1e-2]},
                "train": {"checkpoint_every": 1}, "eval": {"before": False}}
    ref_cfg, cfg = job.yaml("ref", **sections), job.yaml("killed", **sections)
    expect(unlearn("run", str(ref_cfg), cwd=job.root), 0)
    expect(unlearn("run", str(cfg), fault="train_step:3", cwd=job.root), KILLED)
    expect(unlearn("run", str(cfg), "--resume", cwd=job.root), 0)
    ref, rundir = job.runs / "ref", job.runs / "killed"
    assert "resuming at step 3 of 4" in (rundir / "log.txt").read_text()
    same_weights(rundir / "model", ref / "model")
    assert strip(results(rundir)) == strip(results(ref))
    records = read_jsonl(rundir / "metrics.jsonl")
    assert strip(records) == strip(read_jsonl(ref / "metrics.jsonl"))
    assert len({(r["adversary_lr"], r["adversary_steps"], r["adversary_lora_rank"]) for r in records}) > 1
