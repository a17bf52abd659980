"""torchrun + DDP on real GPUs (NCCL): 2 ranks give one GPU's loss curve, and how much faster they are.

    python benchmarks/ddp_gpus.py                        # 2 GPUs (nvidia-h100-x2), about 5 min
    python benchmarks/ddp_gpus.py --device cpu --layers 2 --hidden 64 --steps 2   # the CPU check (gloo)
    python benchmarks/ddp_gpus.py --parallel fsdp --results benchmarks/results/fsdp_gpus.json  # FSDP2 instead

The CPU tests (tests/test_distributed.py) show the equivalence under gloo; this runs the same
comparison where DDP's CUDA path (device_ids, NCCL buckets) runs. A random GPT-NeoX (default 12
layers, hidden 1024, vocab 8192: random weights are enough) and random-word forget / retain / question
files are written under ``--out``; then each job runs twice through the real command line:

- ``unlearn run CONFIG`` on one GPU with ``grad_accum = 2 A``;
- ``torchrun --nproc-per-node 2 -m unlearning.cli run CONFIG`` with ``grad_accum = A``,

so both see the same 2 A micro-batches of ``--batch`` examples per step. A third run, one GPU on the
weights times (1 + 1e-7 N(0, 1)), is the noise floor: unlearning recipes amplify float noise (Adam's
first steps of each phase, retain losses that are small differences), so "same up to floating-point
noise" means the 2-rank curve is no further from the 1-GPU curve than that run is (measured on CPU:
both reach ~1.5e-3 relative in the L2 retain loss after 9 sequential LoRA steps, from 1e-7 at step 1). Jobs: sequential LoRA,
sequential full fine-tuning (a new DDP wrapper per layer phase), RMU. Compute is fp32 for the
comparison (``--dtype bf16`` to time bf16; differences then are bf16 noise). Prints, per job, the
largest relative difference of any logged loss term and grad norm over the curve, and seconds
per step on 1 and 2 ranks (the median step, from metrics.jsonl's clock); writes
``benchmarks/results/ddp_gpus.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

JOBS = {
    "sequential_lora": {"method": "sequential", "sequential": {
        "layers": "auto", "finetune": "lora", "retain_losses": {"l2": 1.0}, "lora": {"r": 16, "dropout": 0.0}}},
    "sequential_full": {"method": "sequential", "sequential": {
        "layers": "auto", "finetune": "full", "retain_losses": {"l2": 1.0}}},
    "rmu": {"method": "rmu", "rmu": {"layer": 2, "modules": ["mlp"], "finetune": "full"}},
    "rmu_lora": {"method": "rmu", "rmu": {"layer": 2, "modules": ["mlp"], "finetune": "lora",
                                          "lora": {"r": 16, "dropout": 0.0, "init_b_std": 0.02}}},
}


def write_inputs(out: Path, args: argparse.Namespace) -> None:
    """A random GPT-NeoX with a word-level tokenizer, and random-word corpora and questions."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = [f"w{i}" for i in range(3, args.vocab)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i for i, w in enumerate(words, start=3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                     unk_token="<unk>", pad_token="<unk>")
    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                        num_attention_heads=max(1, args.hidden // 64), intermediate_size=4 * args.hidden,
                                        max_position_embeddings=args.seq_len, bos_token_id=1, eos_token_id=2,
                                        pad_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    # The noise floor: the same weights times (1 + 1e-7 N(0, 1)), float noise of one process's making
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 1e-7 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out / "model_noise")
    tokenizer.save_pretrained(out / "model_noise")
    rng = random.Random(0)
    n = args.batch * 4 * args.steps * 2  # every example once per run at most

    def text() -> str:
        return " ".join(rng.choice(words) for _ in range(args.seq_len - 2))
    for name in ("forget", "retain"):
        (out / f"{name}.jsonl").write_text("".join(json.dumps({"text": text()}) + "\n" for _ in range(n)))
    questions = [{"question": " ".join(rng.choice(words) for _ in range(8)), "choices": rng.sample(words, 4),
                  "answer": rng.randrange(4)} for _ in range(64)]
    (out / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))


