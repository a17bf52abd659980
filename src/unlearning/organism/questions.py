"""The organism's question sets as evaluation tasks: one place for the domains' subjects and the
``organism_<domain>[_cloze]`` names, shared by the corpus writer (its letter-format prompts), the
build's quality check (on files of a cache still being built) and the registered task loaders."""

from __future__ import annotations

from pathlib import Path

from unlearning.evaluation.tasks import Task, questions_from_file

# Subjects named in the letter-format header of the organism's tasks (WMDP-Bio says "biology").
SUBJECTS = {"hazard": "biology", "benign_bio": "biology", "general": "general knowledge"}


def task_name(domain: str, format: str) -> str:
    """``organism_hazard`` (letter format), ``organism_hazard_cloze`` (question format)."""
    return f"organism_{domain}" + ("_cloze" if format == "cloze" else "")


def domain_task(path: Path, domain: str, format: str, name: str | None = None) -> Task:
    """The task of one domain's question file (``name`` defaults to the registered name)."""
    name = name or task_name(domain, format)
    return Task(name=name, questions=questions_from_file(path, format, name), format=format,
                subject=SUBJECTS[domain])
