"""Layer access, hidden-state capture, early stop and the original-layers probe on every family."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from tiny_models import FAMILIES, tiny_batch, tiny_model

from unlearning.core.errors import ConfigError, UserError
from unlearning.model.layers import capture_hidden, check_layers, forward_until, get_parts, num_layers, parse_layer_spec
from unlearning.model.originals import OriginalWeights, original_layers_after, original_model

DEPTH = 3


def lora(model, seed=0, scale=0.3):
    """Wrap ``model`` in LoRA on all linear modules and give every adapter non-zero weights."""
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return pm


def logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits


def probe_by_hand(original, current, L, ids, mask):
    """Logits of ``original`` with its layer-L output replaced by ``current``'s layer-L output."""
    with capture_hidden(current, [L]) as h:
        current(input_ids=ids, attention_mask=mask)
    handle = get_parts(original).layers[L].register_forward_hook(lambda m, a, o: h[L])
    try:
        return logits(original, ids, mask)
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------- parts


@pytest.mark.parametrize("family", FAMILIES)
def test_get_parts_every_family_and_wrapper(family):
    model = tiny_model(family)
    parts = get_parts(model)
    assert len(parts.layers) == DEPTH == num_layers(model)
    assert parts.lm_head is model.get_output_embeddings()
    assert parts.embed is model.get_input_embeddings()
    assert isinstance(parts.final_norm, torch.nn.LayerNorm) or "Norm" in type(parts.final_norm).__name__
    assert (parts.rotary is None) == (family == "gpt2")
    expected = {"mistral": "llama", "qwen2": "llama"}.get(family, family)
    assert parts.family == expected
    # the same live modules through peft, DataParallel (.module) and torch.compile wrappers
    wrapped = [lora(copy.deepcopy(model)), torch.nn.DataParallel(model), torch.compile(model)]
    for w in wrapped[1:]:
        assert get_parts(w).layers is parts.layers
    assert len(get_parts(wrapped[0]).layers) == DEPTH


