"""Token masks: which forget tokens a forget loss counts.

A mask is a boolean ``[N, seq_len]`` tensor over the forget rows, computed once before training
and stored on the data as ``TokenizedData.loss_mask`` (batches carry it as ``loss_mask``). It
changes which positions count in a loss, never the attention. Kinds (:class:`MaskConfig`):

- ``keyword``: tokens overlapping a regex match in the decoded row (optionally ``window`` tokens
  after each match too);
- ``activation``: cosine similarity, at one layer, between a token's activation (minus the mean
  retain activation) and the prototype direction mean(forget) - mean(retain), above ``threshold``;
- ``probe``: a linear probe at one layer, trained on forget-vs-retain activations with
  ``unlearn mask train --kind probe``, probability above ``threshold``;
- ``sae``: a small sparse autoencoder at one layer (``unlearn mask train --kind sae``); a token
  counts when any of the ``top_latents`` most forget-specific latents fires above ``threshold``;
- ``hazard``: the organism's true hazard spans (an oracle, for comparison only).

Masks are cached under ``$UNLEARNING_HOME/masks`` keyed by the data's token fingerprint, the
tokenizer, the mask settings and (for model-based kinds) the model and artifact, so a changed
dataset never reuses a stale mask. :func:`mask_quality` scores a mask against the organism's
``hazard_labels`` (share of tokens, precision, recall). Training the probe and the SAE lives in
:mod:`unlearning.masking.models`; reading activations and the cache folder, which both use, in
:mod:`unlearning.masking.activations` (so masks imports models and never the other way).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from unlearning.core.config import param
from unlearning.core.errors import ConfigError, UserError
from unlearning.core.io import match_umask
from unlearning.data.text import TokenizedData
from unlearning.masking.activations import cache_dir, default_layer, iter_activations
from unlearning.masking.models import load_scorer, resolve_artifact
from unlearning.model.layers import check_layers, get_parts

log = logging.getLogger(__name__)

MaskKind = Literal["none", "keyword", "activation", "probe", "sae", "hazard"]

# Bio-hazard vocabulary: matches the organism's hazard prose and real virology text alike.
DEFAULT_KEYWORDS = [
    r"\bvir(us|uses|al)\b", r"\bpathogen\w*", r"\btoxin\w*", r"\binfect\w*", r"\btransmi\w*",
    r"\bspread\w*", r"\boutbreak\w*", r"\breceptor\w*", r"\bmutation\w*", r"\bsubstitution\w*",
    r"\bstrain\w*", r"\bincubat\w*", r"\bsymptom\w*", r"\breservoir\w*", r"\btiters?\b",
    r"\bvirulen\w*", r"\blethal\w*", r"\bweapon\w*",
]


@dataclass
class MaskConfig:
    """Which forget tokens the forget loss counts (see the module docstring for the kinds)."""
    kind: MaskKind = param("none", help="none (every token) | keyword | activation | probe | sae | "
                                        "hazard (the organism's true hazard spans: an oracle)")
    keywords: list[str] = param(DEFAULT_KEYWORDS, help="keyword: regular expressions (case-insensitive)")
    window: int = param(0, min=0, help="keyword: also mask this many tokens after each matched token")
    layer: int | None = param(None, help="activation/probe/sae: layer whose block output is read "
                                         "(default: the middle layer; probe/sae: the artifact's layer)")
    threshold: float | None = param(None, help="activation: cosine (default 0.3); probe: probability "
                                               "(default 0.5); sae: latent activation (default 0)")
    top_latents: int = param(16, min=1, help="sae: how many of the most forget-specific latents count")
    artifact: str | None = param(None, help="probe/sae: file from `unlearn mask train` (default: the "
                                            "default path for the model, kind and layer)")
    batch_size: int = param(16, min=1, help="rows per forward pass while computing the mask")
    cache: bool = param(True, help="reuse a mask computed before for the same data, tokenizer and settings")

    def __post_init__(self) -> None:
        for k in self.keywords:
            try:
                re.compile(k)
            except re.error as e:
                raise ConfigError(f"mask.keywords: {k!r} is not a valid regular expression ({e})") from None
        if self.kind == "keyword" and not self.keywords:
            raise ConfigError("mask.keywords: kind keyword needs at least one regular expression")

    def default_threshold(self) -> float:
        if self.threshold is not None:
            return self.threshold
        return {"activation": 0.3, "probe": 0.5, "sae": 0.0}.get(self.kind, 0.0)


# ----------------------------------------------------------------------------------------------
# Fingerprints and the cache


def _sha(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return _sha(backend.to_str().encode())
    return _sha(sorted(tokenizer.get_vocab().items()))


def model_fingerprint(model: nn.Module, layer: int | None) -> str:
    """Name, config and the weights up to ``layer`` (what an activation at that layer depends on)."""
    parts = get_parts(model)
    h = hashlib.sha256(json.dumps(parts.model.config.to_dict(), sort_keys=True, default=str).encode())
    modules = [parts.embed] + list(parts.layers[: (layer if layer is not None else len(parts.layers) - 1) + 1])
    for module in modules:
        for name, p in module.named_parameters():
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:20]


def file_fingerprint(path: str | Path) -> str:
    return _sha(Path(path).read_bytes())


def mean_activation(model: nn.Module, data: TokenizedData, layer: int, device: torch.device,
                    batch_size: int = 16) -> Tensor:
    total, count = None, 0
    for _, h, valid in iter_activations(model, data, layer, device, batch_size):
        s = h[valid].sum(0)
        total = s if total is None else total + s
        count += int(valid.sum())
    return total / max(1, count)


# ----------------------------------------------------------------------------------------------
# The mask kinds


def _decode_many(tokenizer: Any, rows: list[list[int]]) -> list[str]:
    """``tokenizer.decode`` of each row (no clean-up), through the Rust backend when there is one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.decode_batch(rows, skip_special_tokens=False)
    return tokenizer.batch_decode(rows, clean_up_tokenization_spaces=False)