def config(out: Path, job: dict, args: argparse.Namespace) -> dict:
    steps = {"sequential": {"steps_per_layer": args.steps}, "rmu": {"steps": args.steps}}
    method = job["method"]
    section = {**job[method], **steps[method]}
    return {"model": str(out / "model"), "method": method, "device": args.device, method: section,
            "data": {"forget": {"source": str(out / "forget.jsonl")}, "retain": {"source": str(out / "retain.jsonl")},
                     "num_train_examples": args.batch * 4 * args.steps * 2, "seq_len": args.seq_len},
            "train": {"batch_size": args.batch, "dtype": args.dtype, "optimizer": {"lr": 1e-4},
                      "parallel": args.parallel},  # one rank: no sharding, whatever it says
            "eval": {"tasks": [str(out / "q.jsonl") + ":cloze"], "before": False, "reference": None},
            "save": {"model": False}}


def run(out: Path, name: str, cfg: dict, ranks: int, grad_accum: int, args: argparse.Namespace) -> list[dict]:
    import yaml
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    tail = ["run", str(path), "--name", name, "--output-dir", str(out / f"ranks{ranks}"),
            "--train.grad-accum", str(grad_accum), "--overwrite"]
    env = dict(os.environ)  # the package from this checkout, installed or not
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1] / "src"),
                                                      env.get("PYTHONPATH")]))
    if ranks == 1:
        command = [sys.executable, "-m", "unlearning.cli", *tail]
        if args.device != "cpu":
            env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                   "-m", "unlearning.cli", *tail]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, env=env)
    metrics = out / f"ranks{ranks}" / name / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def compare(one: list[dict], two: list[dict]) -> float:
    """The largest relative difference of a logged term, loss or grad norm over the curve."""
    if len(one) != len(two):
        return float("inf")
    worst = 0.0
    for a, b in zip(one, two):
        for k, v in a.items():
            if (k.endswith(("_term", "_loss")) or k == "grad_norm") and isinstance(v, float):
                worst = max(worst, abs(v - b[k]) / max(abs(v), 1e-12))
    return worst


def seconds_per_step(curve: list[dict]) -> float | None:
    """The median gap between consecutive records (skips the first: start-up and warm-up)."""
    gaps = [b["time"] - a["time"] for a, b in zip(curve[1:], curve[2:])]
    return statistics.median(gaps) if gaps else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/ddp_gpus")
    p.add_argument("--device", default="auto", help="auto (GPUs) or cpu (gloo, for a check of the script)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="examples per micro-batch")
    p.add_argument("--accum", type=int, default=2, help="micro-batches per rank per step (A)")
    p.add_argument("--steps", type=int, default=8, help="steps per layer phase (sequential) or in all (rmu)")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--jobs", default=",".join(JOBS))
    p.add_argument("--parallel", default="ddp", choices=("ddp", "fsdp"), help="train.parallel of the multi-rank runs")
    p.add_argument("--results", default="benchmarks/results/ddp_gpus.json")
    args = p.parse_args()
    import torch
    import transformers
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_inputs(out, args)
    rows = []
    for name in args.jobs.split(","):
        cfg = config(out, JOBS[name], args)
        one = run(out, name, cfg, 1, args.ranks * args.accum, args)
        many = run(out, name, cfg, args.ranks, args.accum, args)
        floor = run(out, f"{name}_noise", {**cfg, "model": str(out / "model_noise")}, 1, args.ranks * args.accum,
                    args)
        t1, tn = seconds_per_step(one), seconds_per_step(many)
        rows.append({"job": name, "steps": len(one), "max_rel_diff": compare(one, many),
                     "noise_floor": compare(one, floor), "s_per_step_1": t1,
                     f"s_per_step_{args.ranks}": tn, "speedup": t1 / tn if t1 and tn else None})
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    report = {"device": device, "ranks": args.ranks, "parallel": args.parallel, "torch": torch.__version__,
              "transformers": transformers.__version__, "shape": {k: getattr(args, k) for k in (
                  "layers", "hidden", "vocab", "seq_len", "batch", "accum", "steps", "dtype")}, "jobs": rows}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{device}, {args.ranks} ranks ({args.parallel}) vs 1, global batch {args.batch * args.accum * args.ranks}, {args.dtype}")
    print(f"| job | steps | max rel diff, {args.ranks} ranks vs 1 | noise floor (1e-7 weights) | s/step 1 | "
          f"s/step {args.ranks} | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        fmt = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
        print(f"| {r['job']} | {r['steps']} | {r['max_rel_diff']:.1e} | {r['noise_floor']:.1e} | {fmt(r['s_per_step_1'])} | "
              f"{fmt(r[f's_per_step_{args.ranks}'])} | {fmt(r['speedup'])} |")
    # same results: within 10x the noise floor (or 1e-5, where the floor is ~0)
    return 0 if all(r["max_rel_diff"] <= max(10 * r["noise_floor"], 1e-5) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
