"""A cheap local `unlearn run` job on a saved 4-layer tiny GPT-NeoX (no organism needed): forget and retain
corpora, a question file, and config factories (two steps per layer phase, three phases)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import yaml

from tiny_models import VOCAB, save_tiny
from unlearning.core.config import from_dict, merge, to_dict
from unlearning.runner import RunConfig


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(3, VOCAB)}" for _ in range(rng.randrange(6, 14))) for _ in range(n)]


class Job:
    """``job.config(name, **sections)``: a RunConfig; ``job.yaml(name, ...)``: the same as a file."""

    def __init__(self, root: Path):
        self.root = root
        self.runs = root / "runs"
        save_tiny(root / "model", family="gpt_neox", layers=4)
        for name, seed in (("forget", 1), ("retain", 2)):
            (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(12, seed)))
        rng = random.Random(3)
        questions = [{"question": f"w{rng.randrange(3, VOCAB)} w{rng.randrange(3, VOCAB)}",
                      "choices": [f"w{rng.randrange(3, VOCAB)}" for _ in range(4)], "answer": rng.randrange(4)}
                     for _ in range(6)]
        (root / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))

    def data(self, name: str, **sections: Any) -> dict[str, Any]:
        base = {"name": name, "output_dir": str(self.runs), "model": str(self.root / "model"),
                "data": {"forget": {"source": str(self.root / "forget.jsonl")},
                         "retain": {"source": str(self.root / "retain.jsonl")},
                         "num_train_examples": 8, "seq_len": 16},
                "train": {"batch_size": 2, "grad_accum": 1, "optimizer": {"lr": 1e-2}},
                "eval": {"tasks": [str(self.root / "q.jsonl") + ":cloze"], "reference": None, "batch_size": 4},
                "sequential": {"steps_per_layer": 2, "finetune": "full"}}
        return merge(base, sections)

    def config(self, name: str, **sections: Any) -> RunConfig:
        return from_dict(RunConfig, self.data(name, **sections))

    def yaml(self, name: str, **sections: Any) -> Path:
        path = self.root / f"{name.replace('/', '_')}.yaml"
        path.write_text(yaml.safe_dump(to_dict(self.config(name, **sections))))
        return path

    def results(self, name: str) -> dict[str, Any]:
        return json.loads((self.runs / name / "results.json").read_text())


def fail_in_second_phase(monkeypatch, exc: BaseException):
    """Make the sequential method raise ``exc`` in its second layer phase; returns the undo.
    (Patches ``loss_stages``, the hook the loop calls.)"""
    from unlearning.methods import sequential as seq
    original = seq.Sequential.loss_stages

    def loss_stages(self, model, batches, ctx):
        if ctx.phase.index == 1:
            raise exc
        return original(self, model, batches, ctx)

    monkeypatch.setattr(seq.Sequential, "loss_stages", loss_stages)
    return lambda: monkeypatch.setattr(seq.Sequential, "loss_stages", original)


def make_local_job(root: Path):
    """The run tests' factory over a `Job`: ``make(name, sequential=None, train=None) -> RunConfig`` with
    LoRA and two micro-batches per step; its runs go to ``make.root``."""
    job = Job(root)

    def make(name: str, sequential: dict | None = None, train: dict | None = None) -> RunConfig:
        return job.config(name, train={"grad_accum": 2, **(train or {})},
                          sequential={"finetune": "lora", **(sequential or {})})
    make.root = job.runs
    return make
