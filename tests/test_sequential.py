"""Sequential unlearning on tiny random models: layers, steps, ramps, probe, gradients, losses.

Filters, L2-SP, metrics, schedules and loop options: test_sequential_options.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from sequential_setup import CPU, DEPTH, batch_of, ctx_for, setup
from tiny_models import float_logs
from unlearning.core.config import from_dict
from unlearning.core.errors import ConfigError
from unlearning.data.text import BatchStream
from unlearning.model.layers import get_parts
from unlearning.methods import sequential as seq
from unlearning.training.loop import StepContext, train
from unlearning.methods.sequential_losses import forget_loss, position_mask, probe_logits


def reached(g) -> bool:
    """A gradient that is there and not all zero."""
    return g is not None and bool(g.abs().sum() > 0)


def lora_layer(name: str) -> int:
    return int(name.split(".layers.")[1].split(".")[0])


# ----------------------------------------------------------------------------------------------- layers, steps

def test_auto_layers_match_the_notebook_on_32_layers_and_cover_tiny():
    assert seq.auto_layers(32) == [31, 27, 23, 19, 15, 11]
    assert seq.auto_layers(4) == [3, 2, 1]
    assert seq.target_layers("31->0:1", 32) == list(range(31, -1, -1))
    assert seq.target_layers([28, 24], 32) == [28, 24]
    with pytest.raises(ConfigError, match="4 layers"):
        seq.target_layers("31->11:4", 4)


def test_steps_from_epochs_and_the_deep_layer_step_scale():
    cfg = seq.Config(epochs_per_layer=2.0)
    assert seq.base_steps(cfg, 1024, 4, 8) == 64  # 2 epochs of 1024 examples at 32 per step
    assert seq.base_steps(seq.Config(steps_per_layer=7), 1024, 4, 8) == 7
    _, method, _, _ = setup({"steps_per_layer": 4, "deep_layer_step_scale": 3.0, "layers": "3->1:1"})
    # layer L: 4 * (1 + 2 * (3 - L) / 3), rounded down
    assert method.steps == [4, 6, 9]
    assert [p.steps for p in method.phases()] == [4, 6, 9]
    assert [p.layer for p in method.phases()] == [3, 2, 1]


def test_build_logs_examples_steps_per_phase_and_total(caplog, monkeypatch):
    import logging
    monkeypatch.setattr(logging.getLogger("unlearning"), "propagate", True)  # a run's set-up turns it off
    caplog.set_level("INFO", logger="unlearning.methods.sequential")
    setup({"steps_per_layer": 3})
    text = caplog.text
    assert "8 unique forget" in text and "steps per phase [3, 3, 3]" in text and "9 steps in total" in text


def test_coefficient_ramps_and_forget_layer_scale():
    _, method, _, _ = setup({"remove_coef": 8.0, "retain_coef": 4.0, "steps_per_layer": 10,
                             "forget_layer_scale": 4.0})
    phase0 = method.phases()[0]   # layer 3 = the first (deepest) target: scale 1
    f, r = method.coefficients(StepContext(phase0, 0, 0, 30))
    assert (f, r) == pytest.approx((8.0, 1.0))          # forget starts at remove_coef, retain at 0.25x
    f, r = method.coefficients(StepContext(phase0, 5, 5, 30))
    assert (f, r) == pytest.approx((8.0 * (1 - 0.25 * 0.5), 1.0 + 3.0 * 0.5))
    phase2 = method.phases()[2]   # layer 1: scale 1 + 3 * (3 - 1) / 3 = 3
    f, r = method.coefficients(StepContext(phase2, 0, 20, 30))
    assert (f, r) == pytest.approx((24.0, 1.0))
    # ramps restart in each phase; "ramp retain from zero" starts at 0
    _, method, _, _ = setup({"retain_ramp_start": 0.0, "forget_ramp_end": 0.5, "steps_per_layer": 4})
    assert method.coefficients(StepContext(method.phases()[1], 0, 4, 12)) == pytest.approx((5.0, 0.0))
    assert method.coefficients(StepContext(method.phases()[1], 4, 8, 12)) == pytest.approx((2.5, 2.0))


def test_config_validation():
    with pytest.raises(ConfigError, match="retain_losses"):
        from_dict(seq.Config, {"retain_losses": {"mse": 1.0}})
    with pytest.raises(ConfigError, match="npo_full_model"):
        from_dict(seq.Config, {"npo_full_model": True})
    with pytest.raises(ConfigError, match="retain_layers"):
        from_dict(seq.Config, {"retain_layers": "middle"})
    with pytest.raises(ConfigError, match="forget_loss"):
        from_dict(seq.Config, {"forget_loss": "gradient_ascent"})


def test_retain_layers_default_clipped_all_target_and_checked():
    assert seq.retain_layers_for(seq.DEFAULT_RETAIN_LAYERS, 32, 27) == [5, 10, 15, 20, 25, 30]
    assert seq.retain_layers_for(seq.DEFAULT_RETAIN_LAYERS, 4, 2) == [3]
    assert seq.retain_layers_for("all", 4, 2) == [0, 1, 2, 3]
    assert seq.retain_layers_for("target", 4, 2) == [2]
    with pytest.raises(ConfigError, match="4 layers"):
        seq.retain_layers_for([1, 9], 4, 2)


# ----------------------------------------------------------------------------------------------- the probe

@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_probe_layers_are_the_original_ones(finetune):
    model, method, data, _ = setup({"finetune": finetune})
    batch = batch_of(data["forget"])
    for phase in method.phases():
        method.begin_phase(model, phase)
    layers = get_parts(model).layers
    L = 1
    before = probe_logits(model, batch, L, method.originals)

    def perturb(layer_idx: int) -> None:
        with torch.no_grad():
            for name, p in layers[layer_idx].named_parameters():
                if finetune == "full" or "lora_" in name:
                    p.add_(torch.randn_like(p) * 0.5)

    perturb(3)  # a layer after L: the probe must not see it
    perturb(2)
    assert torch.equal(probe_logits(model, batch, L, method.originals), before)
    perturb(1)  # layer L itself: the probe sees it
    assert not torch.allclose(probe_logits(model, batch, L, method.originals), before)
    # the probe at the last layer is the current model itself
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(probe_logits(model, batch, DEPTH - 1, method.originals), full)


def test_probe_gradients_under_gradient_checkpointing_match():
    grads = []
    for ckpt in (False, True):
        model, method, data, _ = setup({"lora_train_layers": "all"})
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        for m in model.modules():  # dropout off: both runs must compute the same function
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        named = method.begin_phase(model, method.phases()[1])
        loss = forget_loss("max_entropy_kl", probe_logits(model, batch_of(data["forget"]), 2, None),
                           batch_of(data["forget"]))
        grads.append(torch.autograd.grad(loss, [p for _, p in named], allow_unused=True))
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-6)


# ----------------------------------------------------------------------------------------------- gradients

def _forget_grads(model, method, data, phase_index):
    named = method.begin_phase(model, method.phases()[phase_index])
    terms = method.losses(model, {"forget": batch_of(data["forget"]), "retain": batch_of(data["retain"])},
                          ctx_for(method, phase_index))
    grads = torch.autograd.grad(sum(terms.forget.values()), [p for _, p in named], allow_unused=True)
    return {n: g for (n, _), g in zip(named, grads)}, terms


def test_lora_forget_gradient_reaches_layers_up_to_the_target_only():
    model, method, data, _ = setup()
    grads, terms = _forget_grads(model, method, data, 1)   # phase of layer 2
    assert set(terms.forget) == {"forget"} and set(terms.retain) == {"retain_l2"}
    assert all("lora_" in n for n in grads)
    assert {lora_layer(n) for n in grads} == {0, 1, 2, 3}          # default: every layer's adapters train
    for n, g in grads.items():
        assert reached(g) == (lora_layer(n) <= 2), n


@pytest.mark.parametrize("choice, layers", [("target", {2}), ("up_to_target", {0, 1, 2})])
def test_lora_train_layers_choice(choice, layers):
    model, method, data, _ = setup({"lora_train_layers": choice})
    named = method.begin_phase(model, method.phases()[1])
    assert {lora_layer(n) for n, _ in named} == layers
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in named}


def test_full_finetuning_trains_layer_l_alone_and_nothing_else_moves():
    model, method, data, run_cfg = setup({"finetune": "full", "steps_per_layer": 3, "layers": [2, 1]},
                                         {"optimizer": {"weight_decay": 0.1, "lr": 1e-2}})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    streams = {k: BatchStream(v, 2) for k, v in data.items()}
    one_phase = seq.Sequential(method.cfg, [2], [3], DEPTH, originals=method.originals)
    train(model, one_phase, streams, run_cfg.train, device=CPU)
    prefix = "gpt_neox.layers.2."
    for n, p in model.named_parameters():
        if n.startswith(prefix):
            if p.ndim >= 2:
                assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n            # bit-identical
    assert method.originals.keys() == [2]                   # originals kept only for the changed layer
    for n, t in method.originals[2].items():
        assert torch.equal(t, before[prefix + n])


def test_full_finetuning_with_muon_moves_only_layer_l():
    model, method, data, run_cfg = setup({"finetune": "full", "steps_per_layer": 2, "layers": [3]},
                                         {"optimizer": {"name": "muon", "muon_lr": 0.02, "lr": 1e-3}})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, method, {k: BatchStream(v, 2) for k, v in data.items()}, run_cfg.train, device=CPU)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("gpt_neox.layers.3.") for n in changed)


def test_lora_training_leaves_base_weights_bit_identical():
    model, method, data, run_cfg = setup({"steps_per_layer": 2}, {"optimizer": {"lr": 1e-2}},
                                         perturb_lora=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, method, {k: BatchStream(v, 2) for k, v in data.items()}, run_cfg.train, device=CPU)
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, before[n]), n
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_B" in n)


# ----------------------------------------------------------------------------------------------- losses

def test_losses_start_on_the_notebook_scale():
    """At the first step (LoRA B = 0, so current = original): NPO reads log 2 and L2 / KL read 0."""
    for kind, expected in (("npo", math.log(2)), ("npo_per_token", math.log(2))):
        model, method, data, _ = setup({"forget_loss": kind, "retain_losses": {"l2": 1.0, "kl": 1.0, "nll": 1.0}},
                                       perturb_lora=False)
        method.begin_phase(model, method.phases()[0])
        model.eval()
        terms = method.losses(model, {"forget": batch_of(data["forget"]), "retain": batch_of(data["retain"])},
                              ctx_for(method))
        logs = float_logs(terms)
        assert logs["forget_loss"] == pytest.approx(expected, abs=1e-5)
        assert logs["retain_l2_loss"] == pytest.approx(0, abs=1e-5)
        assert logs["retain_kl_loss"] == pytest.approx(0, abs=1e-6)
        assert logs["retain_nll_loss"] > 1.0   # a random model's next-token loss
        # each term carries its own weight times the ramped coefficient
        assert logs["retain_loss"] == pytest.approx(sum(logs[f"retain_{k}_loss"] for k in ("l2", "kl", "nll")))
        assert float(terms.retain["retain_nll"].detach()) == pytest.approx(logs["retain_coef"] * logs["retain_nll_loss"], rel=1e-5)


def test_forget_loss_kinds_on_hand_made_logits():
    batch = {"input_ids": torch.tensor([[3, 4, 5, 6]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    uniform = torch.zeros(1, 4, 50)
    assert float(forget_loss("max_entropy_kl", uniform, batch)) == pytest.approx(1.0)
    assert float(forget_loss("top_k_entropy", uniform, batch, top_k=10)) == pytest.approx(1.0)
    assert float(forget_loss("random_ce", uniform, batch, generator=torch.Generator().manual_seed(0))) == pytest.approx(1.0)
    peaked = uniform.clone()
    peaked[..., 7] = 10.0
    assert float(forget_loss("max_entropy_kl", peaked, batch)) > 1.5
    ref = torch.log_softmax(peaked, -1)[:, :-1].gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    assert float(forget_loss("npo_per_token", peaked, batch, ref_logprobs=ref, beta=1.0)) == pytest.approx(math.log(2))
    # top_k: a distribution spread evenly over its 5 most likely tokens is uniform for K=5, not for K=50
    five = torch.full((1, 4, 50), -20.0)
    five[..., :5] = 0.0
    assert float(forget_loss("top_k_entropy", five, batch, top_k=5)) == pytest.approx(1.0)
    assert float(forget_loss("top_k_entropy", five, batch, top_k=50)) > 2.0
    # npo_beta: below the reference, a larger beta pushes the loss further under log 2
    small, large = (float(forget_loss("npo_per_token", torch.log_softmax(peaked, -1), batch, ref_logprobs=ref + 1.0,
                                      beta=b)) for b in (0.1, 10.0))
    assert large < small < math.log(2)


def test_token_mask_restricts_positions_never_attention():
    batch = {"input_ids": torch.tensor([[3, 4, 5, 6]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
             "loss_mask": torch.tensor([[False, False, True, False]])}
    # token 2 is marked: the distribution at position 1 (which predicts it) is the one that counts
    assert position_mask(batch).tolist() == [[False, True, False, False]]
    logits = torch.zeros(1, 4, 50)
    logits[0, 1, 9] = 10.0   # peaked exactly where the mask looks
    masked = float(forget_loss("max_entropy_kl", logits, batch))
    unmasked = float(forget_loss("max_entropy_kl", logits, {k: v for k, v in batch.items() if k != "loss_mask"}))
    assert masked > 1.5 and unmasked < masked
    # the model's logits do not depend on the mask: only attention_mask enters the forward pass
    model, method, data, _ = setup()
    b = batch_of(data["forget"])
    plain = probe_logits(model, b, 1, None)
    b["loss_mask"] = torch.zeros_like(b["attention_mask"], dtype=torch.bool)
    b["loss_mask"][:, 3] = True
    assert torch.equal(probe_logits(model, b, 1, None), plain)


def test_maintain_unlearned_adds_the_probes_of_finished_layers():
    model, method, data, _ = setup({"maintain_unlearned": True})
    _, terms = _forget_grads(model, method, data, 2)   # phase of layer 1; layers 3 and 2 are done
    logs = float_logs(terms)
    per = {k: v for k, v in logs.items() if k.startswith("forget_loss_L")}
    assert set(per) == {"forget_loss_L1", "forget_loss_L3", "forget_loss_L2"}
    assert logs["forget_loss"] == pytest.approx(sum(per.values()) / 3, rel=1e-5)
    model2, method2, _, _ = setup({"maintain_unlearned": False})
    grads_plain, terms2 = _forget_grads(model2, method2, data, 2)
    assert float_logs(terms2)["forget_loss"] == pytest.approx(per["forget_loss_L1"], rel=1e-5)
    grads_maint, _ = _forget_grads(model, method, data, 2)
    # the probes of layers 3 and 2 run through the current layer 2: its adapters now get forget gradient
    name = next(n for n in grads_plain if lora_layer(n) == 2 and "lora_B" in n)
    assert not reached(grads_plain[name]) and reached(grads_maint[name])


def test_npo_full_model_sees_layers_after_the_target():
    model, method, data, _ = setup({"forget_loss": "npo_per_token", "npo_full_model": True})
    grads, _ = _forget_grads(model, method, data, 2)   # layer 1
    assert any(reached(g) for n, g in grads.items() if lora_layer(n) == 3)
    model, method, data, _ = setup({"forget_loss": "npo_per_token"})
    grads, _ = _forget_grads(model, method, data, 2)
    assert not any(reached(g) for n, g in grads.items() if lora_layer(n) == 3)


def test_random_targets_are_reproducible_per_phase():
    model, method, data, _ = setup({"forget_loss": "random_ce"})
    values = []
    for _ in range(2):
        method.begin_phase(model, method.phases()[0])
        values.append(float(method.losses(model, {"forget": batch_of(data["forget"]), "retain": batch_of(data["retain"])},
                                          ctx_for(method)).logs["forget_loss"]))
    assert values[0] == pytest.approx(values[1], rel=1e-4)


def test_retain_target_layer_l2_follows_the_phase():
    model, method, data, _ = setup({"retain_layers": "target"})
    assert method.retain_layers == {3: [3], 2: [2], 1: [1]}
    model, method, data, _ = setup({"retain_losses": {"kl": 2.0}})
    terms = method.losses(model, {"forget": batch_of(data["forget"]), "retain": batch_of(data["retain"])},
                          ctx_for(method))
    logs = float_logs(terms)
    assert set(terms.retain) == {"retain_kl"} and logs["retain_kl_loss"] > 0
    assert float(terms.retain["retain_kl"].detach()) == pytest.approx(2.0 * logs["retain_coef"] * logs["retain_kl_loss"], rel=1e-5)


class Killed(Exception):
    pass


@pytest.mark.parametrize("settings", [
    ({"finetune": "full", "forget_loss": "random_ce"}, {}),          # originals, the method's own generator
    ({"forget_loss": "npo", "maintain_unlearned": True}, {"l2sp_coef": 0.1}),  # LoRA with dropout, L2-SP
])
def test_a_mid_phase_kill_of_a_sequential_run_resumes_bit_identically(tmp_path, settings):
    """3 phases of 3 steps, checkpoints every 2 steps, killed by a hook after step 5 (phase 1, step 2;
    checkpoint at step 4): resumed in a fresh model, the weights and every step's metrics equal those
    of the uninterrupted run exactly."""
    from unlearning.core.io import read_jsonl
    from unlearning.core.logs import MetricsLogger
    from unlearning.training.loop import Checkpointer
    sequential, train_cfg = settings
    sequential = {"steps_per_layer": 3, "layers": [3, 2, 1], **sequential}
    train_cfg = {"checkpoint_every": 2, "optimizer": {"lr": 1e-2}, **train_cfg}

    def run(name, **kw):
        model, method, data, run_cfg = setup(sequential, train_cfg)
        model.train()  # LoRA dropout on: the global random state must be restored too
        streams = {k: BatchStream(v, 2, seed=i) for i, (k, v) in enumerate(data.items())}
        train(model, method, streams, run_cfg.train, device=CPU, metrics=MetricsLogger(tmp_path / f"{name}.jsonl"),
              **kw)
        return model

    full = run("full")
    ckpt = Checkpointer(tmp_path / "ckpt")

    def kill(record):
        if record["step"] == 5:
            raise Killed
    with pytest.raises(Killed):
        run("resumed", checkpointer=ckpt, on_step=kill)
    assert (ckpt.position().phase, ckpt.position().step) == (1, 1)
    resumed = run("resumed", checkpointer=ckpt, resume=True)
    for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time"} for r in rs]  # noqa: E731
    assert [r["step"] for r in read_jsonl(tmp_path / "resumed.jsonl")] == list(range(1, 10))
    assert strip(read_jsonl(tmp_path / "resumed.jsonl")) == strip(read_jsonl(tmp_path / "full.jsonl"))
