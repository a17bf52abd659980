"""Sequential unlearning on tiny random models: gradient filters, L2-SP, metrics, LR schedules, loop options."""

from __future__ import annotations

import math

import pytest
import torch

from sequential_setup import CPU, DEPTH, batch_of, context, ctx_for, make_data, setup
from tiny_models import float_logs, tiny_model, tiny_tokenizer
from unlearning.core.config import from_dict
from unlearning.data.text import BatchStream
from unlearning.methods import sequential as seq
from unlearning.training import loop
from unlearning.training.loop import backward, train
from unlearning.training.optim import asymmetric_filter, same_sign_filter
from unlearning.runner import RunConfig


# ----------------------------------------------------------------------------------------------- filters, L2-SP

@pytest.mark.parametrize("kind, fn", [("same_sign", same_sign_filter), ("asymmetric", asymmetric_filter)])
def test_gradient_filters_act_on_the_methods_forget_and_retain_split(kind, fn):
    model, method, data, _ = setup()
    named = method.begin_phase(model, method.phases()[1])
    params = [p for _, p in named]
    batches = {"forget": batch_of(data["forget"]), "retain": batch_of(data["retain"])}
    model.eval()
    terms = method.losses(model, batches, ctx_for(method, 1))
    g_f = torch.autograd.grad(sum(terms.forget.values()), params, retain_graph=True, allow_unused=True)
    g_r = torch.autograd.grad(sum(terms.retain.values()), params, retain_graph=True, allow_unused=True)
    zeros = lambda gs: [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]  # noqa: E731
    expected = fn(zeros(g_r), zeros(g_f))
    backward(terms, params, kind, 1.0)
    for p, e in zip(params, expected):
        assert torch.allclose(p.grad, e)
    # the filter really filters: the unfiltered sum differs somewhere
    assert any(not torch.allclose(a + b, e) for a, b, e in zip(zeros(g_r), zeros(g_f), expected))


def test_l2sp_term_appears_and_grows_with_distance():
    model, method, data, run_cfg = setup({"steps_per_layer": 3, "layers": [3]},
                                         {"l2sp_coef": 1.0, "optimizer": {"lr": 1e-2}})
    records = []
    train(model, method, {k: BatchStream(v, 2) for k, v in data.items()}, run_cfg.train, device=CPU,
          on_step=records.append)
    assert records[0]["l2sp_term"] == 0.0 and records[-1]["l2sp_term"] > 0


def test_metrics_record_each_term_coefficients_layer_lr_and_grad_norm():
    model, method, data, run_cfg = setup({"steps_per_layer": 2})
    records = []
    train(model, method, {k: BatchStream(v, 2) for k, v in data.items()}, run_cfg.train, device=CPU,
          on_step=records.append)
    assert len(records) == 6 and [r["layer"] for r in records] == [3, 3, 2, 2, 1, 1]
    for key in ("forget_loss", "retain_loss", "retain_l2_loss", "forget_term", "retain_l2_term", "forget_coef",
                "retain_coef", "lr", "grad_norm"):
        assert all(key in r and math.isfinite(r[key]) for r in records), key


@pytest.mark.parametrize("scope", ["phase", "run"])
def test_lr_schedule_restarts_each_phase_or_spans_the_run(scope):
    model, method, data, run_cfg = setup({"steps_per_layer": 4},
                                         {"schedule_scope": scope,
                                          "optimizer": {"lr": 1e-3, "schedule": "linear", "warmup_steps": 1}})
    records = []
    train(model, method, {k: BatchStream(v, 2) for k, v in data.items()}, run_cfg.train, device=CPU,
          on_step=records.append)
    lrs = [r["lr"] for r in records]
    if scope == "phase":   # warm-up then decay, three times over
        assert lrs[:4] == pytest.approx([0.0, 1e-3, 1e-3 * 2 / 3, 1e-3 / 3])
        assert lrs[4:8] == pytest.approx(lrs[:4]) and lrs[8:] == pytest.approx(lrs[:4])
    else:                  # one warm-up, one decay over all 12 steps
        assert lrs[0] == 0.0 and lrs[1] == pytest.approx(1e-3)
        assert all(a > b for a, b in zip(lrs[1:], lrs[2:]))


# ----------------------------------------------------------------------------------------------- loop options

def test_max_grad_norm_clips_what_the_optimizer_sees(monkeypatch):
    seen = []
    real = loop.build_optimizer

    def spy(named, cfg):
        named = list(named)
        opt = real(named, cfg)
        opt.register_step_pre_hook(lambda *_: seen.append(
            float(torch.stack([p.grad.norm() for _, p in named if p.grad is not None]).norm())))
        return opt

    monkeypatch.setattr(loop, "build_optimizer", spy)
    for limit in (1e-3, 0.0):
        seen.clear()
        model, method, data, run_cfg = setup({"steps_per_layer": 2, "layers": [3]}, {"max_grad_norm": limit})
        records = []
        train(model, method, {k: BatchStream(v, 2) for k, v in data.items()}, run_cfg.train, device=CPU,
              on_step=records.append)
        assert all(r["grad_norm"] > 1e-2 for r in records)          # the logged norm is before clipping
        if limit:
            assert all(n <= limit * 1.01 for n in seen)
        else:                                                       # 0 disables clipping
            assert seen == pytest.approx([r["grad_norm"] for r in records], rel=1e-4)


def test_grad_accum_draws_micro_batches_and_the_seed_fixes_the_run():
    def trained(seed: int, accum: int = 2):
        model, method, data, run_cfg = setup({"steps_per_layer": 2, "layers": [3], "forget_loss": "random_ce"},
                                             {"grad_accum": accum, "seed": seed}, perturb_lora=False)
        model.train()   # LoRA dropout on: the seed must fix it too
        streams = {k: BatchStream(v, 2) for k, v in data.items()}
        train(model, method, streams, run_cfg.train, device=CPU)
        assert streams["forget"].position == 2 * accum and streams["retain"].position == 2 * accum
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    a, b, c = trained(0), trained(0), trained(1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    trained(0, accum=3)


def test_lora_settings_choose_rank_and_modules():
    model, method, _, _ = setup({"lora": {"r": 4, "modules": ["dense_4h_to_h"]}})
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all("dense_4h_to_h" in n for n in lora)
    assert all(4 in p.shape for p in lora.values())


def test_mask_from_the_config_is_applied_at_build_and_changes_the_forget_loss():
    run_cfg = from_dict(RunConfig, {"model": "x", "train": {"batch_size": 2, "grad_accum": 1},
                                    "sequential": {"steps_per_layer": 2,
                                                   "mask": {"kind": "keyword", "keywords": [r"\bw[1-2]\d\b"],
                                                            "cache": False}}})
    data = {"forget": make_data(), "retain": make_data(seed=1)}
    model, method = seq.build(tiny_model("gpt_neox", layers=DEPTH), context(run_cfg, data, tiny_tokenizer()),
                              run_cfg.method_config())
    mask = data["forget"].loss_mask
    ids = data["forget"].input_ids
    assert torch.equal(mask, (ids >= 10) & (ids <= 29) & data["forget"].attention_mask.bool())
    model.eval()
    batches = {"forget": batch_of(data["forget"]), "retain": batch_of(data["retain"])}
    with_mask = float_logs(method.losses(model, batches, ctx_for(method)))["forget_loss"]
    del batches["forget"]["loss_mask"]
    without = float_logs(method.losses(model, batches, ctx_for(method)))["forget_loss"]
    assert with_mask != pytest.approx(without, rel=1e-4)
