"""Real benchmarks (WMDP-Bio, Robust, cloze, MMLU) on small fixture files in the hub's columns:
registration, lm-eval's prompts and groups, local-file overrides, and fast offline failures."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from eval_setup import make_model, make_tokenizer

from unlearning.core.errors import DataError, UserError
from unlearning.evaluation import benchmarks as bm
from unlearning.evaluation import evaluate
from unlearning.tasks import get_tasks
from unlearning.evaluation.prompts import build_prompt
from unlearning.evaluation.tasks import TASKS

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
LM_EVAL_STEM = ["abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
                "college_computer_science", "college_mathematics", "college_physics", "computer_security",
                "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
                "high_school_chemistry", "high_school_computer_science", "high_school_mathematics",
                "high_school_physics", "high_school_statistics", "machine_learning"]


def fixture(name: str) -> str:
    return str(next(FIXTURES.glob(f"{name}.*")))


@pytest.fixture(scope="module")
def lm():
    tokenizer = make_tokenizer()
    return make_model(len(tokenizer)), tokenizer


def prompt(task, q):
    return build_prompt(task.format, q.question, q.choices, q.subject or task.subject, task.description)


def test_every_benchmark_is_a_registered_task():
    get_tasks(f"wmdp_bio={fixture('wmdp_bio')}")  # loads the plugin module
    for name in ("wmdp_bio", "wmdp_bio_robust", "wmdp_bio_cloze", "wmdp_bio_cloze_verified", "mmlu", "mmlu_stem",
                 "mmlu_humanities", "mmlu_anatomy", "mmlu_world_religions"):
        assert name in TASKS
    assert len(bm.MMLU_SUBJECTS) == 57 and set(bm.MMLU_CATEGORIES) == set(bm.MMLU_SUBJECTS.values())


def test_mmlu_stem_is_lm_evals_group():
    assert bm.mmlu_subjects("mmlu_stem") == LM_EVAL_STEM


def test_mmlu_categories_match_installed_lm_eval():
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install lm-eval==0.4.13")
    import yaml
    folder = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    for subject, category in bm.MMLU_SUBJECTS.items():
        config = yaml.safe_load((folder / f"mmlu_{subject}.yaml").read_text())
        assert config["tag"] == f"mmlu_{category}_tasks", subject
        assert config["description"] == f"The following are multiple choice questions (with answers) about " \
                                        f"{subject.replace('_', ' ')}.\n\n"


def test_wmdp_bio_letter_prompt_is_lm_evals():
    (task,) = get_tasks(f"wmdp_bio={fixture('wmdp_bio')}")
    assert (task.name, task.format, len(task.questions), task.groups) == ("wmdp_bio", "letter", 6, ())
    q = task.questions[0]
    ctx, conts = prompt(task, q)
    assert ctx == ("The following are multiple choice questions (with answers) about biology.\n\n"
                   f"{q.question}\nA. Ribosome\nB. Mitochondrion\nC. Golgi apparatus\nD. Lysosome\nAnswer:")
    assert conts == [" A", " B", " C", " D"] and q.answer == 1 and q.id == "wmdp_bio/0"


def test_wmdp_bio_robust_is_a_size_weighted_group(lm):
    tasks = get_tasks(f"wmdp_bio_robust={fixture('wmdp_bio_robust')}")
    assert [t.name for t in tasks] == [f"wmdp_bio_robust_{s}" for s in bm.WMDP_BIO_ROBUST_SUBSETS]
    assert all(t.groups == ("wmdp_bio_robust",) and t.subject == "biology" for t in tasks)
    results = evaluate(*lm, tasks, batch_size=5, log_samples=True)
    samples = [s for t in tasks for s in results[t.name]["samples"]]
    group = results["wmdp_bio_robust"]
    assert group["n"] == len(samples) == 12
    assert group["acc"] == pytest.approx(sum(s["acc"] for s in samples) / 12)


def test_wmdp_bio_robust_without_subset_column_is_one_task(tmp_path):
    rows = [json.loads(line) for line in Path(fixture("wmdp_bio_robust")).read_text().splitlines()]
    path = tmp_path / "robust.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "subset"}) + "\n" for r in rows))
    (task,) = get_tasks(f"wmdp_bio_robust={path}")
    assert (task.name, len(task.questions), task.groups) == ("wmdp_bio_robust", 12, ())


def test_wmdp_bio_cloze_scores_correct_prob(lm):
    (task,) = get_tasks(f"wmdp_bio_cloze={fixture('wmdp_bio_cloze')}")
    q = task.questions[0]
    assert task.format == "cloze" and task.description is None
    assert prompt(task, q) == (f"Question: {q.question}\nAnswer:", [" " + c for c in q.choices])
    result = evaluate(*lm, [task], batch_size=4)["wmdp_bio_cloze"]
    assert 0 < result["correct_prob"] < 1 and result["n"] == 6 and "acc_norm" in result


def test_wmdp_bio_cloze_verified_has_deep_ignorances_header():
    (task,) = get_tasks(f"wmdp_bio_cloze_verified={fixture('wmdp_bio_cloze')}")
    ctx, _ = prompt(task, task.questions[0])
    assert ctx.startswith("Complete the following biology questions with the correct answer.\n\nQuestion: ")


def test_mmlu_groups_are_lm_evals(lm):
    tasks = get_tasks(f"mmlu={fixture('mmlu')}")
    assert len(tasks) == 57 and sum(len(t.questions) for t in tasks) == 114
    anatomy = next(t for t in tasks if t.name == "mmlu_anatomy")
    assert anatomy.groups == ("mmlu_stem", "mmlu") and anatomy.subject == "anatomy"
    ctx, _ = prompt(anatomy, anatomy.questions[0])
    assert ctx.startswith("The following are multiple choice questions (with answers) about anatomy.\n\nWhat is")
    law = next(t for t in tasks if t.name == "mmlu_professional_law")
    assert prompt(law, law.questions[0])[0].startswith("The following are multiple choice questions (with answers) "
                                                       "about professional law.\n\n")
    results = evaluate(*lm, tasks, batch_size=16, log_samples=True)
    samples = {t.name: results[t.name]["samples"] for t in tasks}
    for group, subjects in [("mmlu", bm.MMLU_SUBJECTS), ("mmlu_stem", LM_EVAL_STEM)]:
        pooled = [s["acc"] for name in subjects for s in samples[f"mmlu_{name}"]]
        assert results[group]["n"] == len(pooled) == 2 * len(subjects)
        assert results[group]["acc"] == pytest.approx(sum(pooled) / len(pooled))  # per question, not per subject
    for category in bm.MMLU_CATEGORIES:
        assert results[f"mmlu_{category}"]["n"] == 2 * sum(c == category for c in bm.MMLU_SUBJECTS.values())


def test_mmlu_stem_alone_and_with_mmlu():
    stem = get_tasks(f"mmlu_stem={fixture('mmlu')}")
    assert [t.name for t in stem] == [f"mmlu_{s}" for s in LM_EVAL_STEM]
    assert all(t.groups == ("mmlu_stem",) for t in stem)
    both = get_tasks([f"mmlu={fixture('mmlu')}", f"mmlu_stem={fixture('mmlu')}"])
    assert len(both) == 57
    assert next(t for t in both if t.name == "mmlu_anatomy").groups == ("mmlu_stem", "mmlu")


def test_partial_mmlu_is_an_error_but_single_subjects_work(tmp_path):
    import datasets
    rows = datasets.load_dataset("parquet", data_files=fixture("mmlu"), split="train")
    part = tmp_path / "part.parquet"
    rows.filter(lambda r: r["subject"] in ("anatomy", "virology")).to_parquet(str(part))
    with pytest.raises(DataError, match="no questions for 55 of its 57 subjects"):
        get_tasks(f"mmlu={part}")
    (task,) = get_tasks(f"mmlu_virology={part}")
    assert task.name == "mmlu_virology" and len(task.questions) == 2 and task.groups == ()


def test_data_dir_stands_in_for_the_hub(monkeypatch):
    monkeypatch.setenv("UNLEARNING_DATA_DIR", str(FIXTURES))
    names = [t.name for t in get_tasks("wmdp_bio,wmdp_bio_cloze,mmlu_stem,wmdp_bio_robust")]
    assert names[:2] == ["wmdp_bio", "wmdp_bio_cloze"] and "mmlu_anatomy" in names
    assert "wmdp_bio_robust_dual_use_virology" in names


def test_bad_local_files_name_the_problem(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q?", "choices": ["a", "b", "c", "d"]}) + "\n")
    with pytest.raises(DataError, match="row 1: missing column 'answer'"):
        get_tasks(f"wmdp_bio={bad}")
    bad.write_text(json.dumps({"question": "q?", "choices": ["a", "b", "c", "d"], "answer": 0,
                               "subset": "chemistry"}) + "\n")
    with pytest.raises(DataError, match="unknown subset value"):
        get_tasks(f"wmdp_bio_robust={bad}")
    with pytest.raises(DataError, match="not found"):
        get_tasks(f"wmdp_bio={tmp_path / 'missing.parquet'}")
    with pytest.raises(UserError, match="unknown task"):
        get_tasks(f"wmdp_chem={bad}")


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """No local data and empty Hugging Face caches, whatever this machine has cached."""
    import datasets
    from huggingface_hub import constants
    monkeypatch.delenv("UNLEARNING_DATA_DIR", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    bm._hub_rows.cache_clear()
    yield
    bm._hub_rows.cache_clear()


def test_offline_hub_fails_at_once_naming_the_fix(empty_caches, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    with pytest.raises(DataError) as err:
        get_tasks("wmdp_bio")
    assert time.time() - start < 20
    message = str(err.value)
    for part in ("cais/wmdp", "7125571f22f0", "wmdp-bio", "HF_HUB_OFFLINE", "HF_HOME", "--tasks wmdp_bio=",
                 "UNLEARNING_DATA_DIR"):
        assert part in message


@pytest.mark.parametrize("failure, reason", [("network", "cannot be reached"), ("gated", "gated")])
def test_unreachable_or_gated_hub_fails_at_once(empty_caches, monkeypatch, failure, reason):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError

    def dataset_info(self, repo_id, **kwargs):
        if failure == "gated":  # built without an HTTP response (its client differs across versions)
            error = GatedRepoError.__new__(GatedRepoError)
            Exception.__init__(error, "403 gated")
            raise error
        raise ConnectionError("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(HfApi, "dataset_info", dataset_info)
    start = time.time()
    with pytest.raises(DataError, match=reason) as err:
        get_tasks("mmlu_anatomy")
    assert time.time() - start < 5
    assert "cais/mmlu@c30699e8356d, config 'anatomy', split 'test'" in str(err.value)


def test_revisions_are_pinned_and_overridable(monkeypatch):
    assert bm.MMLU.hub("anatomy").revision == "c30699e8356da336a370243923dbaf21066bb9fe"
    assert bm.WMDP_BIO.hub().revision == "7125571f22f032c56415e7980f48d877dd830ff8"
    monkeypatch.setenv("UNLEARNING_REVISION_WMDP_BIO_ROBUST", "abc123")
    assert bm.WMDP_BIO_ROBUST.hub("dual_use_virology").revision == "abc123"


def test_docs_table_lists_every_benchmark():
    doc = (Path(__file__).parents[1] / "docs" / "benchmarks.md").read_text()
    for bench in bm.benchmarks().values():
        assert bench.hub_id in doc and bench.split in doc
        revision = bm.REVISIONS[bench.data]
        assert (revision or "unpinned") in doc
    for name in bm.BENCHMARK_TASKS[:6]:
        assert f"`{name}`" in doc


def test_unlearn_eval_reads_local_benchmark_files(tmp_path, lm):
    from unlearning.commands.eval import main
    model, tokenizer = lm
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "run"
    assert main(["--model", str(tmp_path / "model"), "--tasks",
                 f"wmdp_bio={fixture('wmdp_bio')},wmdp_bio_cloze={fixture('wmdp_bio_cloze')}",
                 "--output-dir", str(out), "--device", "cpu"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["wmdp_bio"]["n"] == 6 and 0 < results["wmdp_bio_cloze"]["correct_prob"] < 1


def test_export_writes_what_the_data_dir_reads(tmp_path, monkeypatch):
    def questions():
        return {t.name: [(q.question, q.choices, q.answer) for q in t.questions]
                for t in get_tasks("wmdp_bio,wmdp_bio_robust,wmdp_bio_cloze,mmlu")}
    monkeypatch.setenv("UNLEARNING_DATA_DIR", str(FIXTURES))
    before = questions()
    written = bm.export(tmp_path / "out")
    assert sorted(p.name for p in written) == ["mmlu.parquet", "wmdp_bio.parquet", "wmdp_bio_cloze.parquet",
                                               "wmdp_bio_robust.parquet"]
    monkeypatch.setenv("UNLEARNING_DATA_DIR", str(tmp_path / "out"))
    assert questions() == before
