"""The complete task registry: every task family registered, for whatever evaluates by name.

``unlearning.evaluation`` knows only the registry and local question files; task families register
themselves when imported: the real benchmarks (``unlearning.evaluation.benchmarks``) and the
organism's question sets (``unlearning.organism.tasks``). Importing this module imports them all,
so the runner, the commands and the attacks resolve names with ``unlearning.tasks.get_tasks``
and see every task, and an unknown name lists them all.
"""

from __future__ import annotations

import unlearning.evaluation.benchmarks  # noqa: F401  (registers wmdp_*, mmlu*)
import unlearning.organism.tasks  # noqa: F401  (registers organism_*)
from unlearning.evaluation.tasks import (
    FEWSHOT_TASKS,
    TASKS,
    TaskOptions,
    check_fewshot_names,
    get_tasks,
    known_tasks_summary,
    split_task_names,
)

__all__ = ["FEWSHOT_TASKS", "TASKS", "TaskOptions", "check_fewshot_names", "get_tasks", "known_tasks_summary",
           "split_task_names"]
