"""Where trials run: worker processes on this machine or submitit jobs (made by
:func:`unlearning.launch.executor` from ``--slurm.*``), at most ``jobs`` at once, one trial per job
(:func:`unlearning.tune.trials.run_trials`)."""

from __future__ import annotations

import logging
import multiprocessing
import time
from typing import Any

from unlearning.core.errors import one_line
from unlearning.tune.trials import run_trials

log = logging.getLogger(__name__)

def worker_context() -> Any:
    """Worker processes forked from a fresh server that has imported the runner (torch, transformers)
    once: no CUDA state is inherited (fork after CUDA is initialised breaks it) and no worker pays the
    imports again (spawn would)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["unlearning.tune.trials"])
    return ctx


def launch(executor: Any, calls: list[tuple[Any, ...]], jobs: int, poll: float = 1.0,
           deadline: float | None = None, waiting: Any = None) -> tuple[int, list[str]]:
    """``run_trials(*call)`` for each call, at most ``jobs`` at once, on a ``concurrent.futures`` or
    submitit executor (both have ``submit``, ``done`` and ``result``); none starts after ``deadline``
    (``time.monotonic()``). Returns the calls not started and the lost jobs' errors.

    ``waiting()``: how many enqueued trials (retries of killed ones) wait in the storage. Two workers
    that ask at the same moment can both claim the same waiting trial (Optuna's claim is not atomic
    on SQLite) and run it into one folder at once; so while trials wait, the next job is submitted
    only once the previous one has claimed its trial."""
    pending, running, lost = list(calls), [], []
    while pending or running:
        if pending and deadline is not None and time.monotonic() > deadline:
            log.info("--timeout reached: %d trials not started (run the same command again for them)", len(pending))
            pending = []
        while pending and len(running) < jobs:
            try:
                before = waiting() if waiting is not None else 0
                running.append(executor.submit(run_trials, *pending.pop(0)))
                while before and waiting() >= before and not running[-1].done():
                    time.sleep(0.1)  # the job has not claimed its waiting trial yet
            except Exception as e:  # a broken process pool takes no more work: the next round has a new one
                lost += [one_line(e)] * (len(pending) + 1)
                log.error("trial jobs could not be submitted: %s", one_line(e))
                pending = []
        finished = [j for j in running if j.done()]
        for job in finished:
            running.remove(job)
            try:
                job.result()
            except Exception as e:  # a killed worker: its trial's heartbeat stops, a later round retries it
                lost.append(one_line(e))
                log.error("a trial job was lost: %s", one_line(e))
        if not finished and running:
            time.sleep(poll)
    return len(pending), lost
