"""Evaluation tasks: multiple-choice questions in the letter or the question (cloze) format.

A task name resolves through a registry (``TASKS``: name -> loader). Built in: any local
``.json`` / ``.jsonl`` / ``.parquet`` file with ``question``, ``choices``, ``answer`` columns
(optional ``id``, ``attribute``, ``subject``): ``path`` is the letter format, ``path:cloze`` the
question format.

Named tasks register themselves with :func:`register_task`: the real benchmarks (``wmdp_bio``,
``mmlu``, ...) in ``unlearning.evaluation.benchmarks``, other task families in their own packages.
This module imports none of them (they import it); ``unlearning.tasks`` imports them all and is
what commands use. A loader returns one task or several; tasks sharing a name in
``Task.groups`` are aggregated as a group (see ``evaluate``).

Few-shot: a task registered with ``fewshot=True`` (the MMLU family) fills ``Task.fewshot``, its
pool of solved examples, when the context asks for ``num_fewshot > 0``; :func:`get_tasks` rejects
``num_fewshot > 0`` for any other task before loading anything, and a pool smaller than
``num_fewshot`` once loaded.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unlearning.core.errors import DataError, UserError
from unlearning.data.files import read_rows
from unlearning.evaluation.prompts import FORMATS, LETTERS

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")
DEFAULT_LOCAL_SUBJECT = "general knowledge"


@dataclass
class MCQuestion:
    """One multiple-choice question; ``answer`` indexes ``choices``."""

    id: str
    question: str
    choices: list[str]
    answer: int
    subject: str = ""  # overrides the task's subject in the letter header (MMLU: per subject)
    attribute: str | None = None  # breakdown key in results ("by_attribute")
    entity: str | None = None  # what the question is about (the latent probe splits questions by it)


@dataclass
class Task:
    """A named list of questions and the format they are asked in.

    ``description`` replaces the format's default header (letter: the subject line; cloze: none).
    ``groups`` names the groups this task is aggregated into (e.g. ``("mmlu_stem", "mmlu")``).
    ``fewshot`` is the pool of solved examples, in order (MMLU: the subject's dev rows); a
    ``k``-shot evaluation shows its first ``k``. ``None``: not loaded, or the task has none.
    """

    name: str
    questions: list[MCQuestion]
    format: str = "letter"
    subject: str = ""
    description: str | None = None
    groups: tuple[str, ...] = ()
    fewshot: list[MCQuestion] | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise UserError(f"task {self.name}: format {self.format!r} is not known; "
                            f"choose one of {', '.join(FORMATS)}")
        if not self.questions:
            raise DataError(f"task {self.name}: no questions")
        for q in self.questions:
            _check_question(q, self.format, where=f"task {self.name}, question {q.id!r}")
        for q in self.fewshot or ():
            _check_question(q, self.format, where=f"task {self.name}, few-shot example {q.id!r}")
        self.groups = tuple(self.groups)


@dataclass
class TaskOptions:
    """What a task loader may need to know besides the task's name.

    ``context`` is what the caller passed to :func:`get_tasks` as keywords; the evaluation does not
    interpret it, so each plugin's loaders read their own keys from it."""

    data_path: str | None = None  # ``--tasks NAME=PATH``: the task's questions from this local file
    context: dict[str, Any] = field(default_factory=dict)


TaskLoader = Callable[[TaskOptions], "Task | list[Task]"]
TASKS: dict[str, TaskLoader] = {}
FEWSHOT_TASKS: set[str] = set()  # registered names whose loader fills Task.fewshot (lm-eval's way)


def register_task(name: str, loader: TaskLoader | None = None, *, fewshot: bool = False) -> Any:
    """Register ``loader`` under ``name``; usable as ``@register_task("wmdp_bio")``.

    ``fewshot=True`` declares that the loader fills ``Task.fewshot`` when
    ``options.context["num_fewshot"] > 0``, exactly as lm-eval picks that task's examples."""
    def add(fn: TaskLoader) -> TaskLoader:
        TASKS[name] = fn
        (FEWSHOT_TASKS.add if fewshot else FEWSHOT_TASKS.discard)(name)
        return fn
    return add(loader) if loader is not None else add


# ---------------------------------------------------------------------------------------------
# question records -> MCQuestion, with errors that name the file and row


def _check_question(q: MCQuestion, format: str, where: str) -> None:
    if not isinstance(q.question, str) or not q.question.strip():
        raise DataError(f"{where}: 'question' must be a non-empty string")
    if not isinstance(q.choices, (list, tuple)) or not all(isinstance(c, str) for c in q.choices):
        raise DataError(f"{where}: 'choices' must be a list of strings, got {q.choices!r}")
    if format == "letter" and len(q.choices) != len(LETTERS):
        raise DataError(f"{where}: the letter format needs exactly {len(LETTERS)} choices (A-D), "
                        f"got {len(q.choices)}; use the cloze format for other counts")
    if len(q.choices) < 2:
        raise DataError(f"{where}: needs at least 2 choices, got {len(q.choices)}")
    if isinstance(q.answer, bool) or not isinstance(q.answer, int):
        raise DataError(f"{where}: 'answer' must be an integer index into choices, got {q.answer!r}")
    if not 0 <= q.answer < len(q.choices):
        raise DataError(f"{where}: answer index {q.answer} is out of range for {len(q.choices)} choices "
                        f"(valid: 0..{len(q.choices) - 1})")


def question_from_record(record: dict[str, Any], row: int, source: str, format: str,
                         default_id: str) -> MCQuestion:
    """Build and check one question; ``row`` is 1-based and appears in every error."""
    where = f"{source}: row {row}"
    for column in ("question", "choices", "answer"):
        if record.get(column) is None:
            raise DataError(f"{where}: missing '{column}'; a question needs question, choices and answer")
    answer = record["answer"]
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)
    choices = record["choices"]
    q = MCQuestion(
        id=str(record["id"]) if record.get("id") is not None else default_id,
        question=record["question"],
        choices=list(choices) if isinstance(choices, (list, tuple)) else choices,
        answer=answer,
        subject=str(record.get("subject") or ""),
        attribute=None if record.get("attribute") is None else str(record["attribute"]),
        entity=None if record.get("entity") is None else str(record["entity"]),
    )
    _check_question(q, format, where)
    return q


