"""A model built without its weights, for sharding before it loads (``train.parallel: fsdp``).

:func:`load_empty` builds the model from its ``config.json`` with every parameter on the ``meta``
device (no storage) and every buffer real on the CPU: non-persistent buffers such as the rotary
``inv_freq`` are in no weights file, so they are computed here as the model's own ``__init__``
computes them, and put back after sharding materialises the model (``training/fsdp.py``). The
weights are read later, from safetensors files only: :func:`weight_names` reads just the headers
(every rank checks the names, so a mismatch fails on every rank instead of leaving some waiting in
a collective), :func:`read_weights` the tensors, into CPU memory (rank 0 alone calls it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unlearning.core.errors import ConfigError
from unlearning.model.integrity import check_model_folder
from unlearning.model.loading import (_dtype_arg, _is_adapter_folder, _load_tokenizer, prepare_tokenizer,
                                      resolve_model_path)

__all__ = ["check_shardable", "is_empty", "kept_on_cpu", "load_empty", "read_weights", "weight_files",
           "weight_names", "weight_shapes"]

log = logging.getLogger(__name__)

# ``key``: the setting that asked for sharding (train.parallel for a run, attack.parallel for an attack)
FIX = "save it as a Hugging Face folder with .safetensors weights, or use {key} ddp"


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of model folder ``path`` (those its index names, when sharded)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(path.glob("*.safetensors"))


def check_shardable(name: str | os.PathLike, *, revision: str | None = None, trust_remote_code: bool = False,
                    key: str = "train.parallel", parallel_key: str | None = None) -> Path:
    """The folder of ``name``'s safetensors weights, the only form read after sharding; any other
    form (an adapter folder merged while loading, a .gguf file, .bin weights) is a one-line
    ConfigError naming ``key`` (and ``parallel_key``, default ``key``, in the fix: a teacher's
    error names its own setting but the fix is the run's). Cheap (no tensor is read): preflight calls it too."""
    path = resolve_model_path(name, revision, trust_remote_code=trust_remote_code)
    if path.suffix == ".gguf" or _is_adapter_folder(path) or not weight_files(path):
        kind = ".gguf file" if path.suffix == ".gguf" else "adapter folder" if _is_adapter_folder(path) else \
            "folder without .safetensors weights"
        raise ConfigError(f"{key}: fsdp loads the weights after sharding, from safetensors files, and "
                          f"model {name} is a {kind} ({path}); {FIX.format(key=parallel_key or key)}")
    return path


def load_empty(name: str | os.PathLike, *, revision: str | None = None, dtype: Any = "auto",
               device: torch.device, trust_remote_code: bool = False,
               key: str = "train.parallel") -> tuple[Any, Any, Path]:
    """``(model with parameters on meta, tokenizer, weights folder)`` for ``name``, in eval mode.

    Only a Hugging Face folder with safetensors weights can be read after sharding
    (:func:`check_shardable`); errors name ``key``."""
    from accelerate import init_empty_weights  # lazy: transformers imports are seconds
    from transformers import AutoConfig, AutoModelForCausalLM

    path = check_shardable(name, revision=revision, trust_remote_code=trust_remote_code, key=key)
    check_model_folder(path)
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers computed on the CPU
        model = AutoModelForCausalLM.from_config(config, dtype=_dtype_arg(dtype, device),
                                                 trust_remote_code=trust_remote_code)
    model.tie_weights()  # the context gives each module a new meta parameter, which unties a tied unembedding
    if (path / "generation_config.json").is_file():  # from_pretrained reads it; the saved model writes it
        from transformers import GenerationConfig
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    tokenizer = _load_tokenizer(path, trust_remote_code)
    if tokenizer.pad_token is None and tokenizer.eos_token is None and tokenizer.unk_token is None:
        raise ConfigError(f"{key}: fsdp cannot add a pad token to {name} (new embedding rows are "
                          f"in no weights file); give the tokenizer a pad token or use {key} ddp")
    prepare_tokenizer(tokenizer, model)
    model.eval()
    log.info("built %s from %s on the meta device (%s); its weights load after sharding",
             name, path, next(model.parameters()).dtype)
    return model, tokenizer, path


def weight_names(path: Path) -> set[str]:
    """The tensor names of folder ``path``'s safetensors files (headers only: no tensor is read)."""
    return set(weight_shapes(path))


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in folder ``path``'s safetensors files, by name (headers only)."""
    from safetensors import safe_open
    shapes: dict[str, tuple[int, ...]] = {}
    for file in weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes


def read_weights(path: Path, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Folder ``path``'s tensors (``names`` only, when given) in CPU memory, as stored."""
    from safetensors import safe_open
    out: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys() if names is None or k in names})
    log.info("read %d tensors (%.1f MiB) from %s", len(out),
             sum(t.numel() * t.element_size() for t in out.values()) / 2**20, path)
    return out


def is_empty(model: nn.Module) -> bool:
    """Whether ``model`` has parameters on the meta device (built by :func:`load_empty`)."""
    return any(p.is_meta for p in model.parameters())


@contextlib.contextmanager
def kept_on_cpu() -> Iterator[None]:
    """Inside the block, parameters a library creates on the CPU and then moves to the meta device
    are put back, with the values it gave them, when the block ends.

    peft creates LoRA adapters on the CPU, initialises them from the global RNG (the same draws as
    on a loaded model) and moves them to their base layer's device; on a model built by
    :func:`load_empty` that is meta, and the values would be lost. ``Module.to`` gives the moved
    module new parameter objects, so the ones recorded at registration keep the values; they come
    back in the dtype of the move, as the move would have cast them."""
    created: list[tuple[nn.Module, str, nn.Parameter]] = []
    handle = nn.modules.module.register_module_parameter_registration_hook(
        lambda module, name, param: created.append((module, name, param)) if param is not None else None)
    try:
        yield
    finally:
        handle.remove()
    for module, name, param in created:
        now = module._parameters.get(name)
        if now is not None and now.is_meta and not param.is_meta and now.shape == param.shape:
            module._parameters[name] = nn.Parameter(param.detach().to(now.dtype), requires_grad=now.requires_grad)
