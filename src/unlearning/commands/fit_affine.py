"""``unlearn fit-affine``: fit per-layer affine maps from a teacher's hidden states to a model's.

    unlearn fit-affine --model organism:small --checkpoint organism:small --checkpoint-revision early \\
        --layers 5,10,15,20,25,30 --out affine/small_early.safetensors
    unlearn fit-affine --model EleutherAI/deep-ignorance-unfiltered \\
        --checkpoint EleutherAI/deep-ignorance-pretraining-stage-unfiltered \\
        --checkpoint-revision global_step38144 --data hub:... --out affine.safetensors

Then ``unlearn run configs/checkpoint_transfer_kl.yaml --checkpoint_transfer.affine affine.safetensors``.
Prints the held-out error per layer (teacher as is vs mapped) and writes the file with its settings.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import torch

from unlearning.core.cli import parse_command
from unlearning.core.config import param
from unlearning.core.logs import setup_logging
from unlearning.core.runtime import configure_cpu_threads, resolve_device
from unlearning.data.text import TextSource, load_texts, tokenize
from unlearning.methods.checkpoint_transfer import resolve_teacher
from unlearning.methods.representation import resolve_target_layers
from unlearning.model.affine import fit_affine_maps, save_affine
from unlearning.model.layers import num_layers
from unlearning.model.loading import load_model
from unlearning.reporting.tables import format_table
from unlearning.organism.registry import organism_preset

log = logging.getLogger(__name__)


@dataclass
class FitAffineConfig:
    model: str = param(help="the model the maps lead to (organism:small, a folder, a hub id)")
    out: str = param(help="the safetensors file to write")
    revision: str | None = None
    checkpoint: str | None = param(None, help="the teacher the maps start from; organism models: early (default) "
                                              "or filtered")
    checkpoint_revision: str | None = None
    layers: str | None = param(None, help="layers, e.g. 5,10,15 or '30->5:5' (default [5..30] clipped)")
    data: list[str] = param(["organism:forget", "organism:retain"], many=True,
                            help="corpora whose tokens the fit uses (organism:<corpus>, a local file, hub:<id>)")
    num_examples: int = param(512, min=1, help="examples per corpus")
    seq_len: int = param(256, min=8)
    batch_size: int = param(8, min=1)
    ridge: float = param(1e-3, min=0, help="penalty relative to the mean variance of the teacher's states")
    device: str = "auto"
    dtype: str = param("auto", choices=("auto", "fp32", "bf16", "fp16"))


def main(argv: list[str]) -> int:
    parsed = parse_command(FitAffineConfig, argv, prog="unlearn fit-affine", description=__doc__)
    if parsed is None:
        return 0
    cfg, _ = parsed
    setup_logging()
    configure_cpu_threads()
    device = resolve_device(cfg.device)
    teacher_name, teacher_rev = resolve_teacher(cfg.model, cfg.checkpoint, cfg.checkpoint_revision)
    model, tokenizer = load_model(cfg.model, revision=cfg.revision, dtype=cfg.dtype, device=str(device))
    teacher, _ = load_model(teacher_name, revision=teacher_rev, dtype=cfg.dtype, device=str(device))
    model.eval()
    teacher.eval()
    layers = resolve_target_layers(cfg.layers, num_layers(model), field="--layers")
    resolve_target_layers(layers, num_layers(teacher), field="--layers (in the teacher)")

    organism = organism_preset(cfg.model)
    batches = []
    for source in cfg.data:
        records = load_texts(TextSource(source), organism)[: cfg.num_examples]
        data = tokenize(records, tokenizer, cfg.seq_len, source=source)
        for start in range(0, len(data), cfg.batch_size):
            batches.append(data.rows(torch.arange(start, min(start + cfg.batch_size, len(data)))))
    maps, stats = fit_affine_maps(model, teacher, batches, layers, ridge=cfg.ridge, device=device)
    metadata = {"model": cfg.model, "revision": cfg.revision, "teacher": teacher_name,
                "teacher_revision": teacher_rev, "layers": layers, "data": cfg.data,
                "num_examples": cfg.num_examples, "seq_len": cfg.seq_len, "ridge": cfg.ridge, "stats": stats}
    path = save_affine(cfg.out, maps, metadata)
    rows = [[int(i), s.get("mse_identity"), s["mse_affine"], s["var_model"], s["r2"], s["tokens_fit"]]
            for i, s in stats.items()]
    print(format_table(["layer", "mse teacher as is", "mse mapped", "model variance", "r2", "tokens"], rows))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