TASK_COLUMNS = ("question", "choices", "answer")
TASK_FILE_FIX = "a task file has rows with question, choices, answer (optional id, subject, attribute)"


def questions_from_file(path: Path, format: str, task_name: str) -> list[MCQuestion]:
    records = read_rows(path, columns=TASK_COLUMNS, fix=TASK_FILE_FIX, suffixes=LOCAL_SUFFIXES)
    return [question_from_record(rec, i + 1, str(path), format, default_id=f"{task_name}/{i}")
            for i, rec in enumerate(records)]


def local_file_task(spec: str) -> Task:
    """``path`` (letter format) or ``path:cloze`` (question format)."""
    path_text, format = (spec[:-len(":cloze")], "cloze") if spec.endswith(":cloze") else (spec, "letter")
    path = Path(path_text).expanduser()
    questions = questions_from_file(path, format, spec)
    subject = next((q.subject for q in questions if q.subject), DEFAULT_LOCAL_SUBJECT)
    return Task(name=spec, questions=questions, format=format, subject=subject)


def is_local_file_spec(name: str) -> bool:
    base = name[:-len(":cloze")] if name.endswith(":cloze") else name
    return base.endswith(LOCAL_SUFFIXES)


# ---------------------------------------------------------------------------------------------
# names -> tasks


def known_tasks_summary(family_size: int = 10) -> str:
    """Registered names, a large family (e.g. the 61 ``mmlu_*`` tasks) shown as one entry."""
    families: dict[str, list[str]] = {}
    for name in sorted(TASKS):
        families.setdefault(name.split("_", 1)[0], []).append(name)
    parts = []
    for root, members in families.items():
        if len(members) <= family_size:
            parts += members
        else:
            rest = [m for m in members if m != root]
            parts += ([root] if root in members else []) + [f"{root}_* ({len(rest)} tasks)"]
    return ", ".join(parts)


