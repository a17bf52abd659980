"""Representation methods on tiny random models: schedules, layers, trainable parameters, losses."""

from __future__ import annotations

import math

import pytest
import torch

from tiny_models import float_logs, tiny_batch, tiny_model
from unlearning.core.config import from_dict
from unlearning.core.errors import ConfigError
from unlearning.data.text import TokenizedData
from unlearning.model.layers import get_parts
from unlearning.methods import checkpoint_transfer, circuit_breaker, rmu
from unlearning.training.loop import StepContext
from unlearning.methods.representation import (RepresentationConfig, coefficients, resolve_target_layers,
                                               training_steps)
from unlearning.training.trainable import layer_parameters, prepare_trainable
from unlearning.model.originals import original_model
from unlearning.methods import BuildContext
from unlearning.runner import RunConfig


# ----------------------------------------------------------------------------------------------- schedules

def test_notebook_schedule_ramps_retain_up_and_forget_down_to_three_quarters():
    T = 32  # coefficients(schedule, step, total, retain_coef, remove_coef) -> (forget, retain)
    assert coefficients("notebook", 0, T, 5, 10) == (10.0, 0.0)
    c = coefficients("notebook", 16, T, 5, 10)
    assert c.retain == pytest.approx(2.5) and c.forget == pytest.approx(10 * (1 - 0.25 * 0.5))
    assert coefficients("notebook", T, T, 5, 10) == pytest.approx((7.5, 5.0))
    # holds after the ramp; a shorter ramp reaches the end earlier
    assert coefficients("notebook", 3 * T, T, 5, 10) == pytest.approx((7.5, 5.0))
    assert coefficients("notebook", 8, T, 5, 10, ramp_steps=8, forget_end_fraction=0.5) == pytest.approx((5, 5))


def test_circuit_breaker_schedule():
    T = 100
    assert coefficients("circuit_breaker", 0, T, 4, 8) == (8.0, 0.0)
    c = coefficients("circuit_breaker", 50, T, 4, 8)
    assert c.retain == pytest.approx(4 * 50 / 200) and c.forget == pytest.approx(8 * (1 - 50 / 200))
    assert coefficients("circuit_breaker", T, T, 4, 8) == pytest.approx((4.0, 2.0))
    assert coefficients("constant", 7, T, 4, 8) == (8, 4)


def test_both_families_return_forget_then_retain_and_share_defaults_and_rounding():
    from sequential_setup import ctx_for, setup
    from unlearning.methods import representation, sequential
    from unlearning.methods.shared import Coefficients
    _, method, _, _ = setup({"remove_coef": 8.0, "retain_coef": 4.0, "retain_ramp_start": 0.0})
    seq_c = method.coefficients(ctx_for(method))
    rep_c = coefficients("notebook", 0, 10, 4.0, 8.0)
    assert isinstance(seq_c, Coefficients) and isinstance(rep_c, Coefficients)
    assert (seq_c.forget, seq_c.retain) == (8.0, 0.0) == (rep_c.forget, rep_c.retain)
    assert sequential.DEFAULT_RETAIN_LAYERS is representation.DEFAULT_TARGET_LAYERS
    # 10 examples, 4 per step, one epoch: both round 2.5 steps up to 3
    assert sequential.base_steps(sequential.Config(epochs_per_layer=1.0), 10, 4, 1) == 3
    assert representation.training_steps(RepresentationConfig(epochs=1.0), 10, 4, 1) == 3


def test_retain_kl_loss_flag_selects_kl_and_conflicts_with_nll():
    cfg = from_dict(RepresentationConfig, {"retain_kl_loss": True})
    assert cfg.retain_loss == "kl"
    for other in ("nll", "l2"):  # an explicit other kind is never silently replaced
        with pytest.raises(ConfigError, match="retain_kl_loss"):
            from_dict(RepresentationConfig, {"retain_kl_loss": True, "retain_loss": other})
    assert from_dict(checkpoint_transfer.Config, {}).retain_loss == "kl"  # the notebook's trainer
    assert from_dict(circuit_breaker.Config, {}).retain_loss == "l2"  # the paper's
    assert from_dict(circuit_breaker.Config, {"retain_loss": "mse"}).retain_loss == "mse"


