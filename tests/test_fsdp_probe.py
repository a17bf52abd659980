"""FSDP2 (``fully_shard``) and the probe through the original layers, on 2 CPU processes with gloo.

FSDP2 runs on CPU/gloo in this torch, so the question ``model/originals.py`` leaves open is
answered here with real sharded models:

- LoRA: the probe (adapters after L switched off) and the current model, two forwards and one
  backward, give the unsharded logits and LoRA gradients: the LoRA form of the probe works.
- Full fine-tuning: the probe swaps stored originals into the layers' ``_parameters``; FSDP2's
  pre-forward hook then registers the all-gathered *current* parameters over the swap, so the
  "original" layers compute with the current weights. The test pins that down (the probe equals
  the current model, not the original), which is why full fine-tuning under FSDP2 keeps the
  originals as sharded modules of their own, swapped into the layer list (``training/fsdp.py``);
  the test checks that form gives the original model (docs/ARCHITECTURE.md, "Distributed").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gloo import free_port, join_gloo
from tiny_models import tiny_batch, tiny_model
from unlearning.model.layers import get_parts
from unlearning.model.originals import OriginalWeights, original_layers_after
from unlearning.training.fsdp import shard_model
from unlearning.training.trainable import LoraSettings, add_lora


def _shard(model: torch.nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard
    for layer in get_parts(model).layers:
        fully_shard(layer)
    fully_shard(model)


def _logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def _lora_step(model, ids, mask):
    """Probe through original layers after 0, and the current model: one loss, one backward."""
    with original_layers_after(model, 0):
        probe = _logits(model, ids, mask)
    current = _logits(model, ids, mask)
    (probe.pow(2).mean() + current.mean()).backward()
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for n, p in model.named_parameters() if p.requires_grad}
    return probe.detach(), current.detach(), grads


def _layer_2_changed() -> tuple[torch.nn.Module, OriginalWeights]:
    """Full fine-tuning's state: layer 2 changed (seeded noise), its original kept in an OriginalWeights store."""
    model = tiny_model("gpt_neox").train()
    originals = OriginalWeights(model)
    originals.snapshot(2)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in get_parts(model).layers[2].parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model, originals


def _worker(rank: int, port: int, out: str) -> None:
    join_gloo(rank, 2, port)
    try:
        ids, mask = tiny_batch(batch=2, seq=7)
        record = {}
        # LoRA: unsharded, then sharded, from the same weights
        lora = lambda: add_lora(tiny_model("gpt_neox"), LoraSettings(r=4, dropout=0.0, init_b_std=0.05))  # noqa: E731
        torch.manual_seed(0)
        plain = _lora_step(lora().train(), ids, mask)
        torch.manual_seed(0)
        sharded_model = lora().train()
        _shard(sharded_model)
        sharded = _lora_step(sharded_model, ids, mask)
        record["lora_probe"] = torch.allclose(plain[0], sharded[0], atol=1e-5)
        record["lora_current"] = torch.allclose(plain[1], sharded[1], atol=1e-5)
        record["lora_grads"] = all(torch.allclose(plain[2][n], sharded[2][n], atol=1e-6) for n in plain[2])
        record["lora_probe_differs_from_current"] = not torch.allclose(plain[0], plain[1], atol=1e-4)

        # Full fine-tuning: layer 2 changed, its original kept in an OriginalWeights store
        model, originals = _layer_2_changed()
        with torch.no_grad(), original_layers_after(model, 1, originals):
            want = _logits(model, ids, mask)  # unsharded: layer 2 computes with its original weights
        _shard(model)
        with torch.no_grad():
            current = _logits(model, ids, mask)
            with original_layers_after(model, 1, originals):
                got = _logits(model, ids, mask)
        record["full_probe_is_original"] = torch.allclose(got, want, atol=1e-5)
        record["full_probe_is_current"] = torch.allclose(got, current, atol=1e-6)
        record["full_original_differs"] = not torch.allclose(want, current, atol=1e-3)

        # The fix (training/fsdp.py): the original of layer 2 kept as a sharded module of its own,
        # swapped into the layer list; the probe is then the original model after layer 1
        model, originals = _layer_2_changed()
        shard_model(model, originals, torch.device("cpu"))
        with torch.no_grad(), original_layers_after(model, 1, originals):
            got = _logits(model, ids, mask)
        record["module_probe_is_original"] = torch.allclose(got, want, atol=1e-5)
        Path(f"{out}.rank{rank}").write_text(json.dumps(record))
    finally:
        torch.distributed.destroy_process_group()



def test_fsdp2_probe_lora_works_and_full_finetuning_needs_original_modules(tmp_path):
    out = tmp_path / "fsdp"
    torch.multiprocessing.spawn(_worker, args=(free_port(), str(out)), nprocs=2)
    for rank in range(2):
        record = json.loads(Path(f"{out}.rank{rank}").read_text())
        assert record["lora_probe_differs_from_current"]  # the adapters matter, so the check means something
        assert record["lora_probe"] and record["lora_current"] and record["lora_grads"], record
        assert record["full_original_differs"]
        # FSDP2 puts the current weights back over the swapped originals: the probe is the current model
        assert record["full_probe_is_current"] and not record["full_probe_is_original"], record
        assert record["module_probe_is_original"], record  # originals as modules of their own work
