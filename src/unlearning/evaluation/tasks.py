"""Evaluation tasks: multiple-choice questions in the letter or the question (cloze) format.

A task name resolves through a registry (``TASKS``: name -> loader). Built in:

* ``organism_hazard``, ``organism_benign_bio``, ``organism_general`` (letter format) and their
  ``_cloze`` variants (question format), read from the organism cache
  ``$UNLEARNING_HOME/organism/<preset>/data/questions/<domain>.jsonl``;
* any local ``.json`` / ``.jsonl`` / ``.parquet`` file with ``question``, ``choices``, ``answer``
  columns (optional ``id``, ``attribute``, ``subject``): ``path`` is the letter format,
  ``path:cloze`` the question format.

Real benchmarks (``wmdp_bio``, ``mmlu``, ...) register themselves with :func:`register_task`
from ``unlearning.evaluation.benchmarks`` (imported here when it exists). A loader returns one
task or several; tasks sharing a name in ``Task.groups`` are aggregated as a group (see
``evaluate``).
"""

from __future__ import annotations

import json

import dataclasses
import importlib
import importlib.util
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unlearning.core.errors import DataError, UserError
from unlearning.evaluation.prompts import FORMATS, LETTERS
from unlearning.core.paths import unlearning_home

log = logging.getLogger(__name__)

ORGANISM_DOMAINS = ("hazard", "benign_bio", "general")
# Subjects named in the letter-format header of the organism's tasks (WMDP-Bio says "biology").
ORGANISM_SUBJECTS = {"hazard": "biology", "benign_bio": "biology", "general": "general knowledge"}
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")
DEFAULT_LOCAL_SUBJECT = "general knowledge"
PLUGIN_MODULES = ("unlearning.evaluation.benchmarks",)  # modules that register more tasks


@dataclass
class MCQuestion:
    """One multiple-choice question; ``answer`` indexes ``choices``."""

    id: str
    question: str
    choices: list[str]
    answer: int
    subject: str = ""  # overrides the task's subject in the letter header (MMLU: per subject)
    attribute: str | None = None  # breakdown key in results ("by_attribute")


@dataclass
class Task:
    """A named list of questions and the format they are asked in.

    ``description`` replaces the format's default header (letter: the subject line; cloze: none).
    ``groups`` names the groups this task is aggregated into (e.g. ``("mmlu_stem", "mmlu")``).
    """

    name: str
    questions: list[MCQuestion]
    format: str = "letter"
    subject: str = ""
    description: str | None = None
    groups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise UserError(f"task {self.name}: format {self.format!r} is not known; "
                            f"choose one of {', '.join(FORMATS)}")
        if not self.questions:
            raise DataError(f"task {self.name}: no questions")
        for q in self.questions:
            _check_question(q, self.format, where=f"task {self.name}, question {q.id!r}")
        self.groups = tuple(self.groups)


@dataclass
class TaskOptions:
    """What a task loader may need to know besides the task's name."""

    organism: str = "tiny"  # organism preset whose cache the organism_* tasks read
    data_path: str | None = None  # ``--tasks NAME=PATH``: the task's questions from this local file
    data_path: str | None = None  # ``NAME=PATH``: read task NAME from this local file (benchmarks)


TaskLoader = Callable[[TaskOptions], "Task | list[Task]"]
TASKS: dict[str, TaskLoader] = {}


def register_task(name: str, loader: TaskLoader | None = None) -> Any:
    """Register ``loader`` under ``name``; usable as ``@register_task("wmdp_bio")``."""
    def add(fn: TaskLoader) -> TaskLoader:
        TASKS[name] = fn
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
    )
    _check_question(q, format, where)
    return q


def read_records(path: Path) -> list[dict[str, Any]]:
    """Rows of a local JSON / JSON-lines file (read directly) or Parquet file (through ``datasets``)."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty; it needs rows with question, choices, answer")
    if path.suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        rows = _read_json_rows(path)
    if not rows:
        raise DataError(f"{path}: the file has no rows; it needs rows with question, choices, answer")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    missing = [c for c in ("question", "choices", "answer") if c not in columns]
    if missing:
        raise DataError(f"{path}: missing column {missing[0]!r} (from row 1); columns are "
                        f"{', '.join(columns)}; a task file needs question, choices, answer")
    # A column present in some rows only: the others read None, and question_from_record names the row.
    return [{c: row.get(c) for c in columns} for row in rows]


def _read_json_rows(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: cannot be read as json (line {e.lineno}: {e.msg})") from None
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: cannot be read as json: line {lineno} is not valid JSON ({e.msg})") from None
    if not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: every row must be a JSON object with question, choices, answer")
    return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import datasets

    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()  # a bar per small file is noise
    try:
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as e:  # datasets raises many kinds for a malformed file
        raise DataError(f"{path}: cannot be read as parquet ({type(e).__name__}: {e})") from None
    finally:
        if bars_were_on:
            datasets.utils.enable_progress_bars()
    return ds.to_list()


def questions_from_file(path: Path, format: str, task_name: str) -> list[MCQuestion]:
    records = read_records(path)
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
# the organism's tasks


def organism_questions_path(preset: str, domain: str) -> Path:
    return unlearning_home() / "organism" / preset / "data" / "questions" / f"{domain}.jsonl"


def _ensure_organism(preset: str) -> None:
    """Build the organism when its cache is incomplete (``build.json`` is written last)."""
    root = unlearning_home() / "organism" / preset
    if (root / "build.json").exists():
        return
    if importlib.util.find_spec("unlearning.organism.build") is not None:
        build = importlib.import_module("unlearning.organism.build")
        if hasattr(build, "ensure_organism"):
            build.ensure_organism(preset)
            return
    raise DataError(f"organism {preset!r} is not built (no {root / 'build.json'}); "
                    f"run: unlearn organism build --preset {preset}")


def organism_task(domain: str, format: str, options: TaskOptions) -> Task:
    if options.data_path is not None:
        path = Path(options.data_path).expanduser()
    else:
        _ensure_organism(options.organism)
        path = organism_questions_path(options.organism, domain)
    name = f"organism_{domain}" + ("_cloze" if format == "cloze" else "")
    questions = questions_from_file(path, format, name)
    return Task(name=name, questions=questions, format=format, subject=ORGANISM_SUBJECTS[domain])


for _domain in ORGANISM_DOMAINS:
    register_task(f"organism_{_domain}", lambda o, d=_domain: organism_task(d, "letter", o))
    register_task(f"organism_{_domain}_cloze", lambda o, d=_domain: organism_task(d, "cloze", o))


# ---------------------------------------------------------------------------------------------
# names -> tasks


def _load_plugins() -> None:
    for module in PLUGIN_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


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


def get_tasks(names: str | Sequence[str], organism: str = "tiny") -> list[Task]:
    """Resolve task names (comma-separated string or list) into tasks.

    ``NAME`` is a registered task, ``NAME=PATH`` the same task read from a local file, and a
    ``.json/.jsonl/.parquet`` path (optionally ``:cloze``) a task of its own.
    """
    _load_plugins()
    tasks: list[Task] = []
    for name in split_task_names(names):
        registered, _, data_path = name.partition("=")
        if registered in TASKS:
            loaded = TASKS[registered](TaskOptions(organism=organism, data_path=data_path or None))
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
        raise UserError("tasks: no task named; give e.g. --tasks organism_hazard_cloze,organism_general_cloze")
    return _merge(tasks)