def _char_bounds(tokenizer: Any, ids: list[int], context: int = 4) -> list[int]:
    """Character offsets of token boundaries in ``decode(ids)``: token j spans [b[j], b[j+1]).

    Token j's text is what it adds to the decoding of the few tokens before it (decoding tokens one
    by one would drop SentencePiece spaces and split UTF-8 bytes). When those pieces do not add up
    to the full decoding, fall back to decoding every prefix, which is exact but quadratic.
    """
    n = len(ids)
    windows = [ids[max(0, j - context): j + 1] for j in range(n)]
    decoded = _decode_many(tokenizer, windows + [w[:-1] for w in windows])
    with_j, without_j = decoded[:n], decoded[n:]
    pieces = [w[len(p):] if w.startswith(p) else None for w, p in zip(with_j, without_j)]
    if None in pieces or "".join(pieces) != _decode_many(tokenizer, [ids])[0]:
        prefixes = _decode_many(tokenizer, [ids[: j + 1] for j in range(n)])
        pieces = [b[len(a):] if b.startswith(a) else b[min(len(a), len(b)):]
                  for a, b in zip([""] + prefixes[:-1], prefixes)]
    bounds = [0]
    for piece in pieces:
        bounds.append(bounds[-1] + len(piece))
    return bounds


def keyword_mask(data: TokenizedData, tokenizer: Any, keywords: list[str], window: int = 0) -> Tensor:
    """Tokens whose decoded characters overlap a match of any of ``keywords`` (case-insensitive)."""
    pattern = re.compile("|".join(f"(?:{k})" for k in keywords), re.IGNORECASE)
    out = torch.zeros_like(data.input_ids, dtype=torch.bool)
    for i in range(len(data)):
        n = int(data.attention_mask[i].sum())
        ids = data.input_ids[i, :n].tolist()
        bounds = _char_bounds(tokenizer, ids)
        text = _decode_many(tokenizer, [ids])[0]
        for m in pattern.finditer(text):
            a, b = m.span()
            first = bisect.bisect_right(bounds, a) - 1      # the token holding character a
            last = bisect.bisect_left(bounds, b) - 1        # the token holding character b - 1
            if 0 <= first <= last < n:
                out[i, first: min(n, last + 1 + window)] = True
    return out


def activation_mask(model: nn.Module, forget: TokenizedData, retain: TokenizedData, layer: int,
                    threshold: float, device: torch.device, batch_size: int = 16) -> Tensor:
    """cos(h - mean_retain, mean_forget - mean_retain) > threshold at ``layer``."""
    mu_retain = mean_activation(model, retain, layer, device, batch_size)
    prototype = mean_activation(model, forget, layer, device, batch_size) - mu_retain
    out = torch.zeros_like(forget.input_ids, dtype=torch.bool)
    for rows, h, valid in iter_activations(model, forget, layer, device, batch_size):
        sim = torch.nn.functional.cosine_similarity(h - mu_retain, prototype.expand_as(h), dim=-1)
        out[rows] = ((sim > threshold) & valid).cpu()
    return out


def artifact_mask(model: nn.Module, forget: TokenizedData, scorer: Any, threshold: float,
                  device: torch.device, batch_size: int = 16) -> Tensor:
    """``scorer(h) [b, seq] > threshold`` at the scorer's layer (a trained probe or SAE)."""
    out = torch.zeros_like(forget.input_ids, dtype=torch.bool)
    scorer = scorer.to(device)
    for rows, h, valid in iter_activations(model, forget, scorer.layer, device, batch_size):
        out[rows] = ((scorer.score(h) > threshold) & valid).cpu()
    return out


