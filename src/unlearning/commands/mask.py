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

import argparse
import dataclasses
import logging
import sys
from typing import Any

from unlearning.reporting.tables import format_table

log = logging.getLogger(__name__)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model (default: organism:tiny on CPU, organism:small on GPU)")
    p.add_argument("--revision", default=None)
    p.add_argument("--forget", default="organism:forget", help="forget data source")
    p.add_argument("--retain", default="organism:retain", help="retain data source")
    p.add_argument("--num-examples", type=int, default=512, help="examples per corpus")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--layer", type=int, default=None, help="layer (default: the middle layer)")


def _load(args: argparse.Namespace, data_cfg: Any = None) -> tuple[Any, Any, dict[str, Any], str, Any]:
    import torch

    from unlearning.data.text import TextSource, load_texts, tokenize
    from unlearning.model.loading import load_model
    from unlearning.organism.registry import organism_preset
    from unlearning.runner import resolved_model_name
    from unlearning.core.runtime import configure_cpu_threads, resolve_device
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


def train_main(argv: list[str]) -> int:
    from unlearning.masking.models import ScorerTrainConfig, default_artifact_path, save_scorer, train_scorer
    from unlearning.masking.activations import default_layer
    p = argparse.ArgumentParser(prog="unlearn mask train", description="Train a probe or SAE for token masks.")
    p.add_argument("--kind", choices=["probe", "sae"], required=True)
    _common(p)
    p.add_argument("--out", default=None, help="output .safetensors (default: where mask.artifact looks)")
    for f in dataclasses.fields(ScorerTrainConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default) if f.default is not None else float,
                       default=f.default, help=f.metadata.get("help", ""))
    args = p.parse_args(argv)
    cfg = ScorerTrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ScorerTrainConfig)})
    model, _, data, name, device = _load(args)
    layer = args.layer if args.layer is not None else default_layer(model)
    scorer, stats = train_scorer(args.kind, model, data["forget"], data["retain"], layer, device, cfg)
    out = args.out or default_artifact_path(name, args.kind, layer)
    save_scorer(scorer, out, {"model": name, **stats})
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in stats.items() if k != "settings"}
    print(f"{args.kind} at layer {layer} saved to {out}: {shown}")
    return 0


def _layer_of(cfg: Any, model: Any, model_name: str) -> int | None:
    """The layer a model-based mask reads (the artifact's for a probe or SAE)."""
    from unlearning.masking.models import read_meta, resolve_artifact
    from unlearning.masking.activations import default_layer
    if cfg.kind == "activation":
        return cfg.layer if cfg.layer is not None else default_layer(model)
    if cfg.kind in ("probe", "sae"):
        return int(read_meta(resolve_artifact(cfg, model, model_name))["layer"])
    return None


def report_main(argv: list[str]) -> int:
    from unlearning.masking.masks import MaskConfig, apply_mask, mask_quality
    p = argparse.ArgumentParser(prog="unlearn mask report",
                                description="Share, precision and recall of token masks on the forget data.")
    p.add_argument("config", nargs="?", help="a run config: its model, data and method's mask settings")
    _common(p)
    p.add_argument("--kind", default=None, help="comma-separated kinds: keyword,activation,probe,sae,hazard")
    p.add_argument("--keywords", nargs="+", default=None, help="keyword: regular expressions")
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--top-latents", type=int, default=None)
    p.add_argument("--artifact", default=None)
    args = p.parse_args(argv)
    base, data_cfg = MaskConfig(), None
    if args.config:
        from unlearning.runner import load_run_config
        run_cfg = load_run_config(args.config)
        base = getattr(run_cfg.method_config(), "mask", base)
        args.model = args.model or run_cfg.model
        data_cfg = run_cfg.data
        args.num_examples = min(args.num_examples, run_cfg.data.num_train_examples)
        args.seq_len = run_cfg.data.seq_len
    kinds = args.kind.split(",") if args.kind else ([base.kind] if base.kind != "none" else ["keyword"])
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
        print("usage: unlearn mask {train,report} ...\n\n  train   train a linear probe or SAE on forget-vs-"
              "retain activations\n  report  share of tokens, precision and recall of masks on the forget data")
        return 0
    sub, rest = argv[0], argv[1:]
    if sub == "train":
        return train_main(rest)
    if sub == "report":
        return report_main(rest)
    print(f"unlearn mask: unknown sub-command {sub!r}; use train or report", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
