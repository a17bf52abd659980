"""The shared training loop: frozen parameters stay put, filters apply, NaN stops, resume and
data parallelism (two gloo processes) give the same weights as one uninterrupted process."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from gloo import free_port, join_gloo
from unlearning.data.text import BatchStream, TokenizedData
from unlearning.core.errors import NonFiniteLossError
from unlearning.core.io import read_jsonl
from unlearning.core.logs import MetricsLogger
from unlearning.training.contract import Method as ContractMethod
from unlearning.training.loop import Checkpointer, LossTerms, Method, Phase, TrainConfig, train


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(16, 4)
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 1)

    def forward(self, input_ids, attention_mask):
        h = self.b(torch.tanh(self.a(self.embed(input_ids))))
        return (h.squeeze(-1) * attention_mask).sum(1) / attention_mask.sum(1)


class ToyMethod(Method):
    """Phase 0 trains `a`, phase 1 trains `b`; forget pushes outputs up, retain holds them near 0."""
    name = "toy"

    def __init__(self, steps=3, nan_at=None, noisy=False):
        self.steps, self.nan_at, self.restored, self.noisy = steps, nan_at, None, noisy

    def phases(self):
        return [Phase(0, self.steps, layer=1, name="a"), Phase(1, self.steps, layer=0, name="b")]

    def begin_phase(self, model, phase):
        model.requires_grad_(False)
        sub = model.a if phase.index == 0 else model.b
        sub.requires_grad_(True)
        prefix = "a." if phase.index == 0 else "b."
        return [(prefix + n, p) for n, p in sub.named_parameters()]

    def losses(self, model, batches, ctx):
        f = model(**{k: batches["forget"][k] for k in ("input_ids", "attention_mask")})
        r = model(**{k: batches["retain"][k] for k in ("input_ids", "attention_mask")})
        forget = -f.mean()
        if self.noisy:  # draws from torch's global generator, as dropout does
            forget = forget * (1 + torch.rand(()))
        if self.nan_at is not None and ctx.global_step == self.nan_at:
            forget = forget * float("nan")
        return LossTerms(forget={"forget": forget}, retain={"retain": (r ** 2).mean()},
                         logs={"forget_loss": forget.detach()})  # a tensor, as the real methods log

    def restore(self, model, finished):
        self.restored = [p.index for p in finished]


def toy_data(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 16, (32, 6), generator=g)
    return TokenizedData(ids, torch.ones_like(ids))


def streams(batch_size=4):
    return {"forget": BatchStream(toy_data(1), batch_size, seed=1),
            "retain": BatchStream(toy_data(2), batch_size, seed=2)}


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


CFG = dict(batch_size=4, grad_accum=2)


def test_only_the_phase_parameters_move_and_metrics_are_logged(tmp_path):
    from unlearning.core.logs import MetricsLogger
    model = ToyModel()
    before = snapshot(model)
    logger = MetricsLogger(tmp_path / "m.jsonl")
    method = ToyMethod(steps=2)
    # Stop after phase 0 by giving the method one phase only.
    method.phases = lambda: [Phase(0, 2, layer=1, name="a")]
    train(model, method, streams(), TrainConfig(**CFG), device=torch.device("cpu"), metrics=logger)
    after = snapshot(model)
    assert not torch.equal(before["a.weight"], after["a.weight"])
    for name in ("embed.weight", "b.weight", "b.bias"):
        assert torch.equal(before[name], after[name]), name
    from unlearning.core.io import read_jsonl
    recs = read_jsonl(tmp_path / "m.jsonl")
    assert [r["step"] for r in recs] == [1, 2]
    assert {"lr", "grad_norm", "forget_term", "retain_term", "forget_loss", "layer"} <= set(recs[0])
    # logged tensors come back as numbers, averaged over the step's micro-batches like the terms
    assert all(isinstance(recs[0][k], float) for k in ("grad_norm", "forget_term", "forget_loss"))
    assert recs[0]["forget_loss"] == pytest.approx(recs[0]["forget_term"])


@pytest.mark.parametrize("grad_filter", ["same_sign", "asymmetric"])
def test_gradient_filters_change_the_update(grad_filter):
    plain, filtered = ToyModel(), ToyModel()
    train(plain, ToyMethod(steps=1), streams(), TrainConfig(**CFG), device=torch.device("cpu"))
    train(filtered, ToyMethod(steps=1), streams(), TrainConfig(**CFG, grad_filter=grad_filter),
          device=torch.device("cpu"))
    assert not torch.allclose(snapshot(plain)["a.weight"], snapshot(filtered)["a.weight"])


def test_nan_loss_stops_with_step_layer_and_term(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt")
    with pytest.raises(NonFiniteLossError) as e:
        train(ToyModel(), ToyMethod(steps=3, nan_at=4), streams(), TrainConfig(**CFG),
              device=torch.device("cpu"), checkpointer=ckpt)
    msg = str(e.value)
    assert "'forget'" in msg and "step 4" in msg and "layer 0" in msg
    assert ckpt.exists()  # phase 0 finished before the NaN and is kept


def test_resume_after_a_crash_gives_the_uninterrupted_weights(tmp_path):
    full = ToyModel()
    train(full, ToyMethod(), streams(), TrainConfig(**CFG), device=torch.device("cpu"))

    crashed = ToyModel()
    ckpt = Checkpointer(tmp_path / "ckpt")
    with pytest.raises(NonFiniteLossError):
        train(crashed, ToyMethod(nan_at=4), streams(), TrainConfig(**CFG), device=torch.device("cpu"),
              checkpointer=ckpt)
    resumed = ToyModel()  # a fresh process: base weights, then the checkpoint
    method = ToyMethod()
    state = train(resumed, method, streams(), TrainConfig(**CFG), device=torch.device("cpu"),
                  checkpointer=ckpt, resume=True)
    assert method.restored == [0] and state.global_step == 6 and state.finished_phases == 2
    for n, p in snapshot(full).items():
        torch.testing.assert_close(snapshot(resumed)[n], p, rtol=0, atol=1e-6)



def _ddp_worker(rank, world, port, out):
    join_gloo(rank, world, port)
    try:
        model = ToyModel()
        train(model, ToyMethod(steps=2), streams(batch_size=2), TrainConfig(**CFG), device=torch.device("cpu"))
        if rank == 0:
            torch.save(snapshot(model), out)
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_data_parallel_equals_one_process_with_the_global_batch(tmp_path):
    single = ToyModel()
    train(single, ToyMethod(steps=2), streams(batch_size=4), TrainConfig(**CFG), device=torch.device("cpu"))
    out = tmp_path / "rank0.pt"
    torch.multiprocessing.spawn(_ddp_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    parallel = torch.load(out)
    for n, p in snapshot(single).items():
        torch.testing.assert_close(parallel[n], p, rtol=1e-5, atol=1e-6)


class Killed(Exception):
    pass


def kill_at(step):
    def hook(record):
        if record["step"] == step:
            raise Killed
    return hook


def without_time(records):
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


@pytest.mark.parametrize("settings", [{"l2sp_coef": 0.5}, {"schedule_scope": "run"},
                                      {"grad_filter": "same_sign", "checkpoint_every": 1}])
def test_a_mid_phase_kill_resumes_bit_identically(tmp_path, settings):
    """Killed by a hook after step 4 (phase 1, step 1), checkpointed at step 4 (checkpoint_every 2):
    the resumed run ends with exactly the weights and metrics of one that never stopped."""
    cfg = TrainConfig(**CFG, **{"checkpoint_every": 2, **settings})
    full = ToyModel()
    train(full, ToyMethod(noisy=True), streams(), cfg, device=torch.device("cpu"),
          metrics=MetricsLogger(tmp_path / "full.jsonl"))

    killed = ToyModel()
    ckpt = Checkpointer(tmp_path / "ckpt")
    with pytest.raises(Killed):
        train(killed, ToyMethod(noisy=True), streams(), cfg, device=torch.device("cpu"), checkpointer=ckpt,
              metrics=MetricsLogger(tmp_path / "resumed.jsonl"), on_step=kill_at(4))
    assert ckpt.position().global_step == 4 and ckpt.position().step == 1  # mid-phase
    resumed = ToyModel()  # a fresh process: base weights, then the checkpoint
    state = train(resumed, ToyMethod(noisy=True), streams(), cfg, device=torch.device("cpu"), checkpointer=ckpt,
                  resume=True, metrics=MetricsLogger(tmp_path / "resumed.jsonl"))
    assert state.global_step == 6
    for n, p in snapshot(full).items():
        assert torch.equal(snapshot(resumed)[n], p), n
    assert without_time(read_jsonl(tmp_path / "resumed.jsonl")) == without_time(read_jsonl(tmp_path / "full.jsonl"))


def test_metrics_hold_each_step_once_after_resume(tmp_path):
    """Steps logged after the checkpoint (3, here) are cut before the resumed run logs them again."""
    cfg = TrainConfig(**CFG, checkpoint_every=2)
    ckpt, path = Checkpointer(tmp_path / "ckpt"), tmp_path / "m.jsonl"
    with pytest.raises(Killed):
        train(ToyModel(), ToyMethod(), streams(), cfg, device=torch.device("cpu"), checkpointer=ckpt,
              metrics=MetricsLogger(path), on_step=kill_at(3))
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3] and ckpt.position().global_step == 2
    train(ToyModel(), ToyMethod(), streams(), cfg, device=torch.device("cpu"), checkpointer=ckpt, resume=True,
          metrics=MetricsLogger(path))
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 4, 5, 6]


def test_the_method_contract_declares_every_hook_with_defaults():
    with pytest.raises(TypeError):  # phases, begin_phase and losses are required
        type("Partial", (ContractMethod,), {"phases": lambda self: []})()
    method = ToyMethod()
    assert method.train_summary is None and method.save_name is None
    assert method.checkpoint_due(1) is False and method.state_dict() == {}
    method.on_step({"step": 1})
    method.end_phase(None, method.phases()[0])


class StagedToyMethod(ToyMethod):
    """ToyMethod's terms in two stages; records whether stage 1's gradient exists when stage 2 starts."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.grad_before_retain: list[bool] = []

    def loss_stages(self, model, batches, ctx):
        whole = self.losses(model, batches, ctx)
        yield LossTerms(forget=whole.forget, logs=whole.logs)
        # the loop backpropagated stage 1 before asking for stage 2 (its graph can be freed)
        trained = model.a if ctx.phase.index == 0 else model.b
        self.grad_before_retain.append(trained.weight.grad is not None)
        yield LossTerms(retain=whole.retain)


@pytest.mark.parametrize("grad_filter", ["none", "same_sign", "asymmetric"])
@pytest.mark.parametrize("l2sp", [0.0, 0.1])
def test_staged_losses_train_exactly_as_one_stage(grad_filter, l2sp):
    one, staged = ToyModel(), ToyModel()
    cfg = TrainConfig(**CFG, grad_filter=grad_filter, l2sp_coef=l2sp)
    train(one, ToyMethod(steps=2), streams(), cfg, device=torch.device("cpu"))
    method = StagedToyMethod(steps=2)
    train(staged, method, streams(), cfg, device=torch.device("cpu"))
    for name, p in snapshot(one).items():
        torch.testing.assert_close(snapshot(staged)[name], p, rtol=1e-6, atol=1e-7)
    if grad_filter == "none":  # (filtered, the forget gradient waits beside p.grad for the filter)
        assert method.grad_before_retain and all(method.grad_before_retain)
