"""FSDP2 (``fully_shard``) for the one loop: ``train.parallel: fsdp`` under torchrun.

Each decoder layer is a unit of its own and the decoder model (embedding, final norm,
unembedding) is the root, so a rank holds 1/N of every parameter, gradient and optimizer state
between forwards. What the rest of the project needs from a sharded model lives here:

- **Loading.** No rank ever holds the whole model. Every rank builds it on the meta device
  (``model/meta.load_empty``: parameters on meta, buffers computed on the CPU) and the method sets
  it up there (LoRA adapters are real, on the CPU, with the values the seeded RNG gives them on a
  loaded model); :func:`shard_model` then shards it, ``to_empty`` gives each rank storage for its
  shards only, and ``set_model_state_dict(..., full_state_dict=True, broadcast_from_rank0=True)``
  fills them: rank 0 reads the safetensors files into CPU memory (plus the adapters) and broadcasts
  each full tensor, of which every rank keeps its shard; the others pass an empty dict and never
  read a tensor of the file. The kept originals are loaded from their layer's tensors the same way,
  and the non-persistent buffers (rotary ``inv_freq``: in no file) are copied back from the build.
- **The probe.** LoRA needs nothing: the adapters are switched off inside the sharded layers.
  Under full fine-tuning FSDP2's pre-forward registers the all-gathered *current* parameters
  again, over any original swapped into ``_parameters``; so each changed layer's original is kept
  as a frozen module of its own (:meth:`OriginalWeights.keep_as_modules`), sharded here like the
  layers, and swapped into the layer list. Each such module is an FSDP root of its own
  (initialised here, before the model's first forward, so the model's root never adopts one
  that happens to sit in the layer list) and reshards after its forward like a layer.
- **A frozen model.** A model that is only run, never trained (``checkpoint_transfer``'s teacher,
  an early checkpoint of the model's own architecture), is built on meta by :func:`load_to_train`
  and sharded and loaded by :func:`shard_frozen` as above: frozen, no optimizer. Its forwards are
  collectives too, so every rank runs it as often as the others (once per forget micro-batch, its
  logits on the metric steps, which every rank shares); it runs under ``no_grad`` (inference
  mode and FSDP2's in-place unshard do not mix in every torch version) and is resharded
  after each forward (``model.layers.reshard``: the root keeps its parameters gathered for a
  backward that never comes). Nothing of it is in flight after a forward, so dropping it is safe.
- **State.** Checkpoints and the saved model hold full tensors: ``get_model_state_dict`` /
  ``get_optimizer_state_dict`` with ``full_state_dict=True, cpu_offload=True`` gather them on
  rank 0 (collectives: every rank calls them); a resume loads the full tensors on every rank and
  each keeps its shard (``set_*_state_dict``).
- **Micro-batches.** Each stage's backward reduce-scatters its gradients at once (no ``no_sync``):
  the sharded gradients accumulate over micro-batches and stages, the same sum one process makes,
  at the cost of one reduce-scatter per backward.

Evaluation of a sharded model runs every question on every rank (``evaluation/parallel.py``):
each forward is a collective, so ranks scoring shards of different sizes would wait on each other
for ever. The same forwards everywhere is the simplest correct rule; it costs N-fold compute.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unlearning.core.errors import ConfigError
from unlearning.core.runtime import world_size
from unlearning.model.layers import get_parts, is_sharded
from unlearning.model.loading import load_model
from unlearning.model.meta import load_empty, read_weights, weight_names
from unlearning.model.originals import OriginalWeights

__all__ = ["full_state", "grad_norm_value", "is_sharded", "load_full_state", "load_optimizer_state",
           "load_to_train", "merged_lora_state", "optimizer_state", "shard_frozen", "shard_model"]

log = logging.getLogger(__name__)


def _options(**kw: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def load_to_train(name: str, parallel: str, *, revision: str | None = None, dtype: Any = "auto",
                  device: torch.device, key: str = "train.parallel") -> tuple[Any, Any, Path | None]:
    """``(model, tokenizer, weights)`` of a model about to be trained (``unlearn run`` and the
    tamper attack load through here, so both shard alike) or run beside it (``checkpoint_transfer``'s
    teacher, sharded by :func:`shard_frozen`). Under ``parallel: fsdp`` with several
    ranks: built on the meta device, and ``weights`` the folder :func:`shard_model` loads it from
    once the caller has set it up (``key``: the setting named in errors). Otherwise (one process,
    or ``ddp``) the loaded model and ``None``."""
    if parallel == "fsdp" and world_size() > 1:
        return load_empty(name, revision=revision, dtype=dtype, device=device, key=key)
    model, tokenizer = load_model(name, revision=revision, dtype=dtype, device=str(device))
    return model, tokenizer, None


def shard_model(model: nn.Module, originals: OriginalWeights | None, device: torch.device,
                weights: Path | None = None) -> None:
    """Shard ``model`` in place: every decoder layer, then the decoder model as the root; the
    originals of fully fine-tuned layers become sharded modules of their own first.

    ``weights``: the safetensors folder of a model built on the meta device (``model/meta.py``):
    once sharded it is materialised on ``device`` and loaded from there (see the module docstring)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    # What no file holds, taken while the tensors are whole: the method's new parameters (LoRA
    # adapters, left on the CPU by model/meta.kept_on_cpu) and the non-persistent buffers.
    initial = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if not p.is_meta}
    buffers = {model: _buffers(model)}
    kept_modules: list[nn.Module] = []

    def shard_original(layer: nn.Module) -> None:
        buffers[layer] = _buffers(layer)
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)  # a root by itself would keep it gathered
        kept_modules.append(layer)

    kept = originals is not None and len(originals) > 0
    if kept:
        originals.keep_as_modules(shard_original)
    parts = get_parts(model)
    for layer in parts.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(parts.model, mesh=mesh)
    if weights is not None:
        _materialise(model, originals if kept else None, device, weights, initial, buffers)
    for layer in kept_modules:
        layer._get_fsdp_state()._lazy_init()  # its own root now: see the module docstring
    parts.model._get_fsdp_state()._lazy_init()  # fix the tree now, before a swapped original is in it
    log.info("FSDP2: %d decoder layers and the root sharded over %d ranks%s", len(parts.layers), mesh.size(),
             f"; originals kept as sharded modules: {originals}" if kept else "")


