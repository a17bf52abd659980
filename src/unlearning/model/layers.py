"""Family-agnostic access to a causal LM's decoder layers, and every hook the methods need.

Everything that reaches inside a model lives here (and in :mod:`unlearning.model.originals`):

- :func:`get_parts` finds the embedding, decoder layers, final norm, unembedding and rotary
  embedding of GPT-NeoX, Llama/Mistral/Qwen2 and GPT-2 models, through peft / DDP / FSDP /
  ``torch.compile`` wrappers.
- :func:`capture_hidden` / :func:`forward_until` record decoder-block outputs with forward hooks,
  optionally stopping the forward pass right after the deepest layer that is needed.
- :func:`parse_layer_spec` / :func:`check_layers` turn ``"31->11:4"`` into layer indices.

All of these run the model's own ``forward``: nothing here re-implements attention masks or
position handling, so every family behaves exactly as Hugging Face computes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from unlearning.core.errors import ConfigError, UserError

log = logging.getLogger(__name__)
_CLIPPED_NOTED: set[tuple[str, tuple, int]] = set()


# ----------------------------------------------------------------------------------------------
# Model parts


@dataclasses.dataclass(frozen=True)
class Family:
    """Where one architecture keeps its parts, as dotted paths from the ``*ForCausalLM`` model."""

    name: str
    model_types: tuple[str, ...]
    embed: str
    layers: str
    final_norm: str
    lm_head: tuple[str, ...]  # candidates: GPT-NeoX named it embed_out before transformers 5
    rotary: str | None


FAMILIES: tuple[Family, ...] = (
    Family("gpt_neox", ("gpt_neox",), "gpt_neox.embed_in", "gpt_neox.layers",
           "gpt_neox.final_layer_norm", ("embed_out", "lm_head"), "gpt_neox.rotary_emb"),
    Family("llama", ("llama", "mistral", "qwen2"), "model.embed_tokens", "model.layers",
           "model.norm", ("lm_head",), "model.rotary_emb"),
    Family("gpt2", ("gpt2",), "transformer.wte", "transformer.h", "transformer.ln_f",
           ("lm_head",), None),
)


@dataclasses.dataclass
class ModelParts:
    """The pieces of a decoder-only LM, as the live modules of the (unwrapped) model."""

    embed: nn.Module
    layers: nn.ModuleList
    final_norm: nn.Module
    lm_head: nn.Module
    rotary: nn.Module | None
    family: str
    model: nn.Module  # the unwrapped Hugging Face model the parts belong to

    def part(self, key: int | str) -> nn.Module:
        """Layer ``key`` (an int) or a named part (``"final_norm"``, ``"lm_head"``, ``"embed"``)."""
        if isinstance(key, int):
            return self.layers[key]
        if key in ("embed", "final_norm", "lm_head"):
            return getattr(self, key)
        raise KeyError(f"unknown model part {key!r}: use a layer index, 'embed', 'final_norm' or 'lm_head'")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip peft, DDP / DataParallel, FSDP (v1) and ``torch.compile`` wrappers.

    FSDP2 (``fully_shard``) changes modules in place, so there is nothing to strip for it.
    peft changes the Linear modules in place too: the returned model holds the LoRA layers.
    """
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    for _ in range(10):  # wrappers nest a few deep at most
        if isinstance(model, PeftModel):
            model = model.get_base_model()
        elif isinstance(model, BaseTuner):  # LoraModel
            model = model.model
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):  # DDP, DataParallel, FSDP
            model = model.module
        else:
            return model
    return model


def _get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def _parts_for(model: nn.Module, fam: Family) -> ModelParts | None:
    layers = _get_path(model, fam.layers)
    final_norm = _get_path(model, fam.final_norm)
    embed = _get_path(model, fam.embed)
    lm_head = next((m for p in fam.lm_head if (m := _get_path(model, p)) is not None), None)
    if not isinstance(layers, nn.ModuleList) or final_norm is None or embed is None or lm_head is None:
        return None
    rotary = _get_path(model, fam.rotary) if fam.rotary else None
    return ModelParts(embed, layers, final_norm, lm_head, rotary, fam.name, model)


