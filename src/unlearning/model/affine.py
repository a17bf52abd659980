"""Per-layer affine maps from a teacher's hidden states to a model's, fitted by ridge regression.

Checkpoint transfer compares the trained model's block outputs with a teacher's (an early
pretraining checkpoint). Two checkpoints of one training run need not share a basis, so the
teacher's states can first be mapped into the model's space: ``y = x W^T + b`` per target layer,
fitted on the token activations of both models on the same text (closed-form ridge regression,
accumulated in float64 so any number of tokens fits in memory).

``unlearn fit-affine`` writes the maps to a safetensors file (``layers.<i>.weight`` ``[d_model,
d_teacher]``, ``layers.<i>.bias`` ``[d_model]``, and the fit's settings and errors as metadata);
``checkpoint_transfer.affine: <file>`` reuses it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from unlearning.core.errors import UserError
from unlearning.core.io import match_umask
from unlearning.model.layers import forward_until

log = logging.getLogger(__name__)


class AffineMap(nn.Module):
    """``x -> x @ weight.T + bias``, computed in float32 and returned in the input's dtype."""

    def __init__(self, weight: Tensor, bias: Tensor):
        super().__init__()
        self.register_buffer("weight", weight.float())
        self.register_buffer("bias", bias.float())

    def forward(self, x: Tensor) -> Tensor:
        return (x.float() @ self.weight.T + self.bias).to(x.dtype)


