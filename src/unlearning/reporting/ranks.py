"""Effective and stable rank of weight updates, per linear module.

For an update ``D = W_model - W_base`` with singular values ``s``:

- effective rank (Roy & Vetterli 2007): ``exp(H(p))`` with ``p_i = s_i / sum(s)``; 1 for a rank-1
  update, ``n`` for an update with ``n`` equal singular values;
- stable rank: ``||D||_F^2 / ||D||_2^2 = sum(s^2) / max(s)^2``, between 1 and the rank.

For a LoRA adapter the update is ``(B @ A) * scaling``, taken from the adapter alone (no merge,
no rounding of merged weights): its singular values are those of the small ``r x r`` matrix
``R_B @ R_A^T`` from QR factors of ``B`` and ``A^T``.

Modules whose update is exactly zero are listed with ``fro_norm = 0`` and no ranks, and are left
out of ``mean_erank`` / ``mean_srank`` (full fine-tuning of a few layers leaves most modules as
they were).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from unlearning.core.errors import UserError
from unlearning.core.io import atomic_write_text
from unlearning.model.layers import get_parts, unwrap_model

log = logging.getLogger(__name__)

FLOAT64_MAX_DIM = 512  # matrices this small are decomposed in float64 (cheap, and exact to ~1e-15)


@dataclasses.dataclass
class ModuleRank:
    module: str
    shape: tuple[int, ...]
    erank: float | None  # None when the update is zero
    srank: float | None
    fro_norm: float

    @property
    def changed(self) -> bool:
        return self.fro_norm > 0


# ----------------------------------------------------------------------------------------------
# Ranks of one matrix


def effective_rank(s: torch.Tensor) -> float:
    """``exp`` of the entropy of the singular values normalised to sum to one."""
    s = s.double().clamp_min(0)
    total = s.sum()
    if total <= 0:
        raise ValueError("effective_rank of a zero matrix is undefined")
    p = s / total
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def stable_rank(s: torch.Tensor) -> float:
    """``||D||_F^2 / ||D||_2^2`` from the singular values."""
    s = s.double()
    top = s.max()
    if top <= 0:
        raise ValueError("stable_rank of a zero matrix is undefined")
    return float((s * s).sum() / (top * top))


def _compute_dtype(matrix: torch.Tensor) -> torch.dtype:
    return torch.float64 if max(matrix.shape) <= FLOAT64_MAX_DIM else torch.float32


def singular_values(matrix: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Singular values (descending, float64 on the CPU) of a 2-D matrix, computed in float32
    (float64 for small matrices) on ``device``: the GPU when present, unless told otherwise."""
    if matrix.dim() != 2:
        raise ValueError(f"singular_values needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    dev = torch.device(device) if device is not None else default_device()
    m = matrix.to(dev, _compute_dtype(matrix))
    return torch.linalg.svdvals(m).double().cpu()


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def matrix_rank_row(name: str, delta: torch.Tensor, s: torch.Tensor | None = None,
                    shape: tuple[int, ...] | None = None, device: Any = None) -> ModuleRank:
    """A :class:`ModuleRank` for update ``delta`` (or for given singular values ``s``)."""
    shape = tuple(shape or delta.shape)
    if s is None:
        if not torch.any(delta):
            return ModuleRank(name, shape, None, None, 0.0)
        s = singular_values(delta, device)
    fro = float(s.double().pow(2).sum().sqrt())
    if fro == 0:
        return ModuleRank(name, shape, None, None, 0.0)
    return ModuleRank(name, shape, effective_rank(s), stable_rank(s), fro)


# ----------------------------------------------------------------------------------------------
# Full weights: two models


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{module name: weight}`` of every linear module (``nn.Linear`` and GPT-2's ``Conv1D``)."""
    from transformers.pytorch_utils import Conv1D  # seconds to import: only weight ranks need it
    return {name: mod.weight for name, mod in model.named_modules()
            if isinstance(mod, (nn.Linear, Conv1D)) and getattr(mod, "weight", None) is not None}


def weight_update_ranks(base: nn.Module, model: nn.Module, *, device: Any = None,
                        progress: bool = True) -> list[ModuleRank]:
    """Ranks of ``model - base`` for every linear module of ``model`` (same architecture)."""
    base_w = linear_weights(unwrap_model(base))
    new_w = linear_weights(unwrap_model(model))
    missing = sorted(set(new_w) - set(base_w))
    if missing:
        raise UserError(f"ranks: the base model has no module {missing[0]}; --base and --model must share "
                        f"an architecture")
    dev = torch.device(device) if device is not None else default_device()
    rows = []
    for name, w in tqdm(new_w.items(), desc="update ranks", disable=not progress):
        b = base_w[name]
        if b.shape != w.shape:
            raise UserError(f"ranks: {name} has shape {tuple(w.shape)} in --model but {tuple(b.shape)} in --base")
        with torch.no_grad():
            delta = w.detach().to(dev, _compute_dtype(w)) - b.detach().to(dev, _compute_dtype(w))
        rows.append(matrix_rank_row(name, delta, device=dev))
    return rows


def stored_update_ranks(model: nn.Module, originals: Any, *, device: Any = None,
                        progress: bool = True) -> list[ModuleRank]:
    """Ranks of the full-fine-tuning update of every part in an :class:`~unlearning.model.originals.OriginalWeights`
    store (current weights minus the stored originals), with no second model loaded."""
    from transformers.pytorch_utils import Conv1D  # seconds to import: only weight ranks need it
    parts = get_parts(model)
    names = {id(m): n for n, m in parts.model.named_modules()}
    dev = torch.device(device) if device is not None else default_device()
    rows = []
    for key in tqdm(originals.keys(), desc="update ranks", disable=not progress):
        part, stored = parts.part(key), originals[key]
        for sub, mod in part.named_modules():
            if not isinstance(mod, (nn.Linear, Conv1D)):
                continue
            w, w0 = mod.weight.detach(), stored[f"{sub}.weight" if sub else "weight"]
            with torch.no_grad():
                delta = w.to(dev, _compute_dtype(w)) - w0.to(dev, _compute_dtype(w))
            rows.append(matrix_rank_row(names[id(mod)], delta, device=dev))
    return rows


# ----------------------------------------------------------------------------------------------
# LoRA adapters: (B @ A) * scaling without merging


def _lora_pairs(state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, bool]]:
    """``(module, A, B, is_embedding)`` from an adapter state dict (adapter names stripped by peft)."""
    pattern = re.compile(r"^(?:base_model\.model\.)?(.+)\.(lora_A|lora_embedding_A)(?:\.[^.]+)?(?:\.weight)?$")
    for key, a in state.items():
        m = pattern.match(key)
        if not m:
            continue
        b_key = key.replace(m[2], m[2][:-1] + "B")
        if b_key not in state:
            raise UserError(f"ranks: adapter has {key} but no {b_key}")
        yield m[1], a, state[b_key], m[2] == "lora_embedding_A"


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    # peft's rule (peft.utils.other.get_pattern_key): a key matches a module name ending in it
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scaling(config: dict[str, Any], module: str) -> float:
    r = _pattern_value(config.get("rank_pattern"), module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def lora_delta_singular_values(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Singular values of ``(b @ a) * scaling`` (``b``: out x r, ``a``: r x in) via two thin QRs.

    Only ``r x r`` matrices are decomposed, so this runs in float64 on the CPU at any model size.
    """
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    _, rb = torch.linalg.qr(b)  # b = Qb Rb
    _, ra = torch.linalg.qr(a.T)  # a^T = Qa Ra  ->  b a = Qb (Rb Ra^T) Qa^T
    return torch.linalg.svdvals(rb @ ra.T) * abs(scaling)


def read_adapter(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"ranks: {folder} is a {config.get('peft_type')} adapter; only LoRA adapters are supported")
    if config.get("use_dora"):
        raise UserError(f"ranks: {folder} is a DoRA adapter, whose update is not B @ A; merge it and compare "
                        f"full weights (--model the merged folder)")
    if (folder / "adapter_model.safetensors").exists():
        state = load_file(str(folder / "adapter_model.safetensors"))
    elif (folder / "adapter_model.bin").exists():
        state = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise UserError(f"ranks: {folder} has adapter_config.json but no adapter_model.safetensors / .bin")
    return config, state


def lora_update_ranks(adapter: str | Path | nn.Module, *, progress: bool = True) -> list[ModuleRank]:
    """Ranks of every LoRA update in an adapter folder, or in a peft model in memory."""
    if isinstance(adapter, nn.Module):
        config, state = _adapter_in_memory(adapter)
    else:
        config, state = read_adapter(adapter)
    rows = []
    for module, a, b, is_embedding in tqdm(list(_lora_pairs(state)), desc="LoRA ranks", disable=not progress):
        if is_embedding:  # lora_embedding_A: r x num_embeddings, B: dim x r; the update is (B A)^T
            shape = (a.shape[1], b.shape[0])
        else:
            shape = (b.shape[0], a.shape[1])
        s = lora_delta_singular_values(a, b, lora_scaling(config, module))
        rows.append(matrix_rank_row(module, torch.empty(0), s=s, shape=shape))
    if not rows:
        raise UserError("ranks: the adapter holds no LoRA weights")
    return rows


def _adapter_in_memory(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from peft import PeftModel, get_peft_model_state_dict
    if not isinstance(model, PeftModel):
        raise UserError("ranks: expected a peft model with LoRA adapters")
    config = model.peft_config[model.active_adapter].to_dict()
    return config, get_peft_model_state_dict(model)


# ----------------------------------------------------------------------------------------------
# Summary and files


def summarize(rows: Iterable[ModuleRank]) -> dict[str, Any]:
    rows = list(rows)
    changed = [r for r in rows if r.changed]
    mean = (lambda xs: sum(xs) / len(xs)) if changed else (lambda xs: None)
    return {
        "mean_erank": mean([r.erank for r in changed]),
        "mean_srank": mean([r.srank for r in changed]),
        "n_modules": len(rows),
        "n_changed": len(changed),
    }


def write_csv(rows: Iterable[ModuleRank], path: str | Path) -> Path:
    """``module, shape, erank, srank, fro_norm``; unchanged modules have empty ranks."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["module", "shape", "erank", "srank", "fro_norm"])
    for r in rows:
        fmt = lambda x: "" if x is None else f"{x:.6g}"  # noqa: E731
        w.writerow([r.module, "x".join(map(str, r.shape)), fmt(r.erank), fmt(r.srank), f"{r.fro_norm:.6g}"])
    return atomic_write_text(path, buf.getvalue())


def read_csv(path: str | Path) -> list[ModuleRank]:
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            num = lambda x: float(x) if x else None  # noqa: E731
            out.append(ModuleRank(row["module"], tuple(int(x) for x in row["shape"].split("x")),
                                  num(row["erank"]), num(row["srank"]), float(row["fro_norm"])))
    return out