def get_parts(model: nn.Module) -> ModelParts:
    """The parts of ``model`` (peft / DDP / FSDP wrappers allowed).

    The family is chosen by ``config.model_type``; an architecture not in :data:`FAMILIES` is
    accepted when its modules sit where one of the families keeps them (for example other
    Llama-layout models), and refused otherwise with a :class:`UserError`.
    """
    inner = unwrap_model(model)
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            parts = _parts_for(inner, fam)
            if parts is None:
                raise UserError(f"model: a {model_type} model without the expected modules "
                                f"({fam.layers}, {fam.final_norm}); is it a *ForCausalLM model?")
            return parts
    for fam in FAMILIES:
        parts = _parts_for(inner, fam)
        if parts is not None:
            log.debug("model_type %r is not in the family table; using the %s layout", model_type, fam.name)
            return parts
    known = ", ".join(t for fam in FAMILIES for t in fam.model_types)
    raise UserError(f"model: unsupported architecture {type(inner).__name__} (model_type {model_type!r}); "
                    f"supported: {known} causal LMs. Add its layout to unlearning.model.layers.FAMILIES.")


def num_layers(model: nn.Module) -> int:
    return len(get_parts(model).layers)


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 (``fully_shard``) shards the model: its decoder model is then an ``FSDPModule``
    whose parameters are DTensor shards outside a forward pass (``training/fsdp.py`` shards it so)."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(unwrap_model(model), FSDPModule)


def reshard(model: nn.Module) -> None:
    """Free the all-gathered parameters of every FSDP2 unit of ``model``. The root keeps its
    parameters gathered after a forward (FSDP2 expects the backward next), so after an evaluation
    its modules would hold the full tensors: an optimizer built then would train those, not the
    shards (the tamper attack trains the embedding and the unembedding after its step-0 evaluation)."""
    from torch.distributed.fsdp import FSDPModule
    for module in unwrap_model(model).modules():
        if isinstance(module, FSDPModule):
            module.reshard()


# ----------------------------------------------------------------------------------------------
# Layer specs


def _depth(model_or_depth: nn.Module | int) -> int:
    return model_or_depth if isinstance(model_or_depth, int) else num_layers(model_or_depth)


def check_layers(model_or_depth: nn.Module | int, indices: Sequence[int], field: str = "layers") -> list[int]:
    """Raise a :class:`ConfigError` naming ``field`` and the model's depth for an index outside it."""
    depth = _depth(model_or_depth)
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ConfigError(f"{field}: layer {i!r} is not an integer index")
        if not 0 <= i < depth:
            raise ConfigError(f"{field}: layer {i} is outside the model: it has {depth} layers (0..{depth - 1})")
    return list(indices)


_RANGE = re.compile(r"^\s*(\d+)\s*(?:->|→|-)\s*(\d+)\s*(?::\s*(\d+))?\s*$")


def parse_layer_spec(spec: str | int | Sequence[int], depth: int, *, field: str = "layers",
                     clip_to_depth: bool = False) -> list[int]:
    """Layer indices from a spec, in the order given.

    - ``"31->11:4"`` -> ``[31, 27, 23, 19, 15, 11]`` (start, stop, step; the stop is included
      when the steps land on it; either direction; ``→`` also accepted; step defaults to 1);
    - ``"all"`` -> ``[0, ..., depth - 1]``;
    - a list, a single int, or a comma-separated string ``"5,10,15"``.

    With ``clip_to_depth`` (for defaults written for deep models, like ``[5, 10, ..., 30]``),
    indices beyond the model are dropped instead of raising; if none remain, the last layer is used.
    """
    if isinstance(spec, str):
        text = spec.strip()
        if text.lower() == "all":
            return list(range(depth))
        m = _RANGE.match(text)
        if m:
            start, stop, step = int(m[1]), int(m[2]), int(m[3] or 1)
            if step == 0:
                raise ConfigError(f"{field}: {spec!r} has step 0; write start->stop:step with step >= 1")
            sign = -1 if stop < start else 1
            indices = list(range(start, stop + sign, sign * step))
        else:
            try:
                indices = [int(x) for x in text.strip("[]").replace(",", " ").split()]
            except ValueError:
                raise ConfigError(f"{field}: cannot read {spec!r}; write 'all', a list like [5, 10], "
                                  f"or a range like '31->11:4' (start->stop:step)") from None
    elif isinstance(spec, int) and not isinstance(spec, bool):
        indices = [spec]
    elif isinstance(spec, (list, tuple)):
        indices = list(spec)
    else:
        raise ConfigError(f"{field}: expected 'all', a list of layers or 'start->stop:step', got {spec!r}")
    if not indices:
        raise ConfigError(f"{field}: the layer list is empty")
    if len(set(indices)) != len(indices):
        raise ConfigError(f"{field}: layer {next(i for i in indices if indices.count(i) > 1)} is listed twice")
    if clip_to_depth:
        kept = [i for i in indices if isinstance(i, int) and 0 <= i < depth]
        if len(kept) < len(indices):
            kept = kept or [depth - 1]
            if (field, tuple(indices), depth) not in _CLIPPED_NOTED:  # once per process, not per check
                _CLIPPED_NOTED.add((field, tuple(indices), depth))
                log.info("%s: %s clipped to %s for a model with %d layers", field, indices, kept, depth)
        indices = kept
    return check_layers(depth, indices, field)