class RidgeAccumulator:
    """Running sums for the ridge regression of ``y`` on ``x`` (float64, centred at solve time)."""

    def __init__(self, d_in: int, d_out: int, device: torch.device | str = "cpu"):
        kw = dict(dtype=torch.float64, device=device)
        self.n = 0
        self.sx, self.sy = torch.zeros(d_in, **kw), torch.zeros(d_out, **kw)
        self.sxx, self.sxy = torch.zeros(d_in, d_in, **kw), torch.zeros(d_in, d_out, **kw)

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add rows ``x [n, d_in]`` and ``y [n, d_out]``."""
        x, y = x.to(self.sxx.device, torch.float64), y.to(self.sxx.device, torch.float64)
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.sxx += x.T @ x
        self.sxy += x.T @ y

    def solve(self, ridge: float) -> AffineMap:
        """Minimise ``||Y - X W - b||^2 + lam ||W||^2`` with ``lam = ridge * trace(Cov x) / d_in * n``.

        The penalty is relative to the mean variance of ``x``, so one ``ridge`` suits any scale.
        """
        if self.n < 2:
            raise UserError("fit-affine: fewer than two tokens were collected; give more examples")
        mx, my = self.sx / self.n, self.sy / self.n
        cxx = self.sxx - self.n * torch.outer(mx, mx)
        cxy = self.sxy - self.n * torch.outer(mx, my)
        lam = ridge * torch.trace(cxx) / cxx.shape[0]
        eye = torch.eye(cxx.shape[0], dtype=cxx.dtype, device=cxx.device)
        w = torch.linalg.solve(cxx + lam * eye, cxy)  # [d_in, d_out]
        b = my - mx @ w
        return AffineMap(w.T.float(), b.float())


def fit_ridge(x: Tensor, y: Tensor, ridge: float = 1e-6) -> AffineMap:
    """Fit ``y ~ x W^T + b`` on rows ``x [n, d_in]``, ``y [n, d_out]`` in one go."""
    acc = RidgeAccumulator(x.shape[1], y.shape[1], device=x.device)
    acc.update(x, y)
    return acc.solve(ridge)


def _token_rows(hidden: Tensor, mask: Tensor) -> Tensor:
    return hidden[mask.bool()].float()


@torch.no_grad()
def fit_affine_maps(model: nn.Module, teacher: nn.Module, batches: Iterable[dict[str, Tensor]],
                    layers: Sequence[int], *, ridge: float = 1e-3, holdout_every: int = 10,
                    device: torch.device | str = "cpu") -> tuple[dict[int, AffineMap], dict[str, Any]]:
    """Fit a map per layer on the tokens of ``batches``; every ``holdout_every``-th batch is held out.

    Returns the maps and stats per layer: held-out MSE (mean over the hidden dim and tokens) of
    the teacher's states as they are (``mse_identity``, when the sizes match) and mapped
    (``mse_affine``), the model states' variance (``var_model``, the MSE of predicting the mean),
    and ``r2`` = 1 - mse_affine / var_model.
    """
    layers = sorted(layers)
    batches = list(batches)
    fit = [b for i, b in enumerate(batches) if holdout_every <= 1 or (i + 1) % holdout_every]
    held = [b for i, b in enumerate(batches) if holdout_every > 1 and not (i + 1) % holdout_every] or fit[-1:]

    def states(batch: dict[str, Tensor]) -> tuple[dict[int, Tensor], dict[int, Tensor], Tensor]:
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        h_model = forward_until(model, ids, mask, layers)
        h_teacher = forward_until(teacher, ids, mask, layers)
        return h_model, h_teacher, mask

    accs: dict[int, RidgeAccumulator] = {}
    for batch in tqdm(fit, desc="fit-affine", dynamic_ncols=True):
        h_model, h_teacher, mask = states(batch)
        for i in layers:
            x, y = _token_rows(h_teacher[i], mask), _token_rows(h_model[i], mask)
            if i not in accs:
                accs[i] = RidgeAccumulator(x.shape[1], y.shape[1], device=device)
            accs[i].update(x, y)
    maps = {i: acc.solve(ridge).to(device) for i, acc in accs.items()}

    sums = {i: {"identity": 0.0, "affine": 0.0, "y": torch.zeros((), dtype=torch.float64),
                "yy": 0.0, "n": 0} for i in layers}
    for batch in held:
        h_model, h_teacher, mask = states(batch)
        for i in layers:
            x, y = _token_rows(h_teacher[i], mask), _token_rows(h_model[i], mask)
            s = sums[i]
            if x.shape == y.shape:
                s["identity"] += float((x - y).pow(2).mean(-1).sum())
            s["affine"] += float((maps[i](x) - y).pow(2).mean(-1).sum())
            s["y"] = s["y"] + y.double().sum(0).cpu()
            s["yy"] += float(y.double().pow(2).sum())
            s["n"] += y.shape[0]
    stats: dict[str, Any] = {}
    for i, s in sums.items():
        n, d = max(1, s["n"]), accs[i].sy.shape[0]
        var = (s["yy"] - float(s["y"].pow(2).sum()) / n) / (n * d)
        entry = {"mse_affine": s["affine"] / n, "var_model": var, "r2": 1 - s["affine"] / n / max(var, 1e-12),
                 "tokens_fit": accs[i].n, "tokens_heldout": s["n"]}
        if accs[i].sx.shape == accs[i].sy.shape:
            entry["mse_identity"] = s["identity"] / n
        stats[str(i)] = entry
    return maps, stats


def save_affine(path: str | Path, maps: dict[int, AffineMap], metadata: dict[str, Any] | None = None) -> Path:
    """Write the maps (and ``metadata``, as JSON under the key ``unlearning``) to a safetensors file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, m in maps.items():
        tensors[f"layers.{i}.weight"] = m.weight.detach().cpu().contiguous()
        tensors[f"layers.{i}.bias"] = m.bias.detach().cpu().contiguous()
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"unlearning": json.dumps(metadata or {}, default=str)})
    match_umask(tmp)  # safetensors writes 0600 whatever the umask
    tmp.replace(path)
    return path


def read_affine_metadata(path: str | Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("unlearning", "{}"))


def load_affine(path: str | Path, layers: Sequence[int] | None = None,
                device: torch.device | str = "cpu") -> dict[int, AffineMap]:
    """The maps in ``path``; with ``layers``, every one of them must be there."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint_transfer.affine: {path} not found; fit it with `unlearn fit-affine "
                        f"--out {path} ...` or set affine: null")
    tensors = load_file(str(path))
    maps = {}
    for key in tensors:
        if key.endswith(".weight"):
            i = int(key.split(".")[1])
            maps[i] = AffineMap(tensors[key], tensors[f"layers.{i}.bias"]).to(device)
    if layers is not None:
        missing = sorted(set(layers) - set(maps))
        if missing:
            raise UserError(f"checkpoint_transfer.affine: {path} has maps for layers {sorted(maps)} but not for "
                            f"target layers {missing}; fit it again with --layers covering them")
    return maps
