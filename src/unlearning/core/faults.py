"""Named fault points for the fault-injection tests.

``UNLEARNING_FAULT=<point>[:<n>]`` kills this process with SIGKILL, as an out-of-memory killer or
a preempting scheduler would (no ``finally``, no atexit), the n-th time (default the first) it
reaches :func:`fault_point` ``(point)``. Unset, a fault point costs one environment look-up.

Points: ``train_step`` (after an optimizer step and any checkpoint it writes), ``phase_end``
(after a phase's checkpoint), ``save_model`` (half-way through saving the model), ``final_eval``
(after the "after" evaluation, before the reference row), ``sweep_row`` (after a sweep row),
``attack_eval`` (after an attack's evaluation point is on disk), ``eval_batch`` (after a batch of
log-likelihoods is scored, in any evaluation).
"""

from __future__ import annotations

import os
import signal

ENV = "UNLEARNING_FAULT"
_reached: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