def test_training_steps_is_one_epoch_of_forget_examples_by_default():
    cfg = RepresentationConfig()
    assert training_steps(cfg, 1024, 4, 2) == 128
    cfg.epochs = 0.25
    assert training_steps(cfg, 1024, 4, 8) == 8
    cfg.steps = 5
    assert training_steps(cfg, 1024, 4, 2) == 5


# ----------------------------------------------------------------------------------------------- layers

def test_target_layers_default_is_clipped_and_explicit_layers_must_exist():
    assert resolve_target_layers(None, 32) == [5, 10, 15, 20, 25, 30]
    assert resolve_target_layers(None, 12) == [5, 10]
    assert resolve_target_layers(None, 4) == [3]  # nothing of the default fits: the last layer
    assert resolve_target_layers("3->1:1", 4) == [1, 2, 3]
    with pytest.raises(ConfigError, match="4 layers"):
        resolve_target_layers([1, 5], 4)


def test_lora_adapts_every_linear_module_of_the_decoder_layers_only():
    model = tiny_model("gpt_neox", layers=3)
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    assert len(linear) == 12  # 4 per GPT-NeoX layer
    cfg = RepresentationConfig()
    model, names, originals = prepare_trainable(model, cfg.finetune, cfg.lora)
    assert originals is None
    assert names and all("lora_" in n for n in names)
    adapted = {n.split(".lora_")[0].removeprefix("base_model.model.") for n in names}
    assert adapted == linear
    assert not any("embed" in n for n in names)
    lora = model.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (16, 16, 0.05)


def test_full_finetuning_saves_originals_of_just_the_trained_parameters():
    model = tiny_model("llama", layers=4)
    model, names, originals = prepare_trainable(model, "full", RepresentationConfig().lora, layers=[1, 2],
                                                modules=["mlp"])
    assert names == layer_parameters(model, [1, 2], ["mlp"])
    assert all(".mlp." in n and (".1." in n or ".2." in n) for n in names)
    assert sorted(originals.keys()) == [1, 2]
    assert all(k.startswith("mlp.") for k in originals[1])
    assert not any(p.requires_grad for p in model.parameters())


