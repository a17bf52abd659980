"""Boundary search with Optuna: ``unlearn tune`` (see :mod:`unlearning.tune.study`)."""

from unlearning.tune.space import Objective, SearchParam, parse_objectives, parse_over, task_role
from unlearning.tune.study import TuneOutcome, TuneSettings, tune

__all__ = ["Objective", "SearchParam", "TuneOutcome", "TuneSettings", "parse_objectives", "parse_over",
           "task_role", "tune"]
