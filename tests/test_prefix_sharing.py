"""The shared frozen prefix of the sequential retain loss: same numbers, same gradients, fewer blocks run."""

import pytest
import torch

from tiny_models import tiny_batch, tiny_model
from unlearning.methods.sequential_losses import retain_losses
from unlearning.model.layers import forward_until, get_parts, start_at
from unlearning.model.originals import OriginalWeights


@pytest.mark.parametrize("family", ["gpt_neox", "llama", "gpt2"])
def test_start_at_continues_a_forward_pass_exactly(family):
    model = tiny_model(family, layers=4).eval()
    ids, mask = tiny_batch()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        h = forward_until(model, ids, mask, [1])[1]  # (B, T, C): block 1's output
        calls = []
        handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
                   for i, b in enumerate(get_parts(model).layers)]
        with start_at(model, 2, h):
            resumed = model(input_ids=ids, attention_mask=mask).logits
        for hd in handles:
            hd.remove()
    torch.testing.assert_close(resumed, full, rtol=0, atol=1e-6)
    assert get_parts(model).layers[0].forward.__func__ is type(get_parts(model).layers[0]).forward  # restored
    with torch.no_grad():  # and the model is whole again afterwards
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, full, rtol=0, atol=0)


def _changed_full_ft_model(target: int):
    """A 4-layer model in the phase of ``target``: a deeper layer already changed, ``target`` training."""
    model = tiny_model("gpt_neox", layers=4)
    originals = OriginalWeights(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in (3, target):
        originals.snapshot(layer)
    with torch.no_grad():
        for p in get_parts(model).layers[3].parameters():
            p.add_(0.05 * torch.randn_like(p))
        for p in get_parts(model).layers[target].parameters():
            p.add_(0.05 * torch.randn_like(p))
    params = list(get_parts(model).layers[target].parameters())
    for p in params:
        p.requires_grad_(True)
    return model, originals, params


@pytest.mark.parametrize("weights", [{"l2": 1.0}, {"kl": 1.0}, {"l2": 1.0, "kl": 0.5, "nll": 0.2}])
def test_shared_prefix_gives_the_same_losses_and_gradients(weights):
    target = 2
    model, originals, params = _changed_full_ft_model(target)
    ids, mask = tiny_batch(batch=3, seq=9)
    batch = {"input_ids": ids, "attention_mask": mask}
    results = []
    for prefix in (0, target):
        out = retain_losses(model, batch, weights, [0, 1, 2, 3], originals, frozen_prefix=prefix)
        total = sum(out.values())
        grads = torch.autograd.grad(total, params)
        results.append(({k: v.item() for k, v in out.items()}, grads))
    (plain, g_plain), (shared, g_shared) = results
    assert set(plain) == set(weights)
    assert plain == pytest.approx(shared, rel=1e-6, abs=1e-7)
    assert any(v > 0 for v in plain.values())  # the changed layers make the losses non-zero
    for a, b in zip(g_plain, g_shared):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_shared_prefix_runs_the_prefix_once(monkeypatch):
    target = 2
    model, originals, _ = _changed_full_ft_model(target)
    ids, mask = tiny_batch()
    block0 = get_parts(model).layers[0]
    real = type(block0).forward
    computed = []

    def spy(self, *a, **k):  # the class's forward: start_at's pass-through bypasses it
        if self is block0:
            computed.append(1)
        return real(self, *a, **k)
    monkeypatch.setattr(type(block0), "forward", spy)
    counts = []
    for prefix in (target, 0):
        computed.clear()
        retain_losses(model, {"input_ids": ids, "attention_mask": mask}, {"kl": 1.0}, [], originals,
                      frozen_prefix=prefix)
        counts.append(len(computed))
    assert counts == [1, 2]  # shared: once for both passes; plain: once per pass


@pytest.mark.parametrize("loss", ["max_entropy_kl", "kl_retain"])
def test_rowwise_chunks_give_the_same_loss_and_gradient(loss, monkeypatch):
    from unlearning.training import losses
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 11, 97, generator=g, requires_grad=True)
    other = torch.randn(3, 11, 97, generator=g)
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, -3:] = False

    def run():
        value = (losses.max_entropy_kl(logits, mask) if loss == "max_entropy_kl"
                 else losses.kl_retain(logits, other, mask))
        return value, torch.autograd.grad(value, logits)[0]
    whole, g_whole = run()
    monkeypatch.setattr(losses, "ROWWISE_CHUNK_ELEMENTS", 97 * 4)  # 4 rows a chunk: 9 chunks of 33 rows
    chunked, g_chunked = run()
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=0)
    torch.testing.assert_close(g_chunked, g_whole, rtol=1e-6, atol=1e-9)
