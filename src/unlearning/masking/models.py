"""The trained mask scorers: a linear probe and a small sparse autoencoder on one layer's activations.

Both are trained on forget-vs-retain token activations (``unlearn mask train``) and saved as one
safetensors file with their layer and settings in its metadata; :func:`load_scorer` reads either
back as a module with ``layer`` and ``score(h) -> [batch, seq]`` (:mod:`unlearning.masking.masks` turns the
score into a mask with a threshold).

- Probe: logistic regression on standardised activations; score = P(forget).
- SAE: ReLU encoder / unit-norm decoder, trained on forget and retain activations together
  (scaled to unit mean norm) with an L1 penalty; each latent gets the score
  (firing rate on forget tokens - firing rate on retain tokens). The mask's score is the largest
  activation among the ``top_latents`` highest-scoring latents.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from unlearning.core.config import param
from unlearning.core.errors import UserError
from unlearning.core.io import match_umask
from unlearning.core.rundir import safe_name
from unlearning.data.text import TokenizedData
from unlearning.masking.activations import cache_dir, default_layer, iter_activations
from unlearning.model.layers import check_layers

log = logging.getLogger(__name__)


@dataclass
class ScorerTrainConfig:
    """Settings of ``unlearn mask train``."""
    steps: int = param(1000, min=1, help="optimizer steps")
    lr: float | None = param(None, min=0, help="Adam learning rate (default: probe 1e-2, sae 1e-3)")
    max_tokens: int = param(20000, min=100, help="activations per class (forget, retain) to train on")
    weight_decay: float = param(1e-4, min=0, help="probe: L2 penalty on the weights")
    expansion: int = param(8, min=1, help="sae: latents per hidden dimension")
    l1_coef: float = param(0.1, min=0, help="sae: L1 penalty on latent activations (inputs scaled to unit "
                                            "mean norm, decoder rows unit norm)")
    batch_size: int = param(1024, min=16, help="sae: activations per step")
    seed: int = 0


class LinearProbe(nn.Module):
    """P(forget) = sigmoid(w . (h - mean) / std + b) at one layer."""

    def __init__(self, d_model: int, layer: int):
        super().__init__()
        self.layer = layer
        self.weight = nn.Parameter(torch.zeros(d_model))
        self.bias = nn.Parameter(torch.zeros(()))
        self.register_buffer("mean", torch.zeros(d_model))
        self.register_buffer("std", torch.ones(d_model))

    def logits(self, h: Tensor) -> Tensor:
        return ((h.float() - self.mean) / self.std) @ self.weight + self.bias

    def score(self, h: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(h))


class SparseAutoencoder(nn.Module):
    """z = relu((x / scale - b_dec) W_enc + b_enc); x_hat = (z W_dec + b_dec) * scale."""

    def __init__(self, d_model: int, d_latent: int, layer: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layer = layer
        w = torch.randn(d_latent, d_model, generator=g)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w)
        self.W_enc = nn.Parameter(w.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(d_latent))
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("latent_scores", torch.zeros(d_latent))
        self.register_buffer("selected", torch.arange(0))

    def encode(self, h: Tensor) -> Tensor:
        return torch.relu((h.float() / self.scale - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, z: Tensor) -> Tensor:
        return (z @ self.W_dec + self.b_dec) * self.scale

    def select(self, top_latents: int) -> None:
        """Keep the ``top_latents`` highest-scoring latents (only those firing more on forget tokens)."""
        k = min(top_latents, self.latent_scores.numel())
        top = torch.topk(self.latent_scores, k)
        self.selected = top.indices[top.values > 0].to(self.latent_scores.device)

    def score(self, h: Tensor) -> Tensor:
        if self.selected.numel() == 0:
            raise RuntimeError("SparseAutoencoder.score: no latent selected (call select(top_latents); "
                               "no latent fires more on forget than on retain tokens)")
        return self.encode(h)[..., self.selected].max(dim=-1).values


# ----------------------------------------------------------------------------------------------
# Training


def collect_activations(model: nn.Module, data: TokenizedData, layer: int, device: torch.device,
                        max_tokens: int, seed: int = 0, batch_size: int = 16) -> Tensor:
    """Up to ``max_tokens`` non-padding token activations at ``layer``, sampled uniformly, on the CPU."""
    chunks = [h[valid].cpu() for _, h, valid in iter_activations(model, data, layer, device, batch_size)]
    acts = torch.cat(chunks)
    if len(acts) > max_tokens:
        acts = acts[torch.randperm(len(acts), generator=torch.Generator().manual_seed(seed))[:max_tokens]]
    return acts


def train_probe(forget_acts: Tensor, retain_acts: Tensor, layer: int, cfg: ScorerTrainConfig) -> tuple[LinearProbe, dict]:
    """Logistic regression forget (1) vs retain (0), full batch, balanced classes."""
    torch.manual_seed(cfg.seed)
    x = torch.cat([forget_acts, retain_acts]).float()
    y = torch.cat([torch.ones(len(forget_acts)), torch.zeros(len(retain_acts))])
    weight = torch.where(y > 0, len(y) / (2 * len(forget_acts)), len(y) / (2 * len(retain_acts)))
    probe = LinearProbe(x.shape[1], layer)
    probe.mean.copy_(x.mean(0))
    probe.std.copy_(x.std(0).clamp_min(1e-6))
    opt = torch.optim.Adam(probe.parameters(), lr=cfg.lr or 1e-2)
    for _ in tqdm(range(cfg.steps), desc="probe", leave=False):
        loss = nn.functional.binary_cross_entropy_with_logits(probe.logits(x), y, weight=weight)
        loss = loss + cfg.weight_decay * probe.weight.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = probe.logits(x) > 0
        acc = float(((pred == (y > 0)).float() * weight).sum() / weight.sum())
    return probe, {"loss": float(loss.detach()), "balanced_accuracy": acc}


def train_sae(forget_acts: Tensor, retain_acts: Tensor, layer: int, cfg: ScorerTrainConfig) -> tuple[SparseAutoencoder, dict]:
    """Train on both sets together, then score each latent by its forget-minus-retain firing rate."""
    x = torch.cat([forget_acts, retain_acts]).float()
    sae = SparseAutoencoder(x.shape[1], cfg.expansion * x.shape[1], layer, seed=cfg.seed)
    sae.scale.fill_(float(x.norm(dim=1).mean()))
    with torch.no_grad():
        sae.b_dec.copy_((x / sae.scale).mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr or 1e-3)
    g = torch.Generator().manual_seed(cfg.seed)
    for _ in tqdm(range(cfg.steps), desc="sae", leave=False):
        batch = x[torch.randint(len(x), (cfg.batch_size,), generator=g)]
        z = sae.encode(batch)
        recon = (sae.decode(z) - batch).div(sae.scale).pow(2).sum(-1).mean()
        loss = recon + cfg.l1_coef * z.sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():  # unit-norm decoder rows keep the L1 penalty meaningful
            sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))
    with torch.no_grad():
        fires_f = (sae.encode(forget_acts) > 0).float().mean(0)
        fires_r = (sae.encode(retain_acts) > 0).float().mean(0)
        sae.latent_scores.copy_(fires_f - fires_r)
        z = sae.encode(x)
        var = (x - x.mean(0)).pow(2).sum(-1).mean()
        explained = 1 - float((sae.decode(z) - x).pow(2).sum(-1).mean() / var)
        l0 = float((z > 0).float().sum(-1).mean())
    return sae, {"loss": float(loss.detach()), "explained_variance": explained, "l0": l0,
                 "best_latent_score": float(sae.latent_scores.max())}


# ----------------------------------------------------------------------------------------------
# Files


def save_scorer(scorer: nn.Module, path: str | Path, meta: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = "probe" if isinstance(scorer, LinearProbe) else "sae"
    tensors = {k: v.detach().cpu().contiguous() for k, v in scorer.state_dict().items() if k != "selected"}
    info = {"kind": kind, "layer": scorer.layer, **meta}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"unlearning_mask": json.dumps(info, default=str)})
    match_umask(tmp).replace(path)  # safetensors writes 0600 whatever the umask
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get("unlearning_mask")
    if raw is None:
        raise UserError(f"{path}: not a mask probe/SAE file (no unlearning_mask metadata); "
                        f"create one with `unlearn mask train`")
    return json.loads(raw)


def load_scorer(path: str | Path, top_latents: int = 16) -> LinearProbe | SparseAutoencoder:
    meta = read_meta(path)
    tensors = load_file(str(path))
    if meta["kind"] == "probe":
        scorer: Any = LinearProbe(tensors["weight"].numel(), int(meta["layer"]))
    else:
        d_latent, d_model = tensors["W_dec"].shape
        scorer = SparseAutoencoder(d_model, d_latent, int(meta["layer"]))
    scorer.load_state_dict(tensors, strict=False)
    if isinstance(scorer, SparseAutoencoder):
        scorer.select(top_latents)
    return scorer.eval().requires_grad_(False)


def default_artifact_path(model_name: str, kind: str, layer: int) -> Path:
    return cache_dir() / "artifacts" / f"{safe_name(model_name)}-{kind}-L{layer}.safetensors"


def resolve_artifact(cfg: Any, model: nn.Module, model_name: str | None) -> Path:
    """``cfg.artifact``, or the default path for the model, kind and layer; a clear error if missing."""
    if cfg.artifact:
        path = Path(cfg.artifact).expanduser()
    else:
        name = model_name or getattr(getattr(model, "config", None), "name_or_path", "model")
        layer = cfg.layer if cfg.layer is not None else default_layer(model)
        path = default_artifact_path(name, cfg.kind, layer)
    if not path.exists():
        raise UserError(f"mask.artifact: {path} does not exist; train it with `unlearn mask train --kind "
                        f"{cfg.kind} --model {model_name or 'MODEL'}"
                        f"{f' --layer {cfg.layer}' if cfg.layer is not None else ''}`, or set mask.artifact")
    meta = read_meta(path)
    if meta.get("kind") != cfg.kind:
        raise UserError(f"mask.artifact: {path} holds a {meta.get('kind')}, but mask.kind is {cfg.kind}")
    return path


def train_scorer(kind: str, model: nn.Module, forget: TokenizedData, retain: TokenizedData, layer: int,
                 device: torch.device, cfg: ScorerTrainConfig) -> tuple[nn.Module, dict[str, Any]]:
    """Collect activations at ``layer`` and train a probe or SAE on them."""
    check_layers(model, [layer], "layer")
    acts_f = collect_activations(model, forget, layer, device, cfg.max_tokens, cfg.seed)
    acts_r = collect_activations(model, retain, layer, device, cfg.max_tokens, cfg.seed + 1)
    log.info("mask train: %d forget and %d retain activations at layer %d", len(acts_f), len(acts_r), layer)
    trainer = train_probe if kind == "probe" else train_sae
    scorer, stats = trainer(acts_f, acts_r, layer, cfg)
    return scorer, {**stats, "forget_tokens": len(acts_f), "retain_tokens": len(acts_r), "settings": asdict(cfg)}
