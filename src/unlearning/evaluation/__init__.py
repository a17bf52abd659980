"""Multiple-choice evaluation in lm-evaluation-harness's formats (letter and question/cloze).

Task names resolve with ``unlearning.tasks.get_tasks``: the registry with every task family in it."""

from unlearning.evaluation.evaluate import evaluate
from unlearning.evaluation.scoring import LogLikelihood, loglikelihoods
from unlearning.evaluation.tasks import MCQuestion, Task, register_task

__all__ = ["MCQuestion", "Task", "register_task", "loglikelihoods", "LogLikelihood", "evaluate"]
