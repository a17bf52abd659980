"""A WMDP-Bio-shaped question file for timing: 1,273 questions in WMDP's columns (question, choices,
answer), drawn with a fixed seed from the real MMLU test rows (the real WMDP cannot be fetched here).

    python benchmarks/wmdp_shaped.py OUT.parquet [--n 1273]

Only the size and format matter for timing; the prompt is WMDP's (lm-eval's wmdp_bio template).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from unlearning.data import real  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=1273)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rows = pq.read_table(real.mmlu_path("test")).to_pylist()
    import random
    picked = random.Random(args.seed).sample(rows, args.n)
    table = pa.Table.from_pylist([{"question": r["question"], "choices": list(r["choices"]),
                                   "answer": int(r["answer"])} for r in picked])
    pq.write_table(table, args.out)
    print(f"{args.out}: {args.n} questions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
