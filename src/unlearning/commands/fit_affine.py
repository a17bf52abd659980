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

import argparse
import logging
import sys

from unlearning.reporting.tables import format_table

log = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="unlearn fit-affine", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the model the maps lead to (organism:small, a folder, a hub id)")
    p.add_argument("--revision", default=None)
    p.add_argument("--checkpoint", default=None,
                   help="the teacher the maps start from; organism models: early (default) or filtered")
    p.add_argument("--checkpoint-revision", default=None)
    p.add_argument("--layers", default=None, help="layers, e.g. 5,10,15 or '30->5:5' (default [5..30] clipped)")
    p.add_argument("--data", nargs="+", default=["organism:forget", "organism:retain"],
                   help="corpora whose tokens the fit uses (organism:<corpus>, a local file, hub:<id>)")
    p.add_argument("--num-examples", type=int, default=512, help="examples per corpus")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ridge", type=float, default=1e-3, help="penalty relative to the mean variance of the "
                                                            "teacher's states")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--out", required=True, help="the safetensors file to write")
    args = p.parse_args(argv)

    import torch

    from unlearning.model.affine import fit_affine_maps, save_affine
    from unlearning.core.errors import ConfigError
    from unlearning.data.text import TextSource, load_texts, tokenize
    from unlearning.model.layers import num_layers
    from unlearning.core.logs import setup_logging
    from unlearning.methods.checkpoint_transfer import resolve_teacher
    from unlearning.methods.representation import resolve_target_layers
    from unlearning.model.loading import load_model
    from unlearning.organism.registry import organism_preset
    from unlearning.core.runtime import configure_cpu_threads, resolve_device

    setup_logging()
    configure_cpu_threads()
    if args.num_examples < 1 or args.batch_size < 1:
        raise ConfigError("--num-examples and --batch-size must be at least 1")
    device = resolve_device(args.device)
    teacher_name, teacher_rev = resolve_teacher(args.model, args.checkpoint, args.checkpoint_revision)
    model, tokenizer = load_model(args.model, revision=args.revision, dtype=args.dtype, device=str(device))
    teacher, _ = load_model(teacher_name, revision=teacher_rev, dtype=args.dtype, device=str(device))
    model.eval()
    teacher.eval()
    layers = resolve_target_layers(args.layers, num_layers(model), field="--layers")
    resolve_target_layers(layers, num_layers(teacher), field="--layers (in the teacher)")

    organism = organism_preset(args.model)
    batches = []
    for source in args.data:
        records = load_texts(TextSource(source), organism)[: args.num_examples]
        data = tokenize(records, tokenizer, args.seq_len, source=source)
        for start in range(0, len(data), args.batch_size):
            batches.append(data.rows(torch.arange(start, min(start + args.batch_size, len(data)))))
    maps, stats = fit_affine_maps(model, teacher, batches, layers, ridge=args.ridge, device=device)
    metadata = {"model": args.model, "revision": args.revision, "teacher": teacher_name,
                "teacher_revision": teacher_rev, "layers": layers, "data": args.data,
                "num_examples": args.num_examples, "seq_len": args.seq_len, "ridge": args.ridge, "stats": stats}
    path = save_affine(args.out, maps, metadata)
    rows = [[int(i), s.get("mse_identity"), s["mse_affine"], s["var_model"], s["r2"], s["tokens_fit"]]
            for i, s in stats.items()]
    print(format_table(["layer", "mse teacher as is", "mse mapped", "model variance", "r2", "tokens"], rows))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
