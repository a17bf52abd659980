"""Training speed and memory at the real model's size: the project's path against a reference design.

    python benchmarks/scale_train.py                       # the 6.9B GPT-NeoX shape, random weights, one GPU
    python benchmarks/scale_train.py --shape tiny --steps 3   # the same code at a toy shape (CPU smoke test)

Three workloads, each run twice (project, reference) on a freshly built model, each run in a process of its
own (``--in-process`` runs them one after the other in this one): what one run leaves in the CUDA caching
allocator or in a reference cycle cannot push the next one out of memory (circuit breakers did, after the
sequential runs, on 2026-12-06):

- ``seq_full``: sequential unlearning, full fine-tuning of layer L (max-entropy forget through the
  probe, KL retain on logits, AdamW), forget + retain batches of 4 x 1024 tokens;
- ``seq_lora``: the same with LoRA r 16 on every linear layer (the notebook's "all" adapters train);
- ``cb_lora``: circuit breakers, LoRA, layers 5..30, KL retain.

"project" is the code ``unlearn run`` executes: the method's ``build`` and the one training loop
(``training/loop.py``). "reference" is the straightforward design written inline below: a
``deepcopy`` of the model as the original, every pass in full with ``output_hidden_states``,
unchunked fp32 losses, one backward. Both use the same shapes, dtypes, optimizer and data.

Each row reports ms/step (median of the timed steps after ``--warmup``), tokens/s (forget + retain
tokens), peak GiB (``torch.cuda.max_memory_allocated`` over the whole run, weights included), the
FLOPs one step executes (counted by ``torch.utils.flop_counter`` on one extra step) and MFU against
the GPU's bf16 dense peak. Results go to ``benchmarks/results/scale_train.json``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared model builder

from random_neox import DIMS_6P9B, build_random_neox, peak_tflops  # noqa: E402

from unlearning.core.io import atomic_write_json, read_json  # noqa: E402
from unlearning.data.text import BatchStream, TokenizedData  # noqa: E402
from unlearning.methods import circuit_breaker, sequential  # noqa: E402
from unlearning.methods.context import BuildContext  # noqa: E402
from unlearning.model.layers import get_parts, start_at  # noqa: E402
from unlearning.training.loop import TrainConfig, train  # noqa: E402
from unlearning.training.optim import OptimizerConfig  # noqa: E402
from unlearning.training.trainable import LoraSettings  # noqa: E402

SHAPES = {  # GPT-NeoX 6.9B (deep-ignorance / Pythia-6.9B layout) and a toy with the same code paths
    "6.9b": dict(**DIMS_6P9B, vocab_size=50304, seq=1024, batch=4, layer=20, cb_layers=list(range(5, 31))),
    "tiny": dict(num_hidden_layers=6, hidden_size=64, intermediate_size=256, num_attention_heads=4,
                 vocab_size=50304, seq=64, batch=2, layer=3, cb_layers=[1, 2, 3, 4]),
}
LR = 1e-5
FORGET_COEF, RETAIN_COEF = 5.0, 2.0


def build_model(shape: dict, device: torch.device, dtype: torch.dtype) -> transformers.PreTrainedModel:
    dims = {k: shape[k] for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")}
    return build_random_neox(dims, device=str(device), dtype=str(dtype).removeprefix("torch.")).train()


def random_data(shape: dict, seed: int, rows: int = 64) -> TokenizedData:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, shape["vocab_size"], (rows, shape["seq"]), generator=g)
    return TokenizedData(ids, torch.ones_like(ids))


# ---------------------------------------------------------------------------------------------
# The project's path: the method's build and the one loop


def project_run(workload: str, shape: dict, device, dtype, steps: int, on_step) -> None:
    model = build_model(shape, device, dtype)
    data = {"forget": random_data(shape, 1), "retain": random_data(shape, 2)}
    tcfg = TrainConfig(batch_size=shape["batch"], grad_accum=1, dtype="bf16" if dtype == torch.bfloat16 else "fp32",
                       max_grad_norm=1.0, optimizer=OptimizerConfig(lr=LR, weight_decay=0.0))
    ctx = BuildContext(model_name="random", tokenizer=None, data=data, device=device, train=tcfg,
                       model_dtype="bf16" if dtype == torch.bfloat16 else "fp32")
    lora = LoraSettings(r=16, alpha=16, dropout=0.0)
    if workload in ("seq_full", "seq_lora"):
        cfg = sequential.Config(layers=[shape["layer"]], steps_per_layer=steps, remove_coef=FORGET_COEF,
                                retain_coef=RETAIN_COEF, forget_loss="max_entropy_kl", retain_losses={"kl": 1.0},
                                finetune="full" if workload == "seq_full" else "lora", lora=lora)
        model, method = sequential.build(model, ctx, cfg)
    else:
        cfg = circuit_breaker.Config(target_layers=shape["cb_layers"], retain_loss="kl", steps=steps,
                                     finetune="lora", lora=lora, metrics_every=10 ** 6, summary_step=None,
                                     retain_coef=RETAIN_COEF, remove_coef=FORGET_COEF)
        model, method = circuit_breaker.build(model, ctx, cfg)
    streams = {k: BatchStream(v, shape["batch"], seed=i) for i, (k, v) in enumerate(data.items())}
    train(model, method, streams, tcfg, device=device, on_step=lambda record: on_step())


# ---------------------------------------------------------------------------------------------
# The reference design: a second model, full passes, plain losses


def _max_entropy(logits):  # CE(uniform, p) / log V at every position, fp32
    z = logits.float()
    return ((torch.logsumexp(z, -1) - z.mean(-1)) / torch.log(torch.tensor(z.shape[-1]))).mean()


def _kl(cur, orig):
    return F.kl_div(F.log_softmax(cur.float(), -1), F.log_softmax(orig.float(), -1), reduction="none",
                    log_target=True).sum(-1).mean()


def _relu_cos(cur, orig):
    return torch.stack([F.relu(F.cosine_similarity(c.float(), o.float(), dim=-1)).mean()
                        for c, o in zip(cur, orig)]).mean()


def reference_run(workload: str, shape: dict, device, dtype, steps: int, on_step) -> None:
    from peft import LoraConfig, get_peft_model
    model = build_model(shape, device, dtype)
    original = copy.deepcopy(model).requires_grad_(False).eval()  # the original: a second whole model
    L = shape["layer"]
    if workload == "seq_full":
        model.requires_grad_(False)
        params = list(get_parts(model).layers[L].parameters())
        for p in params:
            p.requires_grad_(True)
    else:
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
        params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    f_stream = BatchStream(random_data(shape, 1), shape["batch"], seed=0)
    r_stream = BatchStream(random_data(shape, 2), shape["batch"], seed=1)
    for _ in range(steps):
        fb = {k: v.to(device) for k, v in next(f_stream).items() if k in ("input_ids", "attention_mask")}
        rb = {k: v.to(device) for k, v in next(r_stream).items() if k in ("input_ids", "attention_mask")}
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if workload == "cb_lora":
                cur = model(**fb, output_hidden_states=True).hidden_states
                with torch.no_grad():
                    orig = original(**fb, output_hidden_states=True).hidden_states
                idx = [i + 1 for i in shape["cb_layers"]]
                forget = _relu_cos([cur[i] for i in idx], [orig[i] for i in idx])
            else:  # the probe: the current model's layer-L output through the original layers after L
                h = model(**fb, output_hidden_states=True).hidden_states[L + 1]
                with start_at(original, L + 1, h):
                    forget = _max_entropy(original(**fb).logits)
            cur_logits = model(**rb, output_hidden_states=True).logits
            with torch.no_grad():
                orig_logits = original(**rb, output_hidden_states=True).logits
            loss = FORGET_COEF * forget + RETAIN_COEF * _kl(cur_logits, orig_logits)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        loss.item()  # the step's one sync, as the project's loop has
        opt.step()
        opt.zero_grad(set_to_none=True)
        on_step()


# ---------------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, workload: str, shape: dict, device, dtype, steps: int, warmup: int, flops: bool) -> dict:
    """One run of ``warmup + steps`` timed steps, then (with ``flops``) one step under PyTorch's FLOP
    counter (matmuls and attention as executed, backward and optimizer included)."""
    from torch.utils.flop_counter import FlopCounterMode
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    stamps: list[float] = []
    counter = FlopCounterMode(display=False)
    timed_until = warmup + steps + 1  # stamps: one per finished step, the first step has no start stamp

    def on_step():
        _sync(device)  # the step's kernels are done: this is a CPU-GPU sync point, outside the timed work
        stamps.append(time.perf_counter())
        if flops and len(stamps) == timed_until:
            counter.__enter__()  # counts the next step, which is not timed
        elif flops and len(stamps) == timed_until + 1:
            counter.__exit__(None, None, None)
    start = time.perf_counter()
    oom = None
    try:
        fn(workload, shape, device, dtype, timed_until + (1 if flops else 0), on_step)
    except torch.OutOfMemoryError as e:  # a design that does not fit the GPU is a result, not a crash
        oom = f"out of memory after {len(stamps)} steps: {str(e).splitlines()[0]}"
        if counter in torch.utils._python_dispatch._get_current_dispatch_mode_stack():
            counter.__exit__(None, None, None)
    wall = time.perf_counter() - start
    if len(stamps) < timed_until:
        return {"oom": oom, "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)}
    per_step = [b - a for a, b in zip(stamps[warmup:timed_until - 1], stamps[warmup + 1:timed_until])]
    ms = 1000 * statistics.median(per_step)
    tokens = 2 * shape["batch"] * shape["seq"]  # forget + retain
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    out = {"ms_per_step": round(ms, 1), "tokens_per_s": round(tokens / ms * 1000),
           "peak_gib": peak and round(peak, 2), "steps_timed": len(per_step), "wall_s": round(wall, 1)}
    if oom:
        out["oom"] = oom  # in the counted step: the timings stand, the FLOP count does not
    elif flops:
        out["tflop_per_step"] = round(counter.get_total_flops() / 1e12, 3)
    return out


def run_alone(args: argparse.Namespace, one: str) -> dict:
    """One run in a new interpreter (a fresh CUDA context); its figures, or why it produced none."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "one.json"
        argv = [sys.executable, __file__, "--shape", args.shape, "--steps", str(args.steps), "--warmup",
                str(args.warmup), "--one", one, "--out", str(out)] + (["--no-flops"] if args.no_flops else [])
        done = subprocess.run(argv)
        return read_json(out) if out.is_file() else {"error": f"the run's process exited with {done.returncode}"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="6.9b")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--workloads", default="seq_full,seq_lora,cb_lora")
    ap.add_argument("--no-flops", action="store_true", help="skip the FLOP count (one extra step per run)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "scale_train.json"))
    ap.add_argument("--in-process", action="store_true", help="every run in this process (default: one process each)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # WORKLOAD:DESIGN, the child of one run
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = SHAPES[args.shape]
    peak = peak_tflops(device)
    rows = []
    result = {"benchmark": "scale_train", "shape": args.shape, **{k: v for k, v in shape.items()},
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "bf16_peak_tflops": peak, "dtype": str(dtype), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    designs = {"project": project_run, "reference": reference_run}
    if args.one:  # a child: one run, its figures to --out
        workload, design = args.one.split(":")
        atomic_write_json(args.out, measure(designs[design], workload, shape, device, dtype, args.steps, args.warmup,
                                            flops=not args.no_flops))
        return 0
    for workload in args.workloads.split(","):
        row = {"workload": workload}
        for design, fn in designs.items():
            if args.in_process:
                m = measure(fn, workload, shape, device, dtype, args.steps, args.warmup, flops=not args.no_flops)
            else:
                m = run_alone(args, f"{workload}:{design}")
            if "tflop_per_step" in m:
                if peak:
                    m["mfu"] = round(m["tflop_per_step"] / (m["ms_per_step"] / 1000) / peak, 3)
            row[design] = m
            print(workload, design, m, flush=True)
        if "ms_per_step" in row["reference"] and "ms_per_step" in row["project"]:
            row["speedup"] = round(row["reference"]["ms_per_step"] / row["project"]["ms_per_step"], 2)
        if row["project"].get("peak_gib") and row["reference"].get("peak_gib"):
            row["memory_ratio"] = round(row["project"]["peak_gib"] / row["reference"]["peak_gib"], 2)
        rows.append(row)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out, result)  # after each workload: a later failure keeps the rows so far
    print("\n| workload | project ms/step | tokens/s | peak GiB | MFU | reference ms/step | tokens/s | peak GiB | MFU "
          "| speed-up | memory |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p, q = r["project"], r["reference"]
        print(f"| {r['workload']} | {p.get('ms_per_step')} | {p.get('tokens_per_s')} | {p.get('peak_gib')} | {p.get('mfu')} "
              f"| {q.get('ms_per_step', q.get('oom'))} | {q.get('tokens_per_s')} | {q.get('peak_gib')} | {q.get('mfu')} | {r.get('speedup')}x "
              f"| {r.get('memory_ratio')}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
