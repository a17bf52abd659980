"""The evaluation benchmark's code path at a toy shape on a CPU: a small random GPT-NeoX (the 6.9B
model's vocabulary and layout, ``random_neox.py``) with the real GPT-NeoX-20B tokenizer scores
MMLU-shaped questions in the letter format through ``evaluate``, as ``lmeval_reference.py`` does on
a GPU. At this size the forward pass is cheap, so the time is mostly the host's share: prompts,
tokenization, batch building and the scoring loop around the forwards.

    python benchmarks/eval_cpu.py QUESTIONS.parquet [--layers 2 --hidden 128] [--batch-size 32]

``QUESTIONS.parquet`` comes from ``wmdp_shaped.py OUT --n 400``. Prints one JSON line with the
in-process ``evaluate`` seconds (the whole process is timed from outside, e.g. ``/usr/bin/time -v``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared model builder

from random_neox import build_random_neox  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("questions")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)

    import torch

    from unlearning.data import real
    from unlearning.evaluation import evaluate
    from unlearning.tasks import get_tasks

    torch.set_num_threads(1)  # one core for the model, as a GPU host leaves the CPU to the driver loop
    dims = dict(num_hidden_layers=args.layers, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                num_attention_heads=max(1, args.hidden // 32))
    model = build_random_neox(dims, device="cpu", dtype="float32").eval()
    tokenizer = real.load_tokenizer()
    tasks = get_tasks(f"wmdp_bio={args.questions}")
    start = time.perf_counter()
    results = evaluate(model, tokenizer, tasks, batch_size=args.batch_size, mixed_precision=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"evaluate_s": round(seconds, 3), "questions": results["wmdp_bio"]["n"],
                      "acc": results["wmdp_bio"]["acc"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