def test_original_model_after_full_finetuning_uses_the_saved_copies():
    model = tiny_model("llama", layers=4)
    ids, mask = tiny_batch()
    before = model(input_ids=ids, attention_mask=mask).logits
    model, names, originals = prepare_trainable(model, "full", RepresentationConfig().lora, layers=[1],
                                                modules=["mlp"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in names:
                p.add_(0.5)
    with torch.no_grad(), original_model(model, originals):
        again = model(input_ids=ids, attention_mask=mask).logits
    changed = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(again, before, atol=1e-6)
    assert not torch.allclose(changed, before, atol=1e-3)


# ----------------------------------------------------------------------------------------------- methods

def _data(n: int = 16, seq: int = 12, seed: int = 0) -> TokenizedData:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 61, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, -4:] = 0
    return TokenizedData(ids, mask)


def _run_cfg(**method: dict) -> RunConfig:
    cfg = RunConfig(model="tiny-random", device="cpu")
    cfg.train.batch_size, cfg.train.grad_accum = 4, 1
    for k, v in method.items():
        setattr(cfg, k, v)
    return cfg


def _build_ctx(run_cfg: RunConfig, data: dict, tokenizer=None) -> BuildContext:
    return BuildContext(model_name=run_cfg.model, tokenizer=tokenizer, data=data, device=torch.device("cpu"),
                        train=run_cfg.train, seed=run_cfg.train.seed, model_dtype=run_cfg.model_dtype)


def _batches(data: TokenizedData, rows: slice) -> dict[str, torch.Tensor]:
    return data.rows(torch.arange(data.input_ids.shape[0])[rows])


def _ctx(method, step: int = 0) -> StepContext:
    phase = method.phases()[0]
    return StepContext(phase, step, step, phase.steps)


def test_circuit_breaker_losses_at_the_start_are_one_and_zero():
    model = tiny_model("gpt_neox", layers=4)
    data = {"forget": _data(seed=1), "retain": _data(seed=2)}
    cfg = from_dict(circuit_breaker.Config, {"target_layers": [1, 3], "steps": 4, "orth_coef": 0.5})
    model, method = circuit_breaker.build(model, _build_ctx(_run_cfg(), data), cfg)
    batches = {"forget": _batches(data["forget"], slice(0, 4)), "retain": _batches(data["retain"], slice(0, 4))}
    terms = method.losses(model, batches, _ctx(method))
    logs = float_logs(terms)
    # LoRA B starts at zero: current == original, so cos = 1, the L2 distance 0, both arg-maxes agree
    assert logs["cb_loss"] == pytest.approx(1.0, abs=1e-5)
    assert logs["retain_l2_loss"] == pytest.approx(0.0, abs=1e-5)
    assert logs["retain_acc"] == 1.0 and logs["forget_acc"] == 1.0
    assert (logs["forget_coef"], logs["retain_coef"]) == (5.0, 0.0)
    assert logs["forget_loss"] == logs["cb_loss"]  # the shared name beside the notebook's
    assert 0.0 <= logs["orth_loss"] <= 1.0
    assert set(terms.forget) == {"cb", "orth"} and set(terms.retain) == {"retain_l2"}
    assert terms.forget["cb"].requires_grad


def test_forget_pass_stops_after_the_deepest_target_layer():
    model = tiny_model("gpt_neox", layers=4)
    data = {"forget": _data(seed=1), "retain": _data(seed=2)}
    cfg = from_dict(circuit_breaker.Config, {"target_layers": [1], "steps": 4, "metrics_every": 1000,
                                             "summary_step": 1000, "retain_loss": "mse"})
    model, method = circuit_breaker.build(model, _build_ctx(_run_cfg(), data), cfg)
    ran = []
    for i, layer in enumerate(get_parts(model).layers):
        layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
    batches = {"forget": _batches(data["forget"], slice(0, 4)), "retain": _batches(data["retain"], slice(0, 4))}
    terms = method.losses(model, batches, _ctx(method))  # step 1 of 4: no metrics
    assert "retain_acc" not in terms.logs
    assert max(ran) == 1  # forget (original and current) and mse-retain passes all stop at layer 1


def test_checkpoint_transfer_loss_is_the_mse_to_the_teachers_hidden_states():
    model = tiny_model("gpt_neox", layers=4, seed=0)
    teacher = tiny_model("gpt_neox", layers=4, seed=7)
    data = {"forget": _data(seed=1), "retain": _data(seed=2)}
    cfg = from_dict(checkpoint_transfer.Config, {"target_layers": [1, 2], "steps": 4, "retain_kl_loss": True})
    method = checkpoint_transfer.CheckpointTransfer(
        teacher, [1, 2], None, trainable=[], originals=None, total_steps=4, retain_kind="kl", retain_layers=[1, 2],
        retain_coef=cfg.retain_coef, remove_coef=cfg.remove_coef, schedule="notebook")
    batch = _batches(data["forget"], slice(0, 4))
    loss, _, logs = method.forget_losses(model, batch, batch["attention_mask"].bool(), want_acc=True)
    hs = model(**batch, output_hidden_states=True).hidden_states
    ht = teacher(**batch, output_hidden_states=True).hidden_states
    m = batch["attention_mask"].bool()
    expected = sum(((hs[i + 1] - ht[i + 1]).pow(2).mean(-1))[m].mean() for i in (1, 2)) / 2
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    am = (model(**batch).logits.argmax(-1) == teacher(**batch).logits.argmax(-1))[m].float().mean()
    assert logs["forget_acc"] == pytest.approx(float(am))


def test_save_name_follows_the_notebook():
    assert checkpoint_transfer.save_name("EleutherAI/deep-ignorance-unfiltered", "kl", 5.0, 10.0) == \
        "EleutherAI/deep-ignorance-unfiltered_kl_ret5_rm10"
    assert checkpoint_transfer.save_name("organism:small", "kl", 1, 3) == "organism-small_kl_ret1_rm3"
    assert checkpoint_transfer.save_name("/abs/runs/ct1/model", "l2", 2.5, 3) == "ct1_l2_ret2.5_rm3"
    assert checkpoint_transfer.save_name("/abs/models/mine", "kl", 1, 1) == "mine_kl_ret1_rm1"
    resolve = checkpoint_transfer.resolve_teacher
    assert resolve("organism:tiny", None, None) == ("organism:tiny", "early")
    assert resolve("organism:small", "filtered", None) == ("organism:small-filtered", None)
    assert resolve("organism:small", "early", "step100") == ("organism:small", "step100")
    assert resolve("x/y", "x/z", "global_step1") == ("x/z", "global_step1")
    with pytest.raises(ConfigError, match="global_step38144"):
        resolve("EleutherAI/deep-ignorance-unfiltered", None, None)


def test_rmu_trains_only_the_mlps_of_the_three_layers_up_to_l():
    from unlearning.training.loop import train
    from unlearning.data.text import BatchStream
    model = tiny_model("llama", layers=6)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = {"forget": _data(seed=1), "retain": _data(seed=2)}
    cfg = from_dict(rmu.Config, {"layer": 3, "steps": 3, "steering_coef": 5.0})
    run_cfg = _run_cfg()
    model, method = rmu.build(model, _build_ctx(run_cfg, data), cfg)
    assert method.control.norm().item() == pytest.approx(5.0, rel=1e-5)
    streams = {k: BatchStream(v, 4, seed=i) for i, (k, v) in enumerate(data.items())}
    records = []
    train(model, method, streams, run_cfg.train, device=torch.device("cpu"),
          on_step=records.append)  # the loop calls method.on_step itself
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        should = ".mlp." in n and any(f"layers.{i}." in n for i in (1, 2, 3))
        assert moved == should, n
    assert all(math.isfinite(records[-1][k]) for k in ("forget_loss", "retain_mse_loss", "retain_acc",
                                                       "forget_acc"))
    assert method.train_summary["step"] == 3


@pytest.mark.parametrize("kind", ["l2", "mse", "kl", "nll"])
def test_retain_losses_by_kind_at_the_start(kind):
    model = tiny_model("gpt_neox", layers=4)
    data = {"forget": _data(seed=1), "retain": _data(seed=2)}
    cfg = from_dict(circuit_breaker.Config, {"target_layers": [2, 3], "steps": 2, "retain_loss": kind})
    model, method = circuit_breaker.build(model, _build_ctx(_run_cfg(), data), cfg)
    batch = _batches(data["retain"], slice(0, 4))
    loss, logs = method.retain_losses(model, batch, want_acc=True)
    if kind == "nll":  # a random model: about log(vocab)
        assert 2.0 < logs["retain_nll_loss"] < 6.0
    else:  # adapters start at zero: no distance from the original yet
        assert logs[f"retain_{kind}_loss"] == pytest.approx(0.0, abs=1e-6)
    assert logs["retain_acc"] == 1.0 and loss.requires_grad


def test_forget_loss_counts_only_the_token_mask_positions():
    model = tiny_model("gpt_neox", layers=4)
    teacher = tiny_model("gpt_neox", layers=4, seed=3)
    method = checkpoint_transfer.CheckpointTransfer(
        teacher, [2], None, trainable=[], originals=None, total_steps=4, retain_kind="kl", retain_layers=[2],
        retain_coef=1, remove_coef=1)
    batch = _batches(_data(seed=1), slice(0, 4))
    token_mask = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    token_mask[:, 2:5] = True
    masked = dict(batch, loss_mask=token_mask)
    m = method.forget_mask(masked)
    assert torch.equal(m, token_mask & batch["attention_mask"].bool())
    loss, _, _ = method.forget_losses(model, masked, m, want_acc=False)
    hs = model(**batch, output_hidden_states=True).hidden_states[3]
    ht = teacher(**batch, output_hidden_states=True).hidden_states[3]
    expected = (hs - ht).pow(2).mean(-1)[:, 2:5].mean()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_lora_b_noise_breaks_the_symmetry_of_the_circuit_breaker_loss():
    data = {"forget": _data(seed=1), "retain": _data(seed=2)}
    batches = {"forget": _batches(data["forget"], slice(0, 4)), "retain": _batches(data["retain"], slice(0, 4))}
    grads = {}
    for std in (0.0, 1e-3):
        torch.manual_seed(0)
        cfg = from_dict(circuit_breaker.Config, {"target_layers": [1, 3], "steps": 4, "lora": {"init_b_std": std}})
        model, method = circuit_breaker.build(tiny_model("gpt_neox", layers=4), _build_ctx(_run_cfg(), data), cfg)
        named = method.begin_phase(model, method.phases()[0])
        terms = method.losses(model, batches, _ctx(method))
        terms.forget["cb"].backward()
        grads[std] = max(float(p.grad.abs().max()) for _, p in named if p.grad is not None)
        assert float_logs(terms)["cb_loss"] < 1.0 or std == 0.0
    assert grads[0.0] < 1e-6 < grads[1e-3]  # at current == original the cosine is at its maximum
