"""Process groups for the tests: a free port, and a rank joining a gloo group on this machine.

Ranks are spawned children (torch.multiprocessing.spawn, never fork: forking a process that has run
torch can deadlock); spawn ends the other ranks and raises if one fails, so a crashed rank never
leaves the test waiting in a collective. Each rank computes on one thread: two ranks on two cores."""

from __future__ import annotations

import datetime
import os
import socket

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
