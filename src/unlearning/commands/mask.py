"""``unlearn mask train|report``: token-mask probes and SAEs, and how well masks find hazard tokens.

    unlearn mask train --kind probe --model organism:small --layer 16
    unlearn mask train --kind sae --model organism:small --layer 16 --steps 2000
    unlearn mask report --model organism:small --kind keyword,activation,probe,sae,hazard
    unlearn mask report configs/keyword_mask.yaml

``train`` fits the linear probe / SAE on forget-vs-retain activations at one layer and saves it
(safetensors) where ``mask.artifact`` finds it by default. ``report`` prints, per mask kind, the
share of forget tokens it keeps and, on the organism, its precision and recall against the true
hazard tokens.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass
from typing import Any, Literal

import torch

from unlearning.core.cli import parse_command
from unlearning.core.config import param
from unlearning.core.runtime import configure_cpu_threads, resolve_device
from unlearning.data.text import TextSource, load_texts, tokenize
from unlearning.masking.activations import default_layer
from unlearning.masking.masks import MaskConfig, apply_mask, mask_quality
from unlearning.masking.models import (ScorerTrainConfig, default_artifact_path, read_meta, resolve_artifact,
                                       save_scorer, train_scorer)
from unlearning.model.loading import load_model
from unlearning.reporting.tables import format_table
from unlearning.organism.registry import organism_preset
from unlearning.runner import load_run_config, resolved_model_name

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class MaskData:
    """The model and the forget/retain data both sub-commands read."""
    model: str | None = param(None, help="model (default: organism:tiny on CPU, organism:small on GPU)")
    revision: str | None = None
    forget: str = param("organism:forget", help="forget data source")
    retain: str = param("organism:retain", help="retain data source")
    num_examples: int = param(512, min=1, help="examples per corpus")
    seq_len: int = param(256, min=8)
    device: str = "auto"
    layer: int | None = param(None, help="layer (default: the middle layer)")


@dataclass(kw_only=True)
class MaskTrainConfig(ScorerTrainConfig, MaskData):
    """``unlearn mask train``: the data, plus the scorer's training settings."""
    kind: Literal["probe", "sae"] = param(help="a linear probe or a sparse autoencoder")
    out: str | None = param(None, help="output .safetensors (default: where mask.artifact looks)")

    def scorer(self) -> ScorerTrainConfig:
        return ScorerTrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ScorerTrainConfig)})


@dataclass(kw_only=True)
class MaskReportConfig(MaskData):
    """``unlearn mask report``: mask settings over a run config's (or the defaults)."""
    config: str | None = param(None, positional=True, help="a run config: its model, data and method's mask settings")
    kind: list[str] | None = param(None, help="kinds to compare: keyword,activation,probe,sae,hazard")
    keywords: list[str] | None = param(None, many=True, comma=False, help="keyword: regular expressions")
    window: int | None = param(None, min=0)
    threshold: float | None = None
    top_latents: int | None = param(None, min=1)
    artifact: str | None = None


SUBCOMMANDS = {"train": (MaskTrainConfig, "train a linear probe or SAE on forget-vs-retain activations"),
               "report": (MaskReportConfig, "share of tokens, precision and recall of masks on the forget data")}


def _load(args: MaskData, data_cfg: Any = None) -> tuple[Any, Any, dict[str, Any], str, Any]:
    configure_cpu_threads()
    name = resolved_model_name(args.model or "auto")
    device = resolve_device(args.device)
    model, tok = load_model(name, revision=args.revision, dtype="fp32" if device.type == "cpu" else "auto",
                            device=str(device))
    organism = organism_preset(name)
    data = {}
    for corpus in ("forget", "retain"):
        src = getattr(data_cfg, corpus) if data_cfg is not None else TextSource(getattr(args, corpus))
        records = load_texts(src, organism)[: args.num_examples]
        data[corpus] = tokenize(records, tok, args.seq_len, source=src.source)
    torch.set_grad_enabled(True)
    return model, tok, data, name, device


def train_main(args: MaskTrainConfig) -> int:
    model, _, data, name, device = _load(args)
    layer = args.layer if args.layer is not None else default_layer(model)
    scorer, stats = train_scorer(args.kind, model, data["forget"], data["retain"], layer, device, args.scorer())
    out = args.out or default_artifact_path(name, args.kind, layer)
    save_scorer(scorer, out, {"model": name, **stats})
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in stats.items() if k != "settings"}
    print(f"{args.kind} at layer {layer} saved to {out}: {shown}")
    return 0


def _layer_of(cfg: Any, model: Any, model_name: str) -> int | None:
    """The layer a model-based mask reads (the artifact's for a probe or SAE)."""
    if cfg.kind == "activation":
        return cfg.layer if cfg.layer is not None else default_layer(model)
    if cfg.kind in ("probe", "sae"):
        return int(read_meta(resolve_artifact(cfg, model, model_name))["layer"])
    return None


def report_main(args: MaskReportConfig) -> int:
    base, data_cfg = MaskConfig(), None
    if args.config:
        run_cfg = load_run_config(args.config)
        base = getattr(run_cfg.method_config(), "mask", base)
        args.model = args.model or run_cfg.model
        data_cfg = run_cfg.data
        args.num_examples = min(args.num_examples, run_cfg.data.num_train_examples)
        args.seq_len = run_cfg.data.seq_len
    kinds = args.kind if args.kind else ([base.kind] if base.kind != "none" else ["keyword"])
    model, tok, data, name, device = _load(args, data_cfg)
    rows = []
    for kind in kinds:
        changes = {"kind": kind.strip()}
        for key in ("keywords", "window", "threshold", "top_latents", "artifact", "layer"):
            if getattr(args, key) is not None:
                changes[key] = getattr(args, key)
        cfg = dataclasses.replace(base, **changes)
        if cfg.kind == "none":
            continue
        apply_mask(cfg, data, tokenizer=tok, model=model, device=device, model_name=name)
        q = mask_quality(data["forget"].loss_mask, data["forget"].attention_mask, data["forget"].hazard_labels)
        rows.append([cfg.kind, _layer_of(cfg, model, name), q["share"], q.get("precision"), q.get("recall"),
                     q["masked"], q["tokens"]])
    print(format_table(["mask", "layer", "share of tokens", "precision", "recall", "masked", "tokens"], rows))
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: unlearn mask {train,report} ...\n\n" + __doc__.strip().replace("``", "") + "\n\n" + "\n".join(
            f"  {name:<7} {text}" for name, (_, text) in SUBCOMMANDS.items())
              + "\n\nRun 'unlearn mask train --help' or 'unlearn mask report --help' for their keys.")
        return 0
    sub, rest = argv[0], argv[1:]
    if sub not in SUBCOMMANDS:
        print(f"unlearn mask: unknown sub-command {sub!r}; use train or report", file=sys.stderr)
        return 2
    cls, text = SUBCOMMANDS[sub]
    parsed = parse_command(cls, rest, prog=f"unlearn mask {sub}", description=text)
    if parsed is None:
        return 0
    return train_main(parsed[0]) if sub == "train" else report_main(parsed[0])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