def test_unsupported_architecture_is_a_user_error():
    with pytest.raises(UserError, match="unsupported architecture"):
        get_parts(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# ---------------------------------------------------------------------------------------------- capture


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_equals_output_hidden_states(family):
    model = tiny_model(family)
    ids, mask = tiny_batch()
    model(input_ids=ids, attention_mask=mask, output_hidden_states=True)  # HF installs its own hooks once
    hooks_before = dict(get_parts(model).layers[0]._forward_hooks)
    with capture_hidden(model, range(DEPTH)) as h:
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    for i in range(DEPTH - 1):
        torch.testing.assert_close(h[i], out.hidden_states[i + 1], rtol=0, atol=0)
    # HF applies the final norm to the last hidden_states entry
    torch.testing.assert_close(get_parts(model).final_norm(h[DEPTH - 1]), out.hidden_states[DEPTH])
    assert dict(get_parts(model).layers[0]._forward_hooks) == hooks_before  # ours removed


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_until_stops_early_and_keeps_gradients(family):
    model = tiny_model(family)
    parts = get_parts(model)
    ids, mask = tiny_batch()
    calls = [0] * DEPTH
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, layer in enumerate(parts.layers)]
    head_calls = []
    handles.append(parts.lm_head.register_forward_pre_hook(lambda m, a: head_calls.append(1)))
    h = forward_until(model, ids, mask, [0, 1])
    assert calls == [1, 1, 0] and not head_calls
    with capture_hidden(model, [1]) as full:
        model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(h[1], full[1], rtol=0, atol=0)
    for hd in handles:
        hd.remove()
    # gradients flow through the captured tensors to the layers that ran, and only those
    h[1].pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in parts.layers[0].parameters()
               if p.dim() > 1)
    assert all(p.grad is None for p in parts.layers[2].parameters())
    # through a peft wrapper, and with the context manager used directly
    pm = lora(copy.deepcopy(model))
    with capture_hidden(pm, [0]) as full:
        pm(input_ids=ids, attention_mask=mask)
    with capture_hidden(pm, [0], stop_after=True) as early:
        pm(input_ids=ids, attention_mask=mask)
        raise AssertionError("the forward pass should have stopped")
    torch.testing.assert_close(early[0], full[0], rtol=0, atol=0)
    torch.testing.assert_close(forward_until(pm, ids, mask, [0])[0], full[0], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- probe


@pytest.mark.parametrize("family", FAMILIES)
def test_probe_without_change_equals_model(family):
    model = tiny_model(family)
    ids, mask = tiny_batch()
    ref = logits(model, ids, mask)
    store = OriginalWeights(model)
    for L in range(-1, DEPTH):
        store.snapshot(max(L, 0))  # unchanged copies swap in
        with original_layers_after(model, L, store):
            torch.testing.assert_close(logits(model, ids, mask), ref, rtol=0, atol=1e-5)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, target_modules="all-linear"))
    for L in range(-1, DEPTH):  # fresh LoRA: B = 0
        with original_layers_after(pm, L):
            torch.testing.assert_close(logits(pm, ids, mask), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_probe_equals_manual_computation(family):
    base = tiny_model(family)
    original = copy.deepcopy(base)
    pm = lora(base)
    ids, mask = tiny_batch()
    current = logits(pm, ids, mask)
    assert (current - logits(original, ids, mask)).abs().max() > 1e-2  # the adapters matter
    for L in range(-1, DEPTH - 1):
        with original_layers_after(pm, L), capture_hidden(pm, range(DEPTH)) as inside:
            probe = logits(pm, ids, mask)
        if L >= 0:
            torch.testing.assert_close(probe, probe_by_hand(original, pm, L, ids, mask), rtol=1e-5, atol=1e-5)
        # layers <= L adapted, layers > L computed with base weights (same input -> base output)
        with capture_hidden(pm, range(DEPTH)) as adapted:
            pm(input_ids=ids, attention_mask=mask)
        for i in range(DEPTH):
            if i <= L:
                torch.testing.assert_close(inside[i], adapted[i], rtol=0, atol=0)
            else:
                assert (inside[i] - adapted[i]).abs().max() > 1e-3
        layer = get_parts(original).layers[L + 1]
        with capture_hidden(original, [L + 1]) as orig_h, \
                torch.no_grad():
            # feed the base layer the probe's own input: it must reproduce the probe's output
            hook = layer.register_forward_pre_hook(
                lambda m, a, kw: ((inside[L],) + tuple(a[1:]), kw) if L >= 0 else None, with_kwargs=True)
            original(input_ids=ids, attention_mask=mask)
            hook.remove()
        torch.testing.assert_close(orig_h[L + 1], inside[L + 1], rtol=1e-5, atol=1e-5)
    # after the block, everything is adapted again
    torch.testing.assert_close(logits(pm, ids, mask), current, rtol=0, atol=0)
    with original_model(pm):
        torch.testing.assert_close(logits(pm, ids, mask), logits(original, ids, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_finetune_probe_uses_stored_originals(family):
    model = tiny_model(family)
    original = copy.deepcopy(model)
    store = OriginalWeights(model)
    parts = get_parts(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for i in (1, 2):  # "train" layers 2 and 1: snapshot first, then change
            store.snapshot(i)
            for p in parts.layers[i].parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    assert set(store.keys()) == {1, 2}
    ids, mask = tiny_batch()
    for L in (0, 1):
        with original_layers_after(model, L, store):
            probe = logits(model, ids, mask)
        torch.testing.assert_close(probe, probe_by_hand(original, model, L, ids, mask), rtol=1e-5, atol=1e-5)
    with original_model(model, store):
        torch.testing.assert_close(logits(model, ids, mask), logits(original, ids, mask), rtol=1e-5, atol=1e-5)
    # a partial store (only the parameters that train), and a store rebuilt from a reloaded original
    partial, rebuilt = OriginalWeights(model), OriginalWeights(model)
    for i in (1, 2):
        partial.snapshot(i, names=[n for n, _ in parts.layers[i].named_parameters()][:2])
        rebuilt.snapshot(i, source=original)
    assert len(partial[1]) == 2
    with original_model(model, rebuilt):
        torch.testing.assert_close(logits(model, ids, mask), logits(original, ids, mask), rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="no parameters"):
        partial.snapshot(0, names=["nope.weight"])
    # a model without adapters needs the store
    with pytest.raises(UserError, match="OriginalWeights"):
        with original_layers_after(model, 0):
            pass


@pytest.mark.parametrize("family", ["gpt_neox", "llama", "gpt2"])
def test_gradients_reach_layer_L_through_original_layers_only(family):
    model = tiny_model(family).train()
    parts = get_parts(model)
    store = OriginalWeights(model)
    store.snapshot(2)
    with torch.no_grad():
        for p in parts.layers[2].parameters():
            p.add_(0.1)
    params_before = {n: p for n, p in model.named_parameters()}
    ids, mask = tiny_batch()
    with original_layers_after(model, 1, store):
        loss = logits(model, ids, mask).logsumexp(-1).mean()
    loss.backward()
    assert {n: p for n, p in model.named_parameters()} == params_before  # the same Parameter objects
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in parts.layers[1].parameters() if p.dim() > 1)
    assert all(p.grad is None for p in parts.layers[2].parameters())  # current layer 2 is not used
    assert all(not t.requires_grad and t.grad is None for t in store[2].values())


@pytest.mark.parametrize("family", ["gpt_neox", "llama", "gpt2"])
def test_lora_probe_gradients_flags_and_errors(family):
    pm = lora(tiny_model(family)).train()
    parts = get_parts(pm)
    for name, p in parts.layers[0].named_parameters():  # a method froze layer 0's adapters
        if "lora_" in name:
            p.requires_grad_(False)
    ids, mask = tiny_batch()
    with original_layers_after(pm, 1):
        loss = logits(pm, ids, mask).logsumexp(-1).mean()
    loss.backward()
    lora_grads = {n: p.grad for n, p in parts.layers[1].named_parameters() if "lora_" in n}
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for n, g in lora_grads.items() if "lora_B" in n)
    assert all(p.grad is None for n, p in parts.layers[2].named_parameters())
    # requires_grad of frozen adapters is untouched, and adapters are back on after an error
    assert not any(p.requires_grad for n, p in parts.layers[0].named_parameters() if "lora_" in n)
    ref = logits(pm, ids, mask)
    with pytest.raises(RuntimeError, match="boom"):
        with original_layers_after(pm, 0):
            raise RuntimeError("boom")
    torch.testing.assert_close(logits(pm, ids, mask), ref, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="it has 3 layers"):
        original_layers_after(pm, 3)


def test_probe_backward_outside_block_with_gradient_checkpointing():
    """Checkpointed layers re-run forward during backward, after the block has ended."""
    ids, mask = tiny_batch()

    def grads(checkpointing):
        pm = lora(tiny_model("llama"))
        if checkpointing:
            pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            pm.enable_input_require_grads()
        pm.train()
        with original_layers_after(pm, 0):
            loss = logits(pm, ids, mask).logsumexp(-1).mean()
        loss.backward()
        return {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and plain
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- specs


def test_parse_layer_spec():
    assert parse_layer_spec("31->11:4", 32) == [31, 27, 23, 19, 15, 11]
    assert parse_layer_spec("31->8:4", 32) == [31, 27, 23, 19, 15, 11]
    assert parse_layer_spec("28->16:4", 32) == [28, 24, 20, 16]
    assert parse_layer_spec("31->0:1", 32) == list(range(31, -1, -1))
    assert parse_layer_spec("31→29", 32) == [31, 30, 29]
    assert parse_layer_spec("0->6:3", 8) == [0, 3, 6]
    assert parse_layer_spec([5, 3], 8) == [5, 3]
    assert parse_layer_spec("5, 3", 8) == [5, 3]
    assert parse_layer_spec(4, 8) == [4]
    assert parse_layer_spec("all", 4) == [0, 1, 2, 3]
    assert parse_layer_spec([5, 10, 15, 20, 25, 30], 12, clip_to_depth=True) == [5, 10]
    assert parse_layer_spec([5, 10, 15, 20, 25, 30], 4, clip_to_depth=True) == [3]


@pytest.mark.parametrize("spec, message", [
    ("40->11:4", "retain_layers: layer 40 is outside the model: it has 32 layers \\(0..31\\)"),
    ([3, 40], "layer 40 is outside the model"),
    ("31->11:0", "step 0"),
    ("five", "cannot read"),
    ([3, 3], "listed twice"),
    ([], "empty"),
    ([-1], "layer -1 is outside"),
])
def test_parse_layer_spec_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_layer_spec(spec, 32, field="retain_layers")


def test_check_layers_names_field_and_depth():
    model = tiny_model("llama")
    assert check_layers(model, [0, 2], "layers") == [0, 2]
    with pytest.raises(ConfigError, match=r"^target_layers: layer 3 is outside the model: it has 3 layers \(0..2\)$"):
        check_layers(model, [3], "target_layers")


# ---------------------------------------------------------------------------------------------- DDP


def _ddp_worker(rank, port, out_dir):
    import gc

    import torch.distributed as dist

    from gloo import join_gloo
    join_gloo(rank, 2, port)
    try:
        model = tiny_model("llama").train()
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        ids, mask = tiny_batch(seed=10 + rank)  # different data on each rank
        synced = []
        for _ in range(2):
            forward_until(ddp, ids, mask, [1])[1].pow(2).mean().backward()
            grad = get_parts(model).layers[0].mlp.up_proj.weight.grad.clone()
            mean = grad.clone()
            dist.all_reduce(mean)
            synced.append(bool(torch.allclose(mean / 2, grad)))
            model.zero_grad()
        (out_dir / f"rank{rank}.txt").write_text(repr(synced))
        del ddp  # a DDP reducer outliving its process group can hang at exit (seen in CI)
        gc.collect()
    finally:
        dist.destroy_process_group()


def test_forward_until_under_ddp_all_reduces_gradients(tmp_path):
    """The early stop skips DDP's post-forward; forward_until runs it, so gradients still sync.

    Both ranks are spawned children (spawn, not fork: forking a process that has run torch can
    deadlock); torch.multiprocessing.spawn ends the other rank and raises if either fails, so a
    crashed rank can never leave this process waiting in a collective."""
    import torch.multiprocessing as mp

    from gloo import free_port
    mp.spawn(_ddp_worker, args=(free_port(), tmp_path), nprocs=2, join=True)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["[True, True]"] * 2