def split_task_names(names: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a,b", "c"]`` -> ``["a", "b", "c"]``."""
    items = [names] if isinstance(names, str) else list(names)
    return [n.strip() for item in items for n in str(item).split(",") if n.strip()]


def _merge(tasks: list[Task]) -> list[Task]:
    """One task per name; a task asked for twice (e.g. via ``mmlu`` and ``mmlu_stem``) keeps the
    union of its groups."""
    by_name: dict[str, Task] = {}
    for task in tasks:
        if task.name in by_name:
            kept = by_name[task.name]
            kept.groups = kept.groups + tuple(g for g in task.groups if g not in kept.groups)
        else:
            by_name[task.name] = dataclasses.replace(task, groups=tuple(task.groups))
    return list(by_name.values())


def fewshot_families() -> str:
    """The few-shot task names, a large family shown as one entry (for error messages)."""
    roots = sorted({n.split("_", 1)[0] for n in FEWSHOT_TASKS})
    return ", ".join(f"{r}, {r}_*" if r in FEWSHOT_TASKS else f"{r}_*" for r in roots) or "none registered"


def check_fewshot_names(names: Sequence[str], num_fewshot: int) -> None:
    """``num_fewshot > 0`` is only for tasks with lm-eval's few-shot form: checked by name, before
    any data is read."""
    if num_fewshot <= 0:
        return
    for name in names:
        registered = name.partition("=")[0]
        if registered not in FEWSHOT_TASKS:
            raise UserError(f"num_fewshot: {num_fewshot} is set, but task {name!r} has no few-shot form "
                            f"matching lm-eval's (only {fewshot_families()}); set num_fewshot 0 or "
                            f"evaluate it in a separate command")


def check_fewshot_pool(task: Task, num_fewshot: int) -> None:
    """The task holds at least ``num_fewshot`` examples (lm-eval stops there too)."""
    if num_fewshot <= 0:
        return
    if task.fewshot is None:
        raise UserError(f"num_fewshot: task {task.name} has no few-shot examples loaded; load it with "
                        f"get_tasks(..., num_fewshot={num_fewshot}) (only {fewshot_families()} have them)")
    if len(task.fewshot) < num_fewshot:
        raise DataError(f"num_fewshot: task {task.name} has {len(task.fewshot)} few-shot example(s), fewer "
                        f"than {num_fewshot}; give a fewshot_data file with at least {num_fewshot} dev rows "
                        f"for it, or lower num_fewshot")


def get_tasks(names: str | Sequence[str], **context: Any) -> list[Task]:
    """Resolve task names (comma-separated string or list) into tasks.

    ``NAME`` is a registered task, ``NAME=PATH`` the same task read from a local file, and a
    ``.json/.jsonl/.parquet`` path (optionally ``:cloze``) a task of its own. ``context`` reaches
    every loader as ``TaskOptions.context`` (e.g. which model family's cache a plugin's tasks
    read); loaders ignore keys they do not use. Only registered tasks are known: import
    ``unlearning.tasks`` for the complete registry. ``num_fewshot=k`` (context) loads each task's
    few-shot pool and is refused for tasks without one (see :func:`check_fewshot_names`).
    """
    tasks: list[Task] = []
    num_fewshot = int(context.get("num_fewshot") or 0)
    check_fewshot_names(split_task_names(names), num_fewshot)
    for name in split_task_names(names):
        registered, _, data_path = name.partition("=")
        if registered in TASKS:
            loaded = TASKS[registered](TaskOptions(data_path=data_path or None, context=context))
            tasks.extend(loaded if isinstance(loaded, list) else [loaded])
        elif "=" in name and not Path(name).exists():  # NAME=PATH with a NAME that is not a task
            raise UserError(f"tasks: {name!r}: unknown task {registered!r}; known tasks: {known_tasks_summary()}")
        elif is_local_file_spec(name):
            tasks.append(local_file_task(name))
        else:
            known = known_tasks_summary()
            raise UserError(f"tasks: unknown task {registered!r}; known tasks: {known}; or a local "
                            f"{'/'.join(LOCAL_SUFFIXES)} file with question, choices, answer columns "
                            f"(add :cloze for the question format)")
    if not tasks:
        raise UserError(f"tasks: no task named; give one or more of: {known_tasks_summary()}")
    for task in tasks:
        check_fewshot_pool(task, num_fewshot)
    return _merge(tasks)
