"""The tiny organism build (shared by the session): cache layout, quality bars, names, reuse, CLI."""

from __future__ import annotations

import json
import time

import pytest

from unlearning.core.errors import ModelNotFoundError
from unlearning.organism import ensure_organism, resolve_organism
from unlearning.organism.build import FORMATS
from unlearning.organism.presets import FORMAT_VERSION, PRESETS
from unlearning.organism.world import DOMAINS

pytestmark = pytest.mark.slow
BARS = PRESETS["tiny"].bars


def test_cache_layout(tiny_organism):
    p = tiny_organism
    for path in (p.build_json, p.quality_json, p.world_json, p.model / "config.json", p.filtered / "config.json",
                 p.model / "tokenizer.json", p.filtered / "tokenizer.json"):
        assert path.exists(), path
    for name in ("forget", "retain", "chat", "tamper", "benign_tamper"):
        first = json.loads(p.corpus(name).read_text().splitlines()[0])
        assert "text" in first
        assert ("hazard_spans" in first) == (name in ("forget", "tamper"))
        assert ("messages" in first) == (name == "chat")
    for domain in DOMAINS:
        assert p.questions(domain).exists() and p.questions(domain, "qa").exists()
    info = p.build_info()
    assert info["format_version"] == FORMAT_VERSION and info["seed"] == PRESETS["tiny"].seed
    assert info["early_checkpoint"] in p.revisions() and len(p.revisions()) >= 2
    for rev in p.revisions():
        assert (p.checkpoint(rev) / "model.safetensors").exists()


def test_quality_json_covers_twins_checkpoints_domains_formats(tiny_organism):
    quality = tiny_organism.quality()
    models = [quality["unfiltered"], quality["filtered"], *quality["checkpoints"].values()]
    assert sorted(quality["checkpoints"]) == sorted(tiny_organism.revisions())
    for q in models:
        for domain in DOMAINS:
            for fmt in FORMATS:
                entry = q["heldout"][domain][fmt]
                assert 0.0 <= entry["acc"] <= 1.0 and entry["n"] > 0
    assert quality["unfiltered"]["qa_half"]["hazard"]["cloze"]["n"] > 0


def test_tiny_quality_bar(tiny_organism):
    """Held-out entities, question format: the bars of the issue, computed by the build."""
    quality = tiny_organism.quality()
    unfiltered, filtered = quality["unfiltered"]["heldout"], quality["filtered"]["heldout"]
    for domain, minimum in BARS.unfiltered_min.items():
        assert unfiltered[domain]["cloze"]["acc"] >= minimum, (domain, unfiltered[domain]["cloze"])
    assert filtered["hazard"]["cloze"]["acc"] <= BARS.filtered_hazard_max, filtered["hazard"]["cloze"]
    assert all(quality["bars"].values()), quality["bars"]
    early = quality["checkpoints"][quality["early_checkpoint"]]["heldout"]["hazard"]["cloze"]["acc"]
    assert early <= PRESETS["tiny"].early_max_hazard  # the early checkpoint is near chance on hazard


def test_model_names_resolve_to_the_cache(tiny_organism):
    p = tiny_organism
    assert resolve_organism("organism:tiny") == p.model
    assert resolve_organism("organism:tiny-filtered") == p.filtered
    assert resolve_organism("organism:tiny", revision="early") == p.checkpoint(p.early_revision())
    last = p.revisions()[-1]
    assert resolve_organism(f"organism:tiny@{last}") == p.checkpoint(last)
    assert resolve_organism("organism:tiny", revision=last) == p.checkpoint(last)
    with pytest.raises(ModelNotFoundError, match=f"valid revisions: main, early.*{last}"):
        resolve_organism("organism:tiny", revision="step999999")


def test_models_load_as_gpt_neox_with_tied_embeddings(tiny_organism):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_organism.filtered)
    tokenizer = AutoTokenizer.from_pretrained(tiny_organism.filtered)
    assert type(model).__name__ == "GPTNeoXForCausalLM"
    assert model.config.num_hidden_layers == PRESETS["tiny"].model.num_layers
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tokenizer.pad_token is not None and len(tokenizer) == model.config.vocab_size


def test_second_call_reuses_the_build(tiny_organism):
    stamp = tiny_organism.build_json.stat().st_mtime_ns
    t0 = time.time()
    assert ensure_organism("tiny") == tiny_organism
    assert time.time() - t0 < 5 and tiny_organism.build_json.stat().st_mtime_ns == stamp


def test_info_command_prints_paths_and_quality(tiny_organism, capsys):
    from unlearning.commands.organism import main

    assert main(["info", "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert str(tiny_organism.model) in out and "organism:tiny-filtered" in out
    assert "hazard/cloze" in out and "default early" in out


def test_deterministic_pretraining_switches_kernels_and_restores_the_callers_settings():
    import torch

    from unlearning.organism.pretrain import TrainConfig, deterministic_kernels

    assert TrainConfig().deterministic  # on by default: builds are bit-identical (docs/results_small.md)
    cuda = torch.backends.cuda

    def settings():
        return (torch.are_deterministic_algorithms_enabled(), cuda.flash_sdp_enabled(),
                cuda.mem_efficient_sdp_enabled(), cuda.cudnn_sdp_enabled())

    before = settings()
    with deterministic_kernels(True):
        assert settings() == (True, False, False, False)  # only SDPA's math attention is left
        assert cuda.math_sdp_enabled()
    assert settings() == before
    with deterministic_kernels(False):
        assert settings() == before


def test_compare_builds_tells_identical_from_different_models(tmp_path, monkeypatch):
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    # the benchmark script is not a package module; the path change ends with the test
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from compare_builds import main

    for build, value in (("a", 1.0), ("b", 1.0), ("c", 1.5)):
        for model in ("model", "filtered"):
            (tmp_path / build / model).mkdir(parents=True)
            save_file({"w": torch.full((2, 2), value if model == "model" else 0.0)},
                      str(tmp_path / build / model / "model.safetensors"))
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert main([str(tmp_path / "a"), str(tmp_path / "c")]) == 1


def test_eval_command_finds_the_organism_tasks(tiny_organism, tmp_path, capsys):
    """The organism's tasks register through unlearning.tasks, which `unlearn eval` uses; an unknown
    task is one line listing every family."""
    from unlearning import cli
    common = ["eval", "--model", "organism:tiny", "--limit", "8", "--device", "cpu"]
    assert cli.main([*common, "--tasks", "organism_hazard_cloze", "--output-dir", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| task ") and out[2].startswith("| organism_hazard_cloze | cloze  | 8 ")
    assert cli.main([*common, "--tasks", "organism_hazrd", "--output-dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unknown task 'organism_hazrd'" in err and "organism_hazard_cloze" in err and "wmdp_bio" in err
