"""Optimizers, schedules, ramps, gradient filters and per-layer scales, against hand-computed values."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from unlearning.core.config import from_dict, to_dict
from unlearning.core.errors import ConfigError, UserError
from unlearning.training.optim import (MuonAdamW, OptimizerConfig, asymmetric_filter, build_optimizer,
                              build_scheduler, same_sign_filter, set_grads, split_muon_params,
                              take_grads)
from unlearning.training.schedules import (build_lr_scheduler, circuit_breaker_coefs, depth_scale,
                                  forget_coef_at, layer_forget_coef, layer_steps, lr_factor,
                                  retain_coef_at)


def approx(x):
    return pytest.approx(x, rel=1e-6, abs=1e-9)


@pytest.fixture
def tiny_neox():
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    return GPTNeoXForCausalLM(cfg)


def _train_step(model, opt, seed=0):
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))
    opt.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()


# ----------------------------------------------------------------------------- config

def test_config_round_trip_and_validation():
    cfg = from_dict(OptimizerConfig, {"name": "muon", "muon_lr": 0.05, "betas": [0.9, 0.95]})
    assert cfg.name == "muon" and cfg.betas == (0.9, 0.95) and cfg.adam_lr is None
    assert from_dict(OptimizerConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="name"):
        from_dict(OptimizerConfig, {"name": "sgd"})
    with pytest.raises(ConfigError, match="lr"):
        from_dict(OptimizerConfig, {"lr": -1})
    assert OptimizerConfig(warmup_ratio=0.1).warmup_for(32) == 3
    assert OptimizerConfig(warmup_ratio=0.1, warmup_steps=5).warmup_for(32) == 5


# ----------------------------------------------------------------------------- Muon partition

def test_muon_partition_on_gpt_neox(tiny_neox):
    muon, adam = split_muon_params(tiny_neox.named_parameters())
    muon_names = {n for n, _ in muon}
    expected = {f"gpt_neox.layers.{i}.{m}.weight" for i in range(2)
                for m in ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")}
    assert muon_names == expected
    adam_names = {n for n, _ in adam}
    assert {"gpt_neox.embed_in.weight", "lm_head.weight", "gpt_neox.final_layer_norm.weight",
            "gpt_neox.layers.0.attention.query_key_value.bias", "gpt_neox.layers.1.input_layernorm.weight"} <= adam_names
    assert muon_names | adam_names == {n for n, _ in tiny_neox.named_parameters()}
    # frozen parameters are in neither
    tiny_neox.gpt_neox.layers[0].requires_grad_(False)
    muon, adam = split_muon_params(tiny_neox.named_parameters())
    assert not any(".layers.0." in n for n, _ in muon + adam)


def test_muon_optimizer_groups_lrs_and_updates(tiny_neox):
    cfg = OptimizerConfig(name="muon", muon_lr=0.02, adam_lr=2e-4, lr=1e-3)
    trained = [(n, p) for n, p in tiny_neox.named_parameters() if ".layers.1." in n]
    before = {n: p.detach().clone() for n, p in tiny_neox.named_parameters()}
    opt = build_optimizer(trained, cfg)
    assert isinstance(opt, MuonAdamW) and isinstance(opt, torch.optim.Optimizer)
    assert [g["name"] for g in opt.param_groups] == ["muon", "adamw_no_decay"]
    assert opt.param_groups[0]["lr"] == 0.02
    assert all(g["lr"] == 2e-4 for g in opt.param_groups[1:])
    _train_step(tiny_neox, opt)
    for n, p in tiny_neox.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (".layers.1." in n), n   # only the passed parameters move
    assert len(opt.state) == len(trained)


def test_muon_part_matches_torch_muon(tiny_neox):
    cfg = OptimizerConfig(name="muon", muon_lr=0.03, weight_decay=0.1, muon_momentum=0.9)
    twin = copy.deepcopy(tiny_neox)
    opt = build_optimizer(tiny_neox.named_parameters(), cfg)
    w_twin = twin.gpt_neox.layers[0].mlp.dense_h_to_4h.weight
    ref = torch.optim.Muon([w_twin], lr=0.03, weight_decay=0.1, momentum=0.9, nesterov=True,
                           adjust_lr_fn="match_rms_adamw")
    w = tiny_neox.gpt_neox.layers[0].mlp.dense_h_to_4h.weight
    w_before = w.detach().clone()
    _train_step(tiny_neox, opt)
    _train_step(twin, ref)
    assert not torch.equal(w, w_before)
    torch.testing.assert_close(w, w_twin)


def test_adamw_decays_matrices_only(tiny_neox):
    opt = build_optimizer(tiny_neox.named_parameters(), OptimizerConfig(weight_decay=0.05))
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and all(p.ndim >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])
    assert decay["lr"] == 1e-3


def test_no_trainable_parameters_is_a_user_error(tiny_neox):
    tiny_neox.requires_grad_(False)
    with pytest.raises(UserError, match="no trainable parameters"):
        build_optimizer(tiny_neox.named_parameters(), OptimizerConfig())


def test_muon_with_only_vectors_still_works():
    bias = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer([("layer.bias", bias)], OptimizerConfig(name="muon"))
    assert isinstance(opt, MuonAdamW) and opt.muon is None
    bias.grad = torch.ones(3)
    opt.step()
    assert bias.detach().lt(1).all()


def test_state_dict_round_trip_and_scheduler_after_load(tiny_neox):
    cfg = OptimizerConfig(name="muon")
    twin = copy.deepcopy(tiny_neox)
    opt = build_optimizer(tiny_neox.named_parameters(), cfg)
    for seed in range(2):
        _train_step(tiny_neox, opt, seed)
    twin.load_state_dict(tiny_neox.state_dict())
    opt2 = build_optimizer(twin.named_parameters(), cfg)
    sched2 = build_scheduler(opt2, 10, cfg)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    _train_step(tiny_neox, opt, 5)
    _train_step(twin, opt2, 5)
    for (n, a), (_, b) in zip(tiny_neox.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(a, b, msg=n)
    sched2.step()
    # the scheduler still drives the (replaced) inner groups: linear decay, 1 step of 10
    assert opt2.muon.param_groups[0]["lr"] == approx(cfg.muon_lr * 0.9)
    assert opt2.adamw.param_groups[0]["lr"] == approx(cfg.lr * 0.9)


def test_scheduler_scales_both_parts_of_muon_adamw(tiny_neox):
    cfg = OptimizerConfig(name="muon", muon_lr=0.02, adam_lr=2e-4, schedule="cosine", warmup_steps=2)
    opt = build_optimizer(tiny_neox.named_parameters(), cfg)
    sched = build_scheduler(opt, 10, cfg)
    lrs = []
    for seed in range(6):
        lrs.append((opt.muon.param_groups[0]["lr"], opt.adamw.param_groups[0]["lr"]))
        _train_step(tiny_neox, opt, seed)
        sched.step()
    factors = [lr_factor(s, 10, 2, "cosine") for s in range(6)]
    assert [m for m, _ in lrs] == pytest.approx([0.02 * f for f in factors])
    assert [a for _, a in lrs] == pytest.approx([2e-4 * f for f in factors])


# ----------------------------------------------------------------------------- LR schedules

def test_lr_factor_at_chosen_steps():
    assert [lr_factor(s, 10, 2, "cosine") for s in (0, 1, 2)] == [0.0, 0.5, 1.0]
    assert lr_factor(6, 10, 2, "cosine") == approx(0.5)                       # progress 4/8
    assert lr_factor(4, 10, 2, "cosine") == approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(4, 10, 2, "linear") == approx(0.75)
    assert lr_factor(10, 10, 2, "linear") == approx(0.0)
    assert lr_factor(10, 10, 2, "linear", min_ratio=0.1) == approx(0.1)
    assert lr_factor(6, 10, 2, "cosine", min_ratio=0.2) == approx(0.2 + 0.8 * 0.5)
    assert lr_factor(1, 10, 2, "constant") == 0.5 and lr_factor(9, 10, 2, "constant") == 1.0
    assert lr_factor(0, 10, 0, "linear") == 1.0 and lr_factor(9, 10, 0, "linear") == approx(0.1)
    with pytest.raises(UserError, match="schedule"):
        lr_factor(0, 10, 0, "step")


def test_lr_schedules_match_transformers():
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup
    for kind, hf in (("cosine", get_cosine_schedule_with_warmup), ("linear", get_linear_schedule_with_warmup)):
        ours = build_lr_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), 20,
                                  warmup_steps=3, kind=kind)
        theirs = hf(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), 3, 20)
        for _ in range(20):
            assert ours.get_last_lr()[0] == approx(theirs.get_last_lr()[0])
            ours.optimizer.step(), theirs.optimizer.step()
            ours.step(), theirs.step()


def test_bad_schedule_lengths_are_user_errors():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(UserError):
        build_lr_scheduler(opt, 0)
    with pytest.raises(UserError, match="warmup"):
        build_lr_scheduler(opt, 5, warmup_steps=6)


# ----------------------------------------------------------------------------- coefficient ramps

def test_sequential_ramps_at_chosen_steps():
    assert retain_coef_at(0, 32, 4.0) == approx(1.0)
    assert retain_coef_at(16, 32, 4.0) == approx(2.5)
    assert retain_coef_at(32, 32, 4.0) == approx(4.0)
    assert retain_coef_at(40, 32, 4.0) == approx(4.0)               # held after the phase's end
    assert retain_coef_at(0, 32, 4.0, start_fraction=0.0) == 0.0    # "ramp retain from zero"
    assert retain_coef_at(8, 32, 4.0, start_fraction=0.0) == approx(1.0)
    assert forget_coef_at(0, 32, 10.0) == approx(10.0)
    assert forget_coef_at(16, 32, 10.0) == approx(8.75)
    assert forget_coef_at(32, 32, 10.0) == approx(7.5)


def test_circuit_breaker_schedule_at_chosen_steps():
    assert circuit_breaker_coefs(0, 100, 5.0, 10.0) == (0.0, 10.0)
    assert circuit_breaker_coefs(50, 100, 5.0, 10.0) == (approx(1.25), approx(7.5))
    assert circuit_breaker_coefs(100, 100, 5.0, 10.0) == (approx(2.5), approx(5.0))


# ----------------------------------------------------------------------------- per-layer scales

def test_layer_steps_reproduce_the_notebook_totals():
    layers = [31, 27, 23, 19, 15, 11]
    steps4 = [layer_steps(128, layer, 31, 4) for layer in layers]
    assert steps4 == [128, 177, 227, 276, 326, 375] and sum(steps4) == 1509   # run 56: ~1509
    assert sum(layer_steps(128, layer, 31, 8) for layer in layers) == 2500     # run 57: ~2500
    assert [layer_steps(128, layer, 31, 1) for layer in layers] == [128] * 6
    assert layer_steps(10, 0, 20, 3) == 30 and layer_steps(10, 10, 20, 3) == 20
    assert layer_steps(1, 5, 5, 0.1) == 1 and layer_steps(1, 0, 5, 0.1) == 1     # at least one step
    with pytest.raises(ValueError):
        layer_steps(128, 32, 31, 4)


def test_layer_forget_coef_and_depth_scale():
    assert layer_forget_coef(5.0, 31, 31, 50) == approx(5.0)
    assert layer_forget_coef(5.0, 11, 31, 50) == approx(5.0 * (1 + 49 * 20 / 31))
    assert layer_forget_coef(5.0, 0, 31, 50) == approx(250.0)
    assert depth_scale(0, 0, 7) == 1.0


# ----------------------------------------------------------------------------- gradient filters

def test_same_sign_filter_by_hand():
    g_r = [torch.tensor([1.0, -2.0, 3.0, 0.0, -1.0])]
    g_f = [torch.tensor([2.0, 1.0, -1.0, 4.0, -3.0])]
    (out,) = same_sign_filter(g_r, g_f)
    assert out.tolist() == [3.0, 0.0, 0.0, 0.0, -4.0]


def test_asymmetric_filter_by_hand():
    g_r = [torch.tensor([1.0, -2.0, 3.0, 0.0, -1.0])]
    g_f = [torch.tensor([2.0, 1.0, -1.0, 4.0, -3.0])]
    (out,) = asymmetric_filter(g_r, g_f)
    # forget kept where it agrees (or retain is 0), dropped where it disagrees; retain always kept
    assert out.tolist() == [3.0, -2.0, 3.0, 4.0, -4.0]


def test_filters_with_missing_gradients():
    g = torch.tensor([1.0, -1.0])
    assert same_sign_filter([None], [None]) == [None]
    assert same_sign_filter([g], [None])[0].tolist() == [0.0, 0.0]
    assert asymmetric_filter([g], [None])[0].tolist() == [1.0, -1.0]
    assert asymmetric_filter([None], [g])[0].tolist() == [1.0, -1.0]
    with pytest.raises(ValueError):
        same_sign_filter([g], [g, g])


def test_take_and_set_grads_drive_a_filtered_step():
    w = torch.nn.Parameter(torch.tensor([1.0, 1.0, 1.0]))
    (w * torch.tensor([1.0, 1.0, -1.0])).sum().backward()        # retain gradient [1, 1, -1]
    g_r = take_grads([w])
    assert w.grad is None
    (w * torch.tensor([2.0, -1.0, -1.0])).sum().backward()       # forget gradient [2, -1, -1]
    g_f = take_grads([w])
    set_grads([w], same_sign_filter(g_r, g_f))
    torch.optim.SGD([w], lr=0.5).step()
    assert w.detach().tolist() == [1.0 - 1.5, 1.0, 1.0 + 1.0]