# ----------------------------------------------------------------------------------------------
# Hidden-state capture and early stop


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once the needed layers have run."""


def _block_output(output: Any) -> torch.Tensor:
    # transformers >= 4.54 blocks return the hidden states; older ones a tuple led by them
    return output if torch.is_tensor(output) else output[0]


@contextlib.contextmanager
def capture_hidden(model: nn.Module, layers: Sequence[int], *,
                   stop_after: bool = False) -> Iterator[dict[int, torch.Tensor]]:
    """Record the outputs of decoder blocks ``layers`` during forward passes inside the block.

    Yields a dict ``{layer: tensor [batch, seq, hidden]}`` filled by the forward pass (a later
    pass overwrites it). Block ``i``'s output equals Hugging Face's ``hidden_states[i + 1]`` for
    every block but the last, whose ``hidden_states`` entry has the final norm applied.
    Gradients flow through the recorded tensors.

    With ``stop_after=True`` the forward pass ends right after the deepest requested block (the
    rest of the model never runs) and the context swallows that stop, so code after the model
    call inside the ``with`` block does not run; :func:`forward_until` wraps this.
    """
    parts = get_parts(model)
    wanted = sorted(set(check_layers(len(parts.layers), list(layers), "layers")))
    last = wanted[-1]
    captured: dict[int, torch.Tensor] = {}

    def make_hook(idx: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            captured[idx] = _block_output(output)
            if stop_after and idx == last:
                raise _StopForward
        return hook

    handles = [parts.layers[i].register_forward_hook(make_hook(i)) for i in wanted]
    try:
        yield captured
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()


def forward_until(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  layers: Sequence[int] = ()) -> dict[int, torch.Tensor]:
    """Run ``model`` only as far as the deepest of ``layers``; return their block outputs.

    Under DDP the recorded tensors stand in for the model's output (DDP's post-forward step runs
    on them), so their gradients are all-reduced like those of a full forward; wrap the model with
    ``find_unused_parameters=True``, since the layers after the stop receive no gradient.
    """
    if not layers:
        raise ValueError("forward_until: give at least one layer")
    with capture_hidden(model, layers, stop_after=True) as captured:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    missing = set(layers) - set(captured)
    if missing:  # a model that skips blocks (never for the supported families)
        raise RuntimeError(f"forward_until: layers {sorted(missing)} did not run")
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        # the stop skipped DDP's post-forward, which arms the gradient all-reduce for backward
        captured = model._post_forward(dict(captured))
    elif is_sharded(model):
        # The stop skipped the FSDP2 root's post-forward too: without it the root stays "in forward"
        # (its next pre-forward skips the stream waits) and registers no pre-backward hook. The
        # blocks that ran already finished their own post-forward (FSDP's hook runs before ours).
        root = get_parts(model).model
        captured = root._get_fsdp_state()._post_forward(root, (), dict(captured))
    return captured


@contextlib.contextmanager
def start_at(model: nn.Module, layer: int, hidden: torch.Tensor) -> Iterator[None]:
    """Inside the block a forward pass starts at decoder layer ``layer``, fed ``hidden``.

    ``hidden`` ``(B, T, C)`` is the output of block ``layer - 1``, computed earlier (for example
    once, without autograd, and shared by two passes that differ only from ``layer`` on). Blocks
    ``0..layer-1`` pass their input through untouched; the model's own ``forward`` still builds
    the attention mask and position embeddings, and runs the embedding lookup, whose output the
    first computed block ignores. Blocks return their hidden states as a tensor (transformers
    >= 4.54, which the project requires).
    """
    parts = get_parts(model)
    depth = len(parts.layers)
    if not 0 < layer < depth:
        raise ValueError(f"start_at: layer {layer} must be in 1..{depth - 1}")

    def passthrough(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states

    def feed(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    skipped = list(parts.layers[:layer])
    for block in skipped:
        block.forward = passthrough  # an instance attribute: nn.Module.__call__ (and its hooks) still run
    handle = parts.layers[layer].register_forward_pre_hook(feed, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for block in skipped:
            block.__dict__.pop("forward", None)
