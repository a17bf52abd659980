"""Perplexity of a model on a .jsonl text file ("text" column), with the project's scoring.

Each text is scored as the continuation of an empty context (lm-eval's rule: the BOS token, else
EOS, stands in for it) by :func:`unlearning.evaluation.loglikelihoods`; perplexity is
exp(-sum of log-likelihoods / number of scored tokens) over the whole file.

    python examples/capitals/perplexity.py MODEL_FOLDER [--text examples/capitals/general_text.jsonl]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from unlearning.evaluation import loglikelihoods
from unlearning.evaluation.scoring import encode_pairs

HERE = Path(__file__).resolve().parent


def read_texts(path: str | Path) -> list[str]:
    with open(path) as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def perplexity(model, tokenizer, texts: list[str], batch_size: int = 8) -> float:
    requests = [("", text) for text in texts]
    n_tokens = sum(len(cont) for _, cont in encode_pairs(tokenizer, requests))
    total = sum(loglikelihoods(model, tokenizer, requests, batch_size=batch_size, progress=False))
    return math.exp(-total / n_tokens)


def main() -> None:
    from unlearning.model.loading import load_model
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a model folder (e.g. runs/<name>/model) or the original model's path")
    parser.add_argument("--text", default=str(HERE / "general_text.jsonl"))
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, device="cpu", dtype="fp32")
    print(f"perplexity {perplexity(model, tokenizer, read_texts(args.text)):.3f}  ({args.model} on {args.text})")


if __name__ == "__main__":
    main()
