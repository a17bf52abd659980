"""The real benchmarks: WMDP-Bio, its Robust subset, the WMDP-Bio cloze set, and MMLU.

Each is registered as a task (``unlearn eval --tasks wmdp_bio_robust,mmlu,wmdp_bio_cloze``) and
built exactly as lm-evaluation-harness builds it (zero-shot, its subject header, " A".." D"):

=========================  ===================================================  ==========
task                       data (hub id @ pinned revision, config, split)        format
=========================  ===================================================  ==========
``wmdp_bio``               cais/wmdp, wmdp-bio, test (1,273)                     letter
``wmdp_bio_robust``        EleutherAI/wmdp_bio_robust_mcqa, 6 configs, robust    letter
                           (868; group of ``wmdp_bio_robust_<config>``)
``wmdp_bio_cloze``         EleutherAI/wmdp_bio_cloze, cloze_compatible (1,076)   cloze
``wmdp_bio_cloze_verified``  the same, with deep-ignorance's lm-eval header      cloze
``mmlu``                   cais/mmlu, 57 subject configs, test (14,042)          letter
``mmlu_stem`` (and the other lm-eval categories), ``mmlu_<subject>``
=========================  ===================================================  ==========

Groups (``mmlu``, ``mmlu_stem``, ``wmdp_bio_robust``) are aggregated as lm-eval's
``weight_by_size: true`` does: the mean over all their questions (see ``evaluate``).

Local data: ``--tasks NAME=/path/file.parquet`` (or ``.jsonl`` / ``.json``, or a folder of
them), or ``$UNLEARNING_DATA_DIR/<data name>.parquet``, in the hub dataset's columns. The MMLU
family (``mmlu``, ``mmlu_stem``, ``mmlu_<subject>``) reads one file named ``mmlu`` with a
``subject`` column (the schema of cais/mmlu's ``all`` config); ``wmdp_bio_robust`` may carry a
``subset`` column naming the config of each row. See docs/benchmarks.md.

Few-shot (``num_fewshot=k``, the MMLU family only, as lm-eval 0.4.13's MMLU tasks: ``fewshot_split:
dev``, sampler ``first_n``): each subject's prompt shows the first k rows of that subject's dev
split, in file order. The dev rows come from ``fewshot_data`` (a file or folder in the same
columns), else, when the questions come from the hub, the hub's ``dev`` split, else
``$UNLEARNING_DATA_DIR/mmlu_dev.parquet`` beside ``mmlu.parquet``. Local questions without a dev file
are refused: the hub's dev rows beside someone's own questions would be a silent mix.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unlearning.core.errors import DataError, UserError
from unlearning.evaluation.tasks import Task, TaskOptions, question_from_record, register_task
from unlearning.data.files import read_rows, require_columns
from unlearning.data.hub import LOCAL_SUFFIXES, HubDataset, load_hub_dataset, local_override

MC_COLUMNS = ("question", "choices", "answer")

# Pinned dataset revisions (hub commits). None: no pin is known here; set one with
# UNLEARNING_REVISION_<NAME> (e.g. UNLEARNING_REVISION_WMDP_BIO_ROBUST=<sha>) for reproducible runs.
REVISIONS: dict[str, str | None] = {
    "wmdp_bio": "7125571f22f032c56415e7980f48d877dd830ff8",
    "wmdp_bio_robust": None,
    "wmdp_bio_cloze": None,
    "mmlu": "c30699e8356da336a370243923dbaf21066bb9fe",
}

# lm-evaluation-harness 0.4.x, lm_eval/tasks/mmlu/_generate_configs.py and default/mmlu_*.yaml
# (tag mmlu_<category>_tasks): subject -> category. 19 STEM subjects (anatomy included).
MMLU_SUBJECTS: dict[str, str] = {
    "abstract_algebra": "stem", "anatomy": "stem", "astronomy": "stem", "business_ethics": "other",
    "clinical_knowledge": "other", "college_biology": "stem", "college_chemistry": "stem",
    "college_computer_science": "stem", "college_mathematics": "stem", "college_medicine": "other",
    "college_physics": "stem", "computer_security": "stem", "conceptual_physics": "stem",
    "econometrics": "social_sciences", "electrical_engineering": "stem", "elementary_mathematics": "stem",
    "formal_logic": "humanities", "global_facts": "other", "high_school_biology": "stem",
    "high_school_chemistry": "stem", "high_school_computer_science": "stem",
    "high_school_european_history": "humanities", "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences", "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem", "high_school_microeconomics": "social_sciences",
    "high_school_physics": "stem", "high_school_psychology": "social_sciences",
    "high_school_statistics": "stem", "high_school_us_history": "humanities",
    "high_school_world_history": "humanities", "human_aging": "other", "human_sexuality": "social_sciences",
    "international_law": "humanities", "jurisprudence": "humanities", "logical_fallacies": "humanities",
    "machine_learning": "stem", "management": "other", "marketing": "other", "medical_genetics": "other",
    "miscellaneous": "other", "moral_disputes": "humanities", "moral_scenarios": "humanities",
    "nutrition": "other", "philosophy": "humanities", "prehistory": "humanities",
    "professional_accounting": "other", "professional_law": "humanities", "professional_medicine": "other",
    "professional_psychology": "social_sciences", "public_relations": "social_sciences",
    "security_studies": "social_sciences", "sociology": "social_sciences", "us_foreign_policy": "social_sciences",
    "virology": "other", "world_religions": "humanities",
}
MMLU_CATEGORIES = ("stem", "other", "social_sciences", "humanities")  # lm-eval's order in _mmlu.yaml

WMDP_BIO_ROBUST_SUBSETS = ("bioweapons_and_bioterrorism", "dual_use_virology",
                           "enhanced_potential_pandemic_pathogens", "expanding_access_to_threat_vectors",
                           "reverse_genetics_and_easy_editing", "viral_vector_research")

CLOZE_VERIFIED_DESCRIPTION = "Complete the following biology questions with the correct answer.\n\n"


@dataclass(frozen=True)
class Benchmark:
    """A multiple-choice dataset on the hub and how it is asked.

    ``subsets`` are hub configs read one by one, each a subtask named ``<prefix><subset>``;
    a local file names each row's subset in ``subset_column``.
    """

    data: str  # data name: the UNLEARNING_DATA_DIR file stem and the REVISIONS key
    hub_id: str
    split: str
    format: str
    config: str | None = None
    subsets: tuple[str, ...] = ()
    subset_column: str | None = None
    subtask_prefix: str = ""
    subject: str = ""
    description: str | None = None
    columns: tuple[str, ...] = MC_COLUMNS  # the columns read (others, e.g. the cloze set's prompt, are ignored)
    revision_key: str = ""  # the REVISIONS key when not ``data`` (another split of the same dataset)

    def hub(self, subset: str | None = None) -> HubDataset:
        return HubDataset(self.hub_id, subset or self.config, self.split, revision_of(self.revision_key or self.data))


WMDP_BIO = Benchmark("wmdp_bio", "cais/wmdp", "test", "letter", config="wmdp-bio", subject="biology")
WMDP_BIO_ROBUST = Benchmark("wmdp_bio_robust", "EleutherAI/wmdp_bio_robust_mcqa", "robust", "letter",
                            subsets=WMDP_BIO_ROBUST_SUBSETS, subset_column="subset",
                            subtask_prefix="wmdp_bio_robust_", subject="biology")
WMDP_BIO_CLOZE = Benchmark("wmdp_bio_cloze", "EleutherAI/wmdp_bio_cloze", "cloze_compatible", "cloze")
MMLU = Benchmark("mmlu", "cais/mmlu", "test", "letter", subsets=tuple(MMLU_SUBJECTS), subset_column="subject",
                 subtask_prefix="mmlu_", columns=("question", "subject", "choices", "answer"))
# the few-shot pool: the same dataset's dev split (5 rows per subject), at the same revision
MMLU_DEV = dataclasses.replace(MMLU, data="mmlu_dev", split="dev", revision_key="mmlu")
FEWSHOT_DATA_HINT = ("a dev file in MMLU's columns (question, subject, choices, answer), e.g. "
                     "$UNLEARNING_HOME/real/mmlu/dev.parquet")


def revision_of(data: str) -> str | None:
    return os.environ.get(f"UNLEARNING_REVISION_{data.upper()}") or REVISIONS.get(data)


# ---------------------------------------------------------------------------------------------
# rows: a local file, $UNLEARNING_DATA_DIR, or the hub


def _local_hint(bench: Benchmark) -> str:
    return (f"--tasks {bench.data}=/path/file.parquet, or $UNLEARNING_DATA_DIR/{bench.data}.parquet, with columns "
            f"{', '.join(bench.columns)}")


@functools.lru_cache(maxsize=None)
def _hub_rows(spec: HubDataset, what: str, local_hint: str) -> tuple[dict[str, Any], ...]:
    return tuple(load_hub_dataset(spec, what, local_hint).to_list())


@functools.lru_cache(maxsize=8)
def _local_rows(path: str, mtime: float, what: str) -> tuple[dict[str, Any], ...]:
    return tuple(read_rows(path, what, suffixes=LOCAL_SUFFIXES))


def benchmark_rows(bench: Benchmark, data_path: str | Path | None = None,
                   subsets: Sequence[str] | None = None) -> dict[str | None, list[dict[str, Any]]]:
    """Rows per subset (``None``: the whole set, for a benchmark without subsets or a local file
    without a subset column). ``subsets`` limits which are read from the hub."""
    what = f"task {bench.data}"
    path = Path(data_path).expanduser() if data_path else local_override(bench.data)
    if path is not None:
        rows = list(_local_rows(str(path), path.stat().st_mtime if path.exists() else 0.0, what))
        source = str(path)
        require_columns(rows, bench.columns, what, source, fix="the schema is in docs/benchmarks.md")
        column = bench.subset_column if bench.subset_column and bench.subset_column in rows[0] else None
        column = column or ("_file" if bench.subsets and "_file" in rows[0] else None)
        if column is None:
            return {None: rows}
        by_subset: dict[str | None, list[dict[str, Any]]] = {}
        for row in rows:
            by_subset.setdefault(str(row[column]), []).append(row)
        unknown = sorted(set(by_subset) - set(bench.subsets))
        if unknown:
            raise DataError(f"{what}: {source} names unknown {bench.subset_column or 'subset'} value(s) "
                            f"{', '.join(map(repr, unknown[:5]))}; known: {', '.join(bench.subsets)}")
        return by_subset
    hint = _local_hint(bench)
    if not bench.subsets:
        return {None: list(_hub_rows(bench.hub(), what, hint))}
    return {s: list(_hub_rows(bench.hub(s), what, hint)) for s in (subsets or bench.subsets)}


def _questions(rows: list[dict[str, Any]], bench: Benchmark, task_name: str, source: str):
    return [question_from_record({**row, "subject": ""}, i + 1, source, bench.format, default_id=f"{task_name}/{i}")
            for i, row in enumerate(rows)]


def _task(bench: Benchmark, name: str, rows: list[dict[str, Any]], subject: str, groups: tuple[str, ...],
          description: str | None = None, fewshot_rows: list[dict[str, Any]] | None = None) -> Task:
    questions = _questions(rows, bench, name, source=f"task {name}")
    fewshot = (None if fewshot_rows is None
               else _questions(fewshot_rows, bench, f"{name}/dev", source=f"task {name}, dev rows"))
    return Task(name=name, questions=questions, format=bench.format, subject=subject,
                description=description if description is not None else bench.description, groups=groups,
                fewshot=fewshot)


# ---------------------------------------------------------------------------------------------
# loaders


def load_single(bench: Benchmark, name: str, data_path: str | None,
                description: str | None = None) -> list[Task]:
    rows = [r for part in benchmark_rows(bench, data_path).values() for r in part]
    return [_task(bench, name, rows, bench.subject, (), description)]


def load_wmdp_bio_robust(data_path: str | None) -> list[Task]:
    """The six categories as subtasks of the group ``wmdp_bio_robust`` (as the deep-ignorance
    lm-eval tasks define it); a local file without a ``subset`` column is one task."""
    by_subset = benchmark_rows(WMDP_BIO_ROBUST, data_path)
    if None in by_subset:
        return [_task(WMDP_BIO_ROBUST, "wmdp_bio_robust", by_subset[None], "biology", ())]
    return [_task(WMDP_BIO_ROBUST, WMDP_BIO_ROBUST.subtask_prefix + s, by_subset[s], "biology", ("wmdp_bio_robust",))
            for s in WMDP_BIO_ROBUST_SUBSETS if s in by_subset]


def mmlu_subjects(selection: str) -> list[str]:
    """``mmlu`` -> all 57; ``mmlu_stem`` -> the 19 STEM subjects; ``mmlu_anatomy`` -> [anatomy]."""
    if selection == "mmlu":
        return list(MMLU_SUBJECTS)
    rest = selection[len("mmlu_"):]
    if rest in MMLU_CATEGORIES:
        return [s for s, c in MMLU_SUBJECTS.items() if c == rest]
    if rest in MMLU_SUBJECTS:
        return [rest]
    raise UserError(f"tasks: {selection!r} is not an MMLU task; use mmlu, mmlu_<category> "
                    f"({', '.join(MMLU_CATEGORIES)}) or mmlu_<subject>")


def mmlu_groups(selection: str, subject: str) -> tuple[str, ...]:
    """The lm-eval groups a subject is aggregated into for this request."""
    if selection == "mmlu":
        return (f"mmlu_{MMLU_SUBJECTS[subject]}", "mmlu")
    if selection[len("mmlu_"):] in MMLU_CATEGORIES:
        return (selection,)
    return ()


def mmlu_dev_rows(selection: str, subjects: list[str], data_path: str | None, fewshot_data: str | None,
                  num_fewshot: int) -> dict[str, list[dict[str, Any]]]:
    """Each subject's dev rows in file order (the few-shot pool); a subject with fewer than
    ``num_fewshot`` is an error naming it."""
    if fewshot_data:
        source = fewshot_data
    elif data_path or local_override(MMLU.data) is not None:
        local = local_override(MMLU_DEV.data)
        if data_path or local is None:
            where = f"{selection}={data_path}" if data_path else f"$UNLEARNING_DATA_DIR/{MMLU.data}"
            raise UserError(f"fewshot_data: num_fewshot {num_fewshot} with local questions ({where}) needs "
                            f"their dev rows: set fewshot_data to {FEWSHOT_DATA_HINT}")
        source = str(local)
    else:
        source = None  # the hub's dev split
    by_subject = benchmark_rows(MMLU_DEV, source, subsets=subjects)
    if None in by_subject:  # cannot happen: the subject column is required
        raise DataError(f"fewshot_data: {source} needs a 'subject' column")
    for subject in subjects:
        have = len(by_subject.get(subject, []))
        if have < num_fewshot:
            raise DataError(f"fewshot_data: {source or 'the hub dev split'} has {have} dev row(s) for subject "
                            f"{subject}, fewer than num_fewshot {num_fewshot}; give {FEWSHOT_DATA_HINT}, or "
                            f"lower num_fewshot")
    return {s: by_subject[s] for s in subjects}


def load_mmlu(selection: str, data_path: str | None, num_fewshot: int = 0,
              fewshot_data: str | None = None) -> list[Task]:
    subjects = mmlu_subjects(selection)
    dev = mmlu_dev_rows(selection, subjects, data_path, fewshot_data, num_fewshot) if num_fewshot > 0 else {}
    by_subject = benchmark_rows(MMLU, data_path, subsets=subjects)
    if None in by_subject:  # cannot happen: the subject column is required
        raise DataError(f"task {selection}: local MMLU data needs a 'subject' column")
    missing = [s for s in subjects if s not in by_subject]
    if missing:
        raise DataError(f"task {selection}: the local MMLU data has no questions for {len(missing)} of its "
                        f"{len(subjects)} subjects ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); "
                        f"a partial MMLU is not MMLU: ask for mmlu_<subject> tasks instead")
    return [_task(MMLU, MMLU.subtask_prefix + s, by_subject[s], s, mmlu_groups(selection, s),
                  fewshot_rows=dev.get(s)) for s in subjects]


def load_benchmark(name: str, data_path: str | None = None, num_fewshot: int = 0,
                   fewshot_data: str | None = None) -> list[Task]:
    """The tasks of a benchmark task name, from ``data_path`` when given (else data dir / hub);
    ``num_fewshot > 0`` (the MMLU family) also loads each subject's dev rows, from ``fewshot_data``
    when given."""
    if name == "wmdp_bio":
        return load_single(WMDP_BIO, name, data_path)
    if name == "wmdp_bio_robust":
        return load_wmdp_bio_robust(data_path)
    if name == "wmdp_bio_cloze":
        return load_single(WMDP_BIO_CLOZE, name, data_path)
    if name == "wmdp_bio_cloze_verified":
        return load_single(WMDP_BIO_CLOZE, name, data_path, description=CLOZE_VERIFIED_DESCRIPTION)
    if name == "mmlu" or name.startswith("mmlu_"):
        return load_mmlu(name, data_path, num_fewshot, fewshot_data)
    raise UserError(f"tasks: {name!r} is not a benchmark; known: {', '.join(BENCHMARK_TASKS)}")


BENCHMARK_TASKS = ("wmdp_bio", "wmdp_bio_robust", "wmdp_bio_cloze", "wmdp_bio_cloze_verified", "mmlu",
                   *(f"mmlu_{c}" for c in MMLU_CATEGORIES), *(f"mmlu_{s}" for s in MMLU_SUBJECTS))


def _loader(name: str):
    def load(options: TaskOptions) -> list[Task]:
        return load_benchmark(name, getattr(options, "data_path", None),
                              num_fewshot=int(options.context.get("num_fewshot") or 0),
                              fewshot_data=options.context.get("fewshot_data"))
    return load


for _name in BENCHMARK_TASKS:
    register_task(_name, _loader(_name), fewshot=_name == "mmlu" or _name.startswith("mmlu_"))


def benchmarks() -> dict[str, Benchmark]:
    """Data name -> benchmark (for docs and tests)."""
    return {b.data: b for b in (WMDP_BIO, WMDP_BIO_ROBUST, WMDP_BIO_CLOZE, MMLU)}


def export(out_dir: str | Path) -> list[Path]:
    """Write every benchmark's rows (read from the hub or its cache) as ``<data>.parquet`` in
    ``out_dir``: the files ``UNLEARNING_DATA_DIR`` reads on a machine without hub access."""
    import datasets
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for bench in benchmarks().values():
        rows = []
        for subset, part in benchmark_rows(bench).items():
            extra = {bench.subset_column: subset} if subset is not None and bench.subset_column else {}
            rows += [{**{c: r[c] for c in bench.columns}, **extra} for r in part]
        datasets.Dataset.from_list(rows).to_parquet(str(out / f"{bench.data}.parquet"))
        written.append(out / f"{bench.data}.parquet")
    return written


if __name__ == "__main__":  # python -m unlearning.evaluation.benchmarks export DIR
    import sys
    if len(sys.argv) != 3 or sys.argv[1] != "export":
        sys.exit("usage: python -m unlearning.evaluation.benchmarks export DIR")
    for path in export(sys.argv[2]):
        print(path)
