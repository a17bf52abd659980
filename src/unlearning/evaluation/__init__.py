"""Multiple-choice evaluation in lm-evaluation-harness's formats (letter and question/cloze)."""

from unlearning.evaluation.evaluate import evaluate
from unlearning.evaluation.scoring import LogLikelihood, loglikelihoods
from unlearning.evaluation.tasks import MCQuestion, Task, get_tasks, register_task

__all__ = ["MCQuestion", "Task", "get_tasks", "register_task", "loglikelihoods", "LogLikelihood", "evaluate"]
