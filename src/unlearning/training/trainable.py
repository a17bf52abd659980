"""Which parameters train: peft LoRA adapters, or full fine-tuning of chosen parameters.

The original model is then the adapters switched off (no copy), or, under full fine-tuning, the
saved originals of just the parameters that train (:class:`unlearning.model.originals.OriginalWeights`).
Parameters are chosen by decoder layer and by a substring of their name relative to the layer
(``mlp``, ``mlp.dense_4h_to_h``), so the same settings work for every model family. Shared by the
representation methods and sequential unlearning.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from unlearning.core.config import param
from unlearning.core.errors import ConfigError
from unlearning.model.layers import get_parts, parse_layer_spec
from unlearning.model.meta import is_empty, kept_on_cpu
from unlearning.model.originals import OriginalWeights

log = logging.getLogger(__name__)


@dataclass
class LoraSettings:
    """peft LoRA adapters on Linear modules inside decoder layers."""
    r: int = param(16, min=1, help="LoRA rank")
    alpha: float = param(16, min=0, help="LoRA alpha (scale = alpha / r)")
    dropout: float = param(0.05, min=0, max=1, help="dropout on the adapter input")
    layers: list[int] | None = param(None, help="decoder layers that get adapters; null = every decoder layer")
    modules: list[str] = param([], help="a Linear module inside a chosen layer is adapted when its name "
                                        "relative to the layer (e.g. 'mlp.dense_4h_to_h') contains one of "
                                        "these; empty = every Linear module of the layer")
    init_b_std: float = param(0.0, min=0, help="start lora_B at N(0, std) instead of zero: breaks the symmetry "
                                               "of losses whose gradient vanishes while current == original "
                                               "(circuit breakers' ReLU(cos) is at its maximum there); 0 = peft's "
                                               "zero init")


def _layer_prefixes(model: nn.Module, layers: Sequence[int]) -> dict[int, str]:
    """The dotted name, within ``model``, of each decoder layer in ``layers``."""
    names = {id(m): n for n, m in model.named_modules()}
    parts = get_parts(model)
    return {i: names[id(parts.layers[i])] for i in layers}


def _matches(relative_name: str, patterns: Sequence[str]) -> bool:
    return not patterns or any(p in relative_name for p in patterns)


def add_lora(model: nn.Module, settings: LoraSettings, default_layers: Sequence[int] | None = None,
             default_modules: Sequence[str] = ()) -> nn.Module:
    """Wrap ``model`` in peft LoRA adapters on the chosen Linear modules of the chosen layers.

    Modules are named in full (``gpt_neox.layers.3.mlp.dense_4h_to_h``), so the choice works for
    every family and never touches the unembedding.
    """
    from peft import LoraConfig, get_peft_model
    depth = len(get_parts(model).layers)
    layers = settings.layers if settings.layers is not None else (
        list(default_layers) if default_layers is not None else list(range(depth)))
    layers = parse_layer_spec(layers, depth, field="lora.layers")
    patterns = settings.modules or list(default_modules)
    targets = []
    for i, prefix in _layer_prefixes(model, layers).items():
        for rel, module in get_parts(model).layers[i].named_modules():
            if isinstance(module, nn.Linear) and _matches(rel, patterns):
                targets.append(f"{prefix}.{rel}")
    if not targets:
        raise ConfigError(f"lora.modules: no Linear module of layers {layers} matches {patterns}")
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    # on a model built on the meta device (train.parallel fsdp) the adapters stay on the CPU with
    # their initial values, which sharding then loads (training/fsdp.py)
    with kept_on_cpu() if is_empty(model) else contextlib.nullcontext():
        model = get_peft_model(model, config)
    if settings.init_b_std > 0:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, settings.init_b_std)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA r=%d on %d modules of layers %s: %d trainable values", settings.r, len(targets), layers, n)
    return model


def layer_parameters(model: nn.Module, layers: Sequence[int], patterns: Sequence[str] = ()) -> list[str]:
    """Full names of the parameters of decoder ``layers`` whose layer-relative name matches ``patterns``."""
    out = []
    for i, prefix in _layer_prefixes(model, layers).items():
        for rel, _ in get_parts(model).layers[i].named_parameters():
            if _matches(rel, patterns):
                out.append(f"{prefix}.{rel}")
    if not out:
        raise ConfigError(f"full_modules: no parameter of layers {list(layers)} matches {list(patterns)}")
    return out


def snapshot_originals(model: nn.Module, layers: Sequence[int], patterns: Sequence[str] = ()) -> OriginalWeights:
    """Saved copies of just the parameters that full fine-tuning will change."""
    originals = OriginalWeights(model)
    for i in layers:
        originals.snapshot(i)
        stored = originals[i]
        for name in [n for n in stored if not _matches(n, patterns)]:
            del stored[name]  # unchanged parameters need no copy: the live ones are the originals
    log.info("saved originals of the trained parameters: %r", originals)
    return originals


def prepare_trainable(model: nn.Module, finetune: str, lora: LoraSettings, *, layers: Sequence[int] | None = None,
                      modules: Sequence[str] = (), field: str = "full_layers",
                      ) -> tuple[nn.Module, list[str], OriginalWeights | None]:
    """Set up LoRA or full fine-tuning; returns (model, names of trained parameters, originals or None).

    ``layers`` / ``modules``: where full fine-tuning trains (null / empty: every decoder layer, all
    of its parameters), and the defaults for LoRA when ``lora.layers`` / ``lora.modules`` are unset.
    """
    if finetune == "lora":
        model = add_lora(model, lora, layers, modules)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        return model, names, None
    depth = len(get_parts(model).layers)
    layers = parse_layer_spec(list(layers) if layers is not None else list(range(depth)), depth, field=field)
    patterns = list(modules)
    names = layer_parameters(model, layers, patterns)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, names, snapshot_originals(model, layers, patterns)
