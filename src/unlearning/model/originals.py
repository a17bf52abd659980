"""The original model: LoRA adapters switched off, or stored copies of changed layers swapped in.

- :class:`OriginalWeights` keeps copies of the original parameters of the parts that full
  fine-tuning changes, and only those; under FSDP2 each changed layer's original is kept as a
  module of its own instead (:meth:`OriginalWeights.keep_as_modules`), swapped into the layer list.
- :func:`original_layers_after` / :func:`original_model` make (part of) the model compute as the
  original model: LoRA adapters switched off, or stored copies of fully fine-tuned layers swapped in.
  This is the "probe" of sequential unlearning: current layers ``0..L``, then the original layers
  after ``L``, the original final norm and the original unembedding.

Like :mod:`unlearning.model.layers`, these run the model's own ``forward``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from unlearning.core.errors import ConfigError, UserError
from unlearning.model.layers import check_layers, get_parts, num_layers


class OriginalWeights:
    """Copies of the original parameters of the parts that full fine-tuning changes, and only those.

    Call :meth:`snapshot` for a layer (or ``"final_norm"`` / ``"lm_head"`` / ``"embed"``) before
    its parameters first move; later calls for the same part keep the first copy. The copies are
    detached, never require gradients, and live on the parameters' device and dtype.
    """

    def __init__(self, model: nn.Module):
        self._parts = get_parts(model)
        self._store: dict[int | str, dict[str, torch.Tensor]] = {}
        self._modules: dict[int, nn.Module] = {}  # layers kept whole (keep_as_modules)

    def snapshot(self, key: int | str, source: nn.Module | None = None,
                 names: Iterable[str] | None = None) -> None:
        """Store part ``key``'s current parameters (or those of the same part of ``source``,
        an original model loaded again, e.g. to rebuild the store when a run resumes).

        ``names`` (part-relative, e.g. ``mlp.down_proj.weight``) limits the copy to the parameters
        that will train; the others stay live, and being unchanged they are the originals.
        """
        if isinstance(key, int):
            check_layers(len(self._parts.layers), [key], "snapshot")
        if key in self:
            return
        target = self._parts.part(key)
        module = get_parts(source).part(key) if source is not None else target
        current = dict(target.named_parameters())
        wanted = set(current) if names is None else set(names)
        if not wanted <= set(current):
            raise KeyError(f"snapshot({key!r}): no parameters {sorted(wanted - set(current))} in this part")
        copies = {n: p.detach().to(current[n].device, current[n].dtype, copy=True)
                  for n, p in module.named_parameters() if n in wanted}
        if set(copies) != wanted:
            raise ValueError(f"snapshot({key!r}): source lacks parameters {sorted(wanted - set(copies))}")
        self._store[key] = copies

    def keep_as_modules(self, prepare: Callable[[nn.Module], None]) -> None:
        """Keep every stored layer's original as a module of its own: a frozen copy of the layer
        with the stored parameters loaded, handed to ``prepare`` (FSDP2 shards it there), which
        :func:`original_layers_after` / :func:`original_model` put in the layer list in place of
        the current layer. FSDP2 needs this form: its pre-forward registers the all-gathered
        current parameters again, over parameters swapped in. Call it while the layers are still
        plain modules (before sharding the model); later snapshots of these layers are no-ops."""
        for key in list(self._store):
            if not isinstance(key, int):
                raise UserError(f"original weights: only decoder layers can be kept as modules, not {key!r}")
            layer = copy.deepcopy(self._parts.layers[key])
            with torch.no_grad():
                params = dict(layer.named_parameters())
                for name, stored in self._store[key].items():
                    params[name].copy_(stored)
            layer.requires_grad_(False)
            prepare(layer)
            self._modules[key] = layer
            del self._store[key]

    def module(self, key: int | str) -> nn.Module | None:
        """Layer ``key``'s original as a module (:meth:`keep_as_modules`), or None."""
        return self._modules.get(key) if isinstance(key, int) else None

    def keys(self) -> list[int | str]:
        return [*self._modules, *self._store]

    def __contains__(self, key: object) -> bool:
        return key in self._store or key in self._modules

    def __getitem__(self, key: int | str) -> dict[str, torch.Tensor]:
        return self._store[key]

    def __len__(self) -> int:
        return len(self._store) + len(self._modules)

    def nbytes(self) -> int:
        """Bytes held on this process (a sharded module's local shards)."""
        tensors = [t for d in self._store.values() for t in d.values()]
        tensors += [getattr(p, "_local_tensor", p) for m in self._modules.values() for p in m.parameters()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def __repr__(self) -> str:
        return f"OriginalWeights(parts={self.keys()}, {self.nbytes() / 2**20:.1f} MiB)"


def _adapter_modules(module: nn.Module) -> list[nn.Module]:
    """peft's per-module tuner layers (LoRA layers, modules_to_save wrappers) inside ``module``."""
    return [m for m in module.modules() if hasattr(m, "_disable_adapters")
            or isinstance(getattr(m, "disable_adapters", None), bool)]  # peft < 0.6: a plain flag


def _set_adapter_disabled(m: nn.Module, disabled: bool) -> None:
    # Set the flag directly: peft's enable_adapters(True) would also reset requires_grad on every
    # adapter, un-freezing adapters a method froze on purpose.
    if hasattr(m, "_disable_adapters"):
        m._disable_adapters = disabled
    else:
        m.disable_adapters = disabled


def _is_disabled(m: nn.Module) -> bool:
    return bool(getattr(m, "_disable_adapters", getattr(m, "disable_adapters", False)))


@contextlib.contextmanager
def _as_original(model: nn.Module, keys: Sequence[int | str], originals: OriginalWeights | None,
                 whole_model: bool = False) -> Iterator[None]:
    """Inside the block, parts ``keys`` (with ``whole_model``, every adapter) compute as the original."""
    parts = get_parts(model)
    all_adapters = _adapter_modules(parts.model)
    if originals is None and not all_adapters:
        raise UserError("original weights: the model has no LoRA adapters, so the original layers must come "
                        "from an OriginalWeights store (snapshot each layer before training it)")
    modules = [parts.part(k) for k in keys]
    adapters = all_adapters if whole_model else [m for mod in modules for m in _adapter_modules(mod)]
    merged = [m for m in adapters if getattr(m, "merged", False)]
    if merged:
        raise UserError("original weights: LoRA adapters are merged into the weights; unmerge them "
                        "(model.unmerge_adapter()) before computing through the original layers")
    swaps = []  # (owning module, parameter name, current Parameter, stored original)
    layer_swaps = []  # (layer index, current layer, original layer module)
    if originals is not None:
        for k in keys:
            if originals.module(k) is not None:
                layer_swaps.append((k, parts.layers[k], originals.module(k)))
                continue
            if k not in originals:
                continue
            part = parts.part(k)
            for name, stored in originals[k].items():
                owner_name, _, pname = name.rpartition(".")
                owner = part.get_submodule(owner_name) if owner_name else part
                swaps.append((owner, pname, owner._parameters[pname], stored))
    # Under gradient checkpointing, backward re-runs a block's forward, possibly after this context
    # has ended; the changed blocks keep their activations instead, so backward sees what forward saw.
    computing = [m for m in modules if not any(m is current for _, current, _ in layer_swaps)]
    computing += [original for _, _, original in layer_swaps]
    checkpointed = [m for m in computing if getattr(m, "gradient_checkpointing", False)]

    was_disabled = [_is_disabled(m) for m in adapters]
    try:
        for m in adapters:
            _set_adapter_disabled(m, True)
        for owner, pname, _, stored in swaps:
            owner._parameters[pname] = stored  # a plain tensor without grad: forward uses it, nothing trains it
        for k, _, original in layer_swaps:
            parts.layers[k] = original  # the model's forward iterates the list: the original computes
        for m in checkpointed:
            m.gradient_checkpointing = False
        yield
    finally:
        for m in checkpointed:
            m.gradient_checkpointing = True
        for owner, pname, current, _ in reversed(swaps):
            owner._parameters[pname] = current
        for k, current, _ in layer_swaps:
            parts.layers[k] = current
        for m, flag in zip(adapters, was_disabled):
            _set_adapter_disabled(m, flag)


def original_layers_after(model: nn.Module, layer: int,
                          originals: OriginalWeights | None = None) -> contextlib.AbstractContextManager[None]:
    """Inside the block, decoder layers after ``layer``, the final norm and the unembedding compute
    as the original model; the embedding and layers ``0..layer`` stay as they are now.

    LoRA (peft) models: the adapters of those modules are switched off (and restored afterwards,
    also on errors). Fully fine-tuned models: pass the :class:`OriginalWeights` holding the changed
    parts; their stored copies replace the current parameters inside the block. Gradients flow
    through the original layers back to layer ``layer`` and below; the stored copies and the
    current parameters of the replaced parts receive none. ``layer=-1`` makes every decoder layer
    original. Call the model (the wrapper, so DDP still works) inside the block; under DDP use
    ``find_unused_parameters=True``, as the replaced parts take no part in this forward pass.
    Under FSDP2 the LoRA form works as it is; full fine-tuning needs the originals kept as modules
    (:meth:`OriginalWeights.keep_as_modules`): FSDP2 re-registers a layer's parameters at every forward.
    """
    depth = num_layers(model)
    if not -1 <= layer < depth:
        raise ConfigError(f"layer: {layer} is outside the model: it has {depth} layers (0..{depth - 1})")
    keys: list[int | str] = [*range(layer + 1, depth), "final_norm", "lm_head"]
    return _as_original(model, keys, originals)


def original_model(model: nn.Module,
                   originals: OriginalWeights | None = None) -> contextlib.AbstractContextManager[None]:
    """Inside the block the whole model computes as the original (all adapters off, or every
    stored original swapped in): the reference for retain losses, with no second copy held."""
    keys: list[int | str] = ["embed", *range(num_layers(model)), "final_norm", "lm_head"]
    return _as_original(model, keys, originals, whole_model=True)
