"""Process groups for the tests: a free port, and a rank joining a gloo group on this machine.

Ranks are spawned children (torch.multiprocessing.spawn, never fork: forking a process that has run
torch can deadlock); spawn ends the other ranks and raises if one fails, so a crashed rank never
leaves the test waiting in a collective. Each rank computes on one thread: two ranks on two cores."""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_gloo(rank: int, world: int, port: int) -> None:
    """Make this process rank ``rank`` of ``world`` (the environment torchrun would set, then the group)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))


def one_and_two_processes(worker, run_single, tmp_path_factory, world: int) -> tuple:
    """Run the same jobs as ``world`` spawned ranks (``worker(rank, port, folder)``) and as one process
    (``run_single(folder)``, on one thread like each rank); returns (one process's folder, the ranks')."""
    single, double = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    torch.multiprocessing.spawn(worker, args=(free_port(), str(double)), nprocs=world)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_single(single)
    finally:
        torch.set_num_threads(threads)
    return single, double


def spy_on_loading(rank: int, out: Path) -> None:
    """Record, each time this rank shards a model (``training.fsdp.shard_model``, which ``shard_frozen``
    calls too), which parameters were real (not meta) before, their sizes, whether the model was frozen
    (no parameter requires a gradient: a teacher), and whether this rank had read a tensor of the weights
    file (``fsdp.read_weights``) then and after: one JSON line per model in ``out/spy-rank<N>.jsonl``."""
    from unlearning.training import fsdp
    shard, read = fsdp.shard_model, fsdp.read_weights
    reads: list[str] = []

    def read_weights(path, names=None):
        reads.append(str(path))
        return read(path, names)

    def shard_model(model, originals, device, weights=None):
        params = list(model.named_parameters())
        record = {"real": [n for n, p in params if not p.is_meta], "meta": sum(p.numel() for _, p in params if p.is_meta),
                  "total": sum(p.numel() for _, p in params), "reads_before": len(reads),
                  "frozen": not any(p.requires_grad for _, p in params)}
        shard(model, originals, device, weights)
        local = [p.to_local() for p in model.parameters()]
        record.update(reads=len(reads), materialised=all(not t.is_meta for t in local),
                      local=sum(t.numel() for t in local))
        with open(Path(out) / f"spy-rank{rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    fsdp.read_weights, fsdp.shard_model = read_weights, shard_model


def check_sharded_loading(folder: Path, names: list[str], world: int, lora) -> None:
    """What :func:`spy_on_loading` saw, one model per name in ``names``: on every rank the parameters
    were meta before sharding but for LoRA adapters (``lora(name)``: the model has them), each rank then
    holds about 1/``world`` of every parameter, and rank 0 alone read the weights file, once."""
    ranks = [[json.loads(line) for line in (Path(folder) / f"spy-rank{r}.jsonl").read_text().splitlines()]
             for r in range(world)]
    assert all(len(records) == len(names) for records in ranks), [len(r) for r in ranks]
    for name, *records in zip(names, *ranks):
        for record in records:
            assert record["materialised"], name
            if lora(name):
                assert record["real"] and all("lora_" in n for n in record["real"]), name
            else:
                assert record["real"] == [], name
            assert abs(record["local"] - record["total"] / world) <= 0.01 * record["total"], (name, record)
            assert record["real"] == records[0]["real"], name
        assert all(r["reads"] == 0 for r in records[1:]), name
        assert records[0]["reads"] == records[0]["reads_before"] + 1, name


def curve(folder: Path) -> list[dict]:
    """A run's ``metrics.jsonl``, one dict per step."""
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def assert_same_curve(single: list[dict], double: list[dict], label: str = "", extra: tuple[str, ...] = ()) -> list[str]:
    """One process's and several processes' curves step by step: the same steps and phases, and every
    loss term, the gradient norm and each of ``extra`` present at a step within rtol 1e-4 (abs 1e-7).
    Returns the loss terms compared."""
    import pytest
    assert len(single) == len(double) > 0, label
    terms = [k for k in single[0] if k.endswith(("_term", "_loss"))] + ["grad_norm"]
    for a, b in zip(single, double):
        assert (a["step"], a.get("phase")) == (b["step"], b.get("phase")), label
        for k in terms + [k for k in extra if k in a]:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-7), (label, a["step"], k)
    return terms

