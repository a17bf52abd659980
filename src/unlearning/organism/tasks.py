"""Registers the organism's tasks with the evaluation (as ``evaluation.benchmarks`` registers the
real benchmarks), so that ``evaluation`` itself knows no organism.

``organism_hazard``, ``organism_benign_bio``, ``organism_general`` (letter format) and their
``_cloze`` variants (question format) read ``$UNLEARNING_HOME/organism/<preset>/data/questions/
<domain>.jsonl``; the preset comes from the task context (``get_tasks(names, organism="small")``,
default ``tiny``) and the organism is built on first use. ``organism_hazard_cloze=PATH`` reads the
questions from a local file instead.
"""

from __future__ import annotations

from pathlib import Path

from unlearning.evaluation.prompts import FORMATS
from unlearning.evaluation.tasks import Task, TaskOptions, register_task
from unlearning.organism.build import check_built, ensure_organism
from unlearning.organism.questions import domain_task, task_name
from unlearning.organism.world import DOMAINS

DEFAULT_PRESET = "tiny"


def organism_task(domain: str, format: str, options: TaskOptions) -> Task:
    if options.data_path is not None:
        return domain_task(Path(options.data_path).expanduser(), domain, format)
    preset = options.context.get("organism") or DEFAULT_PRESET
    paths = check_built(preset)
    if not paths.is_complete():  # build.json is written last: build (or finish) the cache first
        paths = ensure_organism(preset)
    return domain_task(paths.questions(domain), domain, format)


def _loader(domain: str, format: str):
    return lambda options: organism_task(domain, format, options)


for _domain in DOMAINS:
    for _format in FORMATS:
        register_task(task_name(_domain, _format), _loader(_domain, _format))