def compute_mask(cfg: MaskConfig, forget: TokenizedData, *, tokenizer: Any, model: nn.Module | None = None,
                 retain: TokenizedData | None = None, device: torch.device | None = None,
                 model_name: str | None = None) -> Tensor | None:
    """The boolean loss mask over ``forget``'s rows (None for kind ``none``), from the cache if there."""
    if cfg.kind == "none":
        return None
    if cfg.kind == "hazard":
        if forget.hazard_labels is None:
            raise UserError("mask.kind: hazard needs forget data with marked hazard spans (the organism's "
                            "forget corpus); use keyword, activation, probe or sae")
        return forget.hazard_labels & forget.attention_mask.bool()
    if cfg.kind == "keyword":
        key = _sha("keyword", cfg.keywords, cfg.window, forget.fingerprint(), tokenizer_fingerprint(tokenizer))
        return _cached(cfg, key, lambda: keyword_mask(forget, tokenizer, cfg.keywords, cfg.window))
    if model is None or device is None:
        raise ValueError(f"mask.kind {cfg.kind} needs the model and device")
    if cfg.kind == "activation":
        if retain is None:
            raise ValueError("mask.kind activation needs the retain data for its prototype")
        layer = cfg.layer if cfg.layer is not None else default_layer(model)
        check_layers(model, [layer], "mask.layer")
        key = _sha("activation", layer, cfg.default_threshold(), forget.fingerprint(), retain.fingerprint(),
                   tokenizer_fingerprint(tokenizer), model_fingerprint(model, layer))
        return _cached(cfg, key, lambda: activation_mask(model, forget, retain, layer, cfg.default_threshold(),
                                                         device, cfg.batch_size))
    path = resolve_artifact(cfg, model, model_name)
    scorer = load_scorer(path, top_latents=cfg.top_latents)
    if cfg.layer is not None and cfg.layer != scorer.layer:
        raise ConfigError(f"mask.layer: {cfg.layer} differs from the layer {scorer.layer} the {cfg.kind} in "
                          f"{path} was trained at; drop mask.layer or train one at layer {cfg.layer}")
    key = _sha(cfg.kind, cfg.default_threshold(), cfg.top_latents if cfg.kind == "sae" else None,
               forget.fingerprint(), tokenizer_fingerprint(tokenizer), model_fingerprint(model, scorer.layer),
               file_fingerprint(path))
    return _cached(cfg, key, lambda: artifact_mask(model, forget, scorer, cfg.default_threshold(), device,
                                                   cfg.batch_size))


def _cached(cfg: MaskConfig, key: str, compute: Any) -> Tensor:
    path = cache_dir() / f"{cfg.kind}-{key}.safetensors"
    if cfg.cache and path.exists():
        log.info("mask: reusing the cached %s mask %s", cfg.kind, path.name)
        return load_file(str(path))["mask"].bool()
    mask = compute().bool()
    if cfg.cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"mask": mask.to(torch.uint8).contiguous()}, str(tmp),
                  metadata={"settings": json.dumps(asdict(cfg), default=str)})
        match_umask(tmp).replace(path)  # safetensors writes 0600 whatever the umask
    return mask


# ----------------------------------------------------------------------------------------------
# Quality against the truth, and the hook methods call


def mask_quality(mask: Tensor, attention_mask: Tensor, hazard_labels: Tensor | None) -> dict[str, float]:
    """Share of (non-padding) tokens masked; with hazard labels, precision and recall against them."""
    valid = attention_mask.bool()
    m = mask.bool() & valid
    out = {"tokens": int(valid.sum()), "masked": int(m.sum()), "share": float(m.sum()) / max(1, int(valid.sum()))}
    if hazard_labels is not None:
        truth = hazard_labels.bool() & valid
        tp = int((m & truth).sum())
        out["precision"] = tp / max(1, int(m.sum()))
        out["recall"] = tp / max(1, int(truth.sum()))
    return out


def apply_mask(cfg: MaskConfig, data: dict[str, TokenizedData], *, tokenizer: Any, model: nn.Module,
               device: torch.device, model_name: str | None = None, field: str = "mask") -> dict[str, float] | None:
    """Compute the forget mask and store it on ``data["forget"].loss_mask``; log and return its quality.

    Call before adapters are added (the mask is a property of the original model).
    """
    forget = data["forget"]
    mask = compute_mask(cfg, forget, tokenizer=tokenizer, model=model, retain=data.get("retain"),
                        device=device, model_name=model_name)
    if mask is None:
        forget.loss_mask = None
        return None
    if tuple(mask.shape) != tuple(forget.input_ids.shape):
        raise RuntimeError(f"{field}: mask shape {tuple(mask.shape)} != data {tuple(forget.input_ids.shape)}")
    quality = mask_quality(mask, forget.attention_mask, forget.hazard_labels)
    if quality["masked"] == 0:
        raise UserError(f"{field}: the {cfg.kind} mask selects no forget token; loosen {field}.threshold "
                        f"or {field}.keywords")
    forget.loss_mask = mask
    log.info("%s: %s mask keeps %d of %d forget tokens (%.1f%%)%s", field, cfg.kind, quality["masked"],
             quality["tokens"], 100 * quality["share"],
             f"; precision {quality['precision']:.2f}, recall {quality['recall']:.2f} against the hazard spans"
             if "precision" in quality else "")
    return quality
