"""Evaluation task files and names: local question files in every format, row errors naming file and
row, organism tasks from the cache, registry loaders and groups."""

from __future__ import annotations

import json
import random

import pytest
from eval_setup import good_rows, random_question, write_jsonl

from unlearning.core.errors import ConfigError, DataError, UserError
from unlearning.evaluation import MCQuestion, Task, evaluate
from unlearning.tasks import get_tasks
from unlearning.evaluation.evaluate import pooled_stderr


# --------------------------------------------------------------------------------------------- task files


def test_local_files_are_tasks(tmp_path):
    jsonl = write_jsonl(tmp_path / "q.jsonl", good_rows())
    (tmp_path / "q.json").write_text(json.dumps(good_rows(2)))
    import pandas as pd
    pd.DataFrame(good_rows(4)).to_parquet(tmp_path / "q.parquet")
    letter, cloze, js, pq = get_tasks(f"{jsonl},{jsonl}:cloze,{tmp_path / 'q.json'},{tmp_path / 'q.parquet'}")
    assert (letter.format, cloze.format) == ("letter", "cloze")
    assert len(letter.questions) == 3 and len(js.questions) == 2 and len(pq.questions) == 4
    assert letter.questions[1] == MCQuestion("r1", "What is 1?", ["a", "b", "c", "d"], 1, attribute="num")
    assert cloze.name == f"{jsonl}:cloze" and pq.questions[3].answer == 3


@pytest.mark.parametrize("rows, message", [
    ([{"question": "q", "choices": ["a", "b", "c", "d"]}], "missing column 'answer'"),
    ([*good_rows(2), {"question": "q", "choices": ["a", "b", "c", "d"], "answer": 4}],
     "row 3: answer index 4 is out of range"),
    ([*good_rows(1), {"question": "q", "choices": ["a", "b", "c"], "answer": 0}],
     "row 2: the letter format needs exactly 4 choices"),
    ([*good_rows(1), {"question": "q", "choices": ["a", "b", "c", "d"]}], "row 2: missing column 'answer'"),
])
def test_bad_rows_name_file_and_row(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=message) as info:
        get_tasks([str(path)])
    assert str(path) in str(info.value)


def test_empty_and_missing_files_and_unknown_names(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        get_tasks([str(empty)])
    with pytest.raises(DataError, match="not found"):
        get_tasks([str(tmp_path / "nope.jsonl")])
    with pytest.raises(UserError, match="unknown task 'mmlu_typo'.*organism_hazard_cloze"):
        get_tasks(["mmlu_typo"])
    # the question format accepts other choice counts; fewer than two is still an error
    path = write_jsonl(tmp_path / "two.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 1}])
    assert len(get_tasks(f"{path}:cloze")[0].questions[0].choices) == 2
    path = write_jsonl(tmp_path / "one.jsonl", [{"question": "q", "choices": ["a"], "answer": 0}])
    with pytest.raises(DataError, match="row 1: needs at least 2 choices"):
        get_tasks(f"{path}:cloze")


def test_organism_tasks_read_the_cache(tmp_path, monkeypatch):
    import unlearning.organism.tasks as organism_tasks
    from unlearning.organism import organism_paths
    monkeypatch.setenv("UNLEARNING_HOME", str(tmp_path))
    monkeypatch.setattr(organism_tasks, "check_built", organism_paths)  # a questions-only cache: no models
    root = tmp_path / "organism" / "fake"
    (root / "data" / "questions").mkdir(parents=True)
    for domain in ("hazard", "benign_bio", "general"):
        rows = [{**r, "entity": "E", "domain": domain} for r in good_rows(5)]
        write_jsonl(root / "data" / "questions" / f"{domain}.jsonl", rows)
    (root / "build.json").write_text("{}")
    hazard, cloze, general = get_tasks("organism_hazard,organism_hazard_cloze,organism_general", organism="fake")
    assert (hazard.name, hazard.format, hazard.subject) == ("organism_hazard", "letter", "biology")
    assert (cloze.name, cloze.format) == ("organism_hazard_cloze", "cloze")
    assert general.subject == "general knowledge" and len(general.questions) == 5


def test_organism_tasks_build_a_missing_cache_and_name_unknown_presets(tmp_path, monkeypatch):
    import unlearning.organism.tasks as organism_tasks
    monkeypatch.setenv("UNLEARNING_HOME", str(tmp_path))
    built = []

    def fake_build(preset):  # an incomplete cache is built before its questions are read
        built.append(preset)
        raise DataError(f"built {preset}")
    monkeypatch.setattr(organism_tasks, "ensure_organism", fake_build)
    with pytest.raises(DataError, match="built small"):
        get_tasks("organism_general_cloze", organism="small")
    assert built == ["small"]
    monkeypatch.undo()
    monkeypatch.setenv("UNLEARNING_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="unknown organism preset 'nothere'"):
        get_tasks("organism_general_cloze", organism="nothere")


def test_evaluation_registry_alone_knows_no_organism():
    """``unlearning.evaluation`` registers no organism task; ``unlearning.tasks`` brings them in."""
    import subprocess
    import sys
    code = ("import unlearning.evaluation.tasks as t, unlearning.evaluation.benchmarks; "
            "assert not any(n.startswith('organism_') for n in t.TASKS), sorted(t.TASKS)[:5]; "
            "import unlearning.tasks; assert 'organism_hazard_cloze' in t.TASKS and 'wmdp_bio' in t.TASKS")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(good_rows(1)[0]) + "\n" + '{"question": "q", "choices": \n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        get_tasks([str(path)])


def test_registry_loaders_groups_and_data_path(tmp_path, monkeypatch, model, tokenizer):
    from unlearning.evaluation import tasks as tasks_module
    rng = random.Random(6)

    def subject_task(name, groups):
        return Task(name, [random_question(rng, i) for i in range(3)], subject="biology", groups=groups)

    monkeypatch.setitem(tasks_module.TASKS, "bench", lambda o: [subject_task("bench_x", ("bench_group", "bench")),
                                                               subject_task("bench_y", ("bench",))])
    monkeypatch.setitem(tasks_module.TASKS, "bench_group", lambda o: subject_task("bench_x", ("bench_group",)))
    tasks = get_tasks("bench,bench_group")
    assert [t.name for t in tasks] == ["bench_x", "bench_y"]  # asked twice, evaluated once
    assert tasks[0].groups == ("bench_group", "bench")
    results = evaluate(model, tokenizer, tasks)
    assert results["bench"]["n"] == 6 and results["bench_group"]["n"] == 3
    assert results["bench_group"]["acc"] == results["bench_x"]["acc"]
    assert results["bench"]["acc_stderr"] == pytest.approx(
        pooled_stderr([results["bench_x"]["acc_stderr"], results["bench_y"]["acc_stderr"]], [3, 3]))
    # NAME=PATH: a registered task read from a local file
    path = write_jsonl(tmp_path / "hazard.jsonl", good_rows(4))
    (task,) = get_tasks(f"organism_hazard_cloze={path}")
    assert (task.name, task.format, len(task.questions)) == ("organism_hazard_cloze", "cloze", 4)
