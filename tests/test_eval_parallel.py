"""Data-parallel evaluation: two CPU processes (gloo), each scoring a shard of the questions, give
exactly the single-process results; only rank 0 writes."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from gloo import free_port, join_gloo
from eval_setup import make_model, make_tokenizer

from unlearning.evaluation import evaluate
from unlearning.tasks import get_tasks
from unlearning.evaluation.parallel import data_parallel_map, shard, unshard

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
# 6 + 12 + 6 questions in letter and cloze formats, a group among them; odd shard sizes on 2 ranks.
TASKS = [f"wmdp_bio={FIXTURES / 'wmdp_bio.jsonl'}", f"wmdp_bio_robust={FIXTURES / 'wmdp_bio_robust.jsonl'}",
         f"wmdp_bio_cloze={FIXTURES / 'wmdp_bio_cloze.jsonl'}"]


@pytest.mark.parametrize("n, world", [(0, 2), (1, 2), (7, 2), (7, 3), (12, 4)])
def test_shard_and_unshard_are_inverse(n, world):
    items = list(range(n))
    parts = [shard(items, r, world) for r in range(world)]
    assert sorted(x for p in parts for x in p) == items
    assert unshard(parts, n) == items


def test_without_a_process_group_it_is_a_plain_call():
    assert data_parallel_map(lambda xs: [x * 2 for x in xs], [1, 2, 3]) == [2, 4, 6]



def _worker(rank: int, world: int, port: int, folder: str, out: str) -> None:
    join_gloo(rank, world, port)
    try:
        evaluate_module = importlib.import_module("unlearning.evaluation.evaluate")
        from unlearning.model.loading import load_model
        scored, score = [], evaluate_module._score_requests

        def counting_score(model, tokenizer, prompts, **kwargs):
            scored.extend(prompts)
            return score(model, tokenizer, prompts, **kwargs)
        evaluate_module._score_requests = counting_score
        model, tokenizer = load_model(folder, device="cpu", dtype="fp32")
        results = evaluate(model, tokenizer, get_tasks(TASKS), batch_size=3, log_samples=True)
        with open(f"{out}.rank{rank}", "w") as f:  # every rank has every result, and scored only its shard
            json.dump({"results": results, "scored": [ctx for _, ctx, _ in scored]}, f)
        from unlearning.commands.eval import main  # as under torchrun: rank 0 writes the run directory
        main(["--model", folder, "--tasks", ",".join(TASKS), "--batch-size", "3", "--device", "cpu",
              "--log-samples", "--output-dir", f"{out}.run"])
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    from unlearning.model.loading import load_model
    single = evaluate(*load_model(tmp_path / "model", device="cpu", dtype="fp32"), get_tasks(TASKS), batch_size=3,
                      log_samples=True)

    out = tmp_path / "results.json"
    torch.multiprocessing.spawn(_worker, args=(2, free_port(), str(tmp_path / "model"), str(out)), nprocs=2)
    run = Path(f"{out}.run")
    assert_same(json.loads((run / "results.json").read_text()),
                {k: {m: v for m, v in r.items() if m != "samples"} for k, r in single.items()})
    assert len((run / "samples.jsonl").read_text().splitlines()) == 24
    contexts = [s["prompt"] for r in single.values() for s in r.get("samples", [])]
    for rank in range(2):
        record = json.loads(Path(f"{out}.rank{rank}").read_text())
        assert_same(record["results"], single)
        assert record["scored"] == contexts[rank::2]


def assert_same(sharded: dict, single: dict) -> None:
    """Same tasks, metrics and per-question records (log-likelihoods to 1e-5, predictions exactly)."""
    assert sharded.keys() == single.keys()
    for name, result in single.items():
        assert sharded[name].keys() == result.keys(), name
        for key, value in result.items():
            if key == "samples":
                for a, b in zip(value, sharded[name]["samples"], strict=True):
                    assert a["id"] == b["id"] and a["prediction"] == b["prediction"]
                    assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-5)
            elif isinstance(value, float):
                assert sharded[name][key] == pytest.approx(value, abs=1e-9), (name, key)
            else:
                assert json.loads(json.dumps(sharded[name][key])) == json.loads(json.dumps(value)), (name, key)
