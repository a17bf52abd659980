"""A local `unlearn run` job on a saved tiny GPT-NeoX model, shared by the run tests (no organism needed)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tiny_models import VOCAB, save_tiny
from unlearning.core.config import from_dict
from unlearning.runner import RunConfig


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(3, VOCAB)}" for _ in range(rng.randrange(6, 14))) for _ in range(n)]


def make_local_job(root: Path):
    """Save a tiny model, forget/retain corpora and a question file under ``root``; return a factory
    ``make(name, sequential=None, train=None) -> RunConfig`` whose runs go to ``make.root``."""
    save_tiny(root / "model", family="gpt_neox", layers=4)
    for name, seed in (("forget", 1), ("retain", 2)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(12, seed)))
    rng = random.Random(3)
    questions = [{"question": f"w{rng.randrange(3, VOCAB)} w{rng.randrange(3, VOCAB)}",
                  "choices": [f"w{rng.randrange(3, VOCAB)}" for _ in range(4)], "answer": rng.randrange(4)}
                 for _ in range(6)]
    (root / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))

    def make(name: str, sequential: dict | None = None, train: dict | None = None) -> RunConfig:
        return from_dict(RunConfig, {
            "name": name, "output_dir": str(root / "runs"), "model": str(root / "model"),
            "data": {"forget": {"source": str(root / "forget.jsonl")},
                     "retain": {"source": str(root / "retain.jsonl")},
                     "num_train_examples": 8, "seq_len": 16},
            "train": {"batch_size": 2, "grad_accum": 2, "optimizer": {"lr": 1e-2}, **(train or {})},
            "eval": {"tasks": [str(root / "q.jsonl") + ":cloze"], "reference": None, "batch_size": 4},
            "sequential": {"steps_per_layer": 2, **(sequential or {})}})
    make.root = root / "runs"
    return make