def shard_frozen(model: nn.Module, device: torch.device, weights: Path) -> None:
    """Shard and load a model built on meta (``weights``: its safetensors folder) that is only run,
    never trained: frozen, each decoder layer a unit and the decoder model the root, as
    :func:`shard_model` shards the trained one (see *A frozen model* in the module docstring)."""
    model.eval().requires_grad_(False)  # before sharding: FSDP2 keeps requires_grad on its shards
    shard_model(model, None, device, weights)


def _file_name(name: str) -> str:
    """A parameter's name in the weights file: peft's wrapper prefix and ``base_layer`` removed."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of ``module``'s non-persistent buffers (computed on the CPU by ``model/meta.py``)."""
    persistent = set(module.state_dict())
    return {n: b.detach().clone() for n, b in module.named_buffers() if n not in persistent}


def _materialise(model: nn.Module, originals: OriginalWeights | None, device: torch.device, weights: Path,
                 initial: dict[str, torch.Tensor], buffers: dict[nn.Module, dict[str, torch.Tensor]]) -> None:
    """Give the sharded meta model (and the kept originals) storage on ``device`` and load them:
    rank 0 reads the file into CPU memory and ``set_model_state_dict`` broadcasts each full tensor,
    of which every rank keeps its shard; the other ranks never read a tensor of the file."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    # Each tied weight once (the unembedding sharing the embedding): loading one name fills both.
    wanted = {n for n, _ in model.named_parameters()} | set(model.state_dict())
    wanted = {n for n in wanted if n not in _tied_duplicates(model)}
    from_file = {n: _file_name(n) for n in wanted if n not in initial}
    names = weight_names(weights)  # headers, on every rank: a mismatch fails everywhere at once
    missing = sorted(n for n, f in from_file.items() if f not in names)
    if missing:
        raise ConfigError(f"train.parallel: fsdp: {weights} has no tensor {from_file[missing[0]]} for "
                          f"{missing[0]} ({len(missing)} missing; its names are not the model's); use "
                          f"train.parallel ddp, which loads through transformers")
    parts = get_parts(model)
    layer_names = {id(m): n for n, m in model.named_modules()}
    model.to_empty(device=device)
    kept = {k: originals.module(k) for k in originals.keys()} if originals is not None else {}
    for module in kept.values():
        module.to_empty(device=device)
    rank0 = torch.distributed.get_rank() == 0
    files = read_weights(weights, set(from_file.values())) if rank0 else {}
    full = {n: files[f] for n, f in from_file.items()} if rank0 else {}
    full.update(initial if rank0 else {})
    options = _options(broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, full, options=options)
    for key, module in kept.items():  # the original of layer ``key``: the file's tensors of that layer
        prefix = _file_name(layer_names[id(parts.layers[key])] + ".")
        state = {n: files[prefix + _file_name(n)] for n in module.state_dict()} if rank0 else {}
        set_model_state_dict(module, state, options=options)
    del files, full
    with torch.no_grad():  # to_empty left them uninitialised too
        for module, saved in buffers.items():
            for n, b in module.named_buffers():
                if n in saved:
                    b.copy_(saved[n])
    log.info("FSDP2: materialised on %s and loaded from %s (%s)", device, weights,
             "read here and broadcast" if rank0 else "shards received from rank 0")


def _tied_duplicates(module: nn.Module) -> set[str]:
    first = {n for n, _ in module.named_parameters()}
    return {n for n, _ in module.named_parameters(remove_duplicate=False)} - first


def full_state(model: nn.Module, names: set[str] | list[str]) -> dict[str, torch.Tensor]:
    """The full tensors of parameters ``names``, on the CPU of rank 0 (empty elsewhere). Every rank calls it."""
    state = _gathered(model)
    return {n: state[n] for n in sorted(names) if n in state}


def load_full_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load full tensors (every rank holds them, read from the checkpoint); each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    missing = sorted(set(tensors) - {n for n, _ in model.named_parameters()})
    if missing:
        raise RuntimeError(f"the checkpoint holds tensors this model lacks ({missing[0]}, ...): it was written "
                           f"by another model or set-up; start a fresh run instead of resuming")
    set_model_state_dict(model, tensors, options=_options(strict=False))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state with full tensors keyed by parameter name, on rank 0's CPU."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=_options())


def grad_norm_value(norm: torch.Tensor) -> torch.Tensor:
    """``clip_grad_norm_`` of DTensor gradients returns a DTensor; the loop logs a plain tensor."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def merged_lora_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(merged weights, adapter weights)`` of a sharded model (a peft model's LoRA adapters merged),
    full tensors on rank 0's CPU (empty elsewhere); every rank calls it. The merge is peft's
    ``merge_and_unload`` on the full tensors (``W + scaling * B @ A``), so the saved model is the one
    the DDP path saves."""
    from peft.tuners.lora import LoraLayer
    inner = get_parts(model).model
    state = _gathered(inner)
    if not state:
        return {}, {}
    names = {id(m): n for n, m in inner.named_modules()}
    adapter = {k: v for k, v in state.items() if "lora_" in k}
    merged = {k: v for k, v in state.items() if "lora_" not in k}
    for module in inner.modules():
        if not isinstance(module, LoraLayer):
            continue
        prefix = names[id(module)]
        for name in module.active_adapters:
            a = state[f"{prefix}.lora_A.{name}.weight"].float()
            b = state[f"{prefix}.lora_B.{name}.weight"].float()
            delta = module.scaling[name] * (b @ a)
            if getattr(module, "fan_in_fan_out", False):  # GPT-2's Conv1D keeps its weight transposed
                delta = delta.T
            w = merged[f"{prefix}.base_layer.weight"]
            merged[f"{prefix}.base_layer.weight"] = (w.float() + delta).to(w.dtype)
    # A tied weight (the unembedding sharing the embedding) is one parameter under two names; the
    # gathered state holds it twice, and save_pretrained (given a state dict) would write both.
    merged = {k.replace(".base_layer.", "."): v for k, v in merged.items() if k not in _tied_duplicates(inner)}
    return merged, adapter


def _gathered(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every full tensor of ``module``'s state dict on rank 0's CPU (an empty dict elsewhere)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(module, options=_options(cpu_offload=True))
