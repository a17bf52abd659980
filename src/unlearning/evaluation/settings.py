"""The evaluation settings every command shares: ``unlearn run``'s ``eval:`` section, ``unlearn
eval``'s options and a tamper attack's ``eval:`` section are this class (or a subclass that adds
its own keys or another default task list), so each can set what :func:`evaluate` takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from unlearning.core.config import param

ORGANISM_TASKS = ["organism_hazard_cloze", "organism_benign_bio_cloze", "organism_general_cloze"]


@dataclass
class EvalSettings:
    """Which tasks, and how :func:`unlearning.evaluation.evaluate` scores them."""
    tasks: list[str] = param(ORGANISM_TASKS, help="task names or local .json/.jsonl/.parquet files "
                                                  "(add :cloze for the question format)")
    batch_size: int = param(32, min=1, help="rows per forward pass (more where rows of nearly equal length "
                                             "fit the first, longest batch's tokens)")
    limit: int | None = param(None, min=1, help="first N questions of each task (for quick checks)")
    add_bos_token: bool | None = param(None, help="prepend BOS (unset: lm-eval's default for the tokenizer)")
    max_length: int | None = param(None, min=2, help="context limit in tokens (unset: the model's)")
    mixed_precision: bool | None = param(None, help="bf16 autocast (unset: on for an fp32 model on a GPU)")
    num_fewshot: int = param(0, min=0, help="solved examples before each question, as lm-eval 0.4.13 "
                                            "(MMLU family only: the subject's first k dev rows)")
    fewshot_data: str | None = param(None, help="the dev rows few-shot examples come from (MMLU columns: "
                                                "question, subject, choices, answer); needed when the "
                                                "questions are a local file (unset: the hub's dev split)")

    def evaluate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`unlearning.evaluation.evaluate` these settings fix."""
        return {"batch_size": self.batch_size, "limit": self.limit, "add_bos_token": self.add_bos_token,
                "max_length": self.max_length, "mixed_precision": self.mixed_precision,
                "num_fewshot": self.num_fewshot}

    def task_context(self) -> dict[str, Any]:
        """What :func:`unlearning.tasks.get_tasks` needs of these settings (the few-shot pool)."""
        return {"num_fewshot": self.num_fewshot, "fewshot_data": self.fewshot_data}
