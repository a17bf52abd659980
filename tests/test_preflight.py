"""`unlearn run` checks what it can before the weights load (the bad-input table: test_bad_inputs.py)."""

from __future__ import annotations

import json

import pytest

from run_setup import Job
from unlearning import runner
from unlearning.core.config import ConfigError, from_dict
from unlearning.core.errors import ModelNotFoundError
from unlearning.preflight import model_depth, preflight
from unlearning.runner import RunConfig


@pytest.fixture
def job(tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the config was checked")

    monkeypatch.setattr(runner, "load_model", no_loading)
    return Job(tmp_path)


@pytest.mark.parametrize("method, section, key", [
    ("rmu", {"layer": 4}, "rmu.layer"),
    ("rmu", {"update_layers": [1, 5]}, "rmu.update_layers"),
    ("circuit_breaker", {"target_layers": [2, 6]}, "circuit_breaker.target_layers"),
    ("circuit_breaker", {"finetune": "full", "full_layers": [8]}, "circuit_breaker.full_layers"),
    ("checkpoint_transfer", {"target_layers": "5->1:2"}, "checkpoint_transfer.target_layers"),
    ("checkpoint_transfer", {"affine": "no-such-map.safetensors"}, "checkpoint_transfer.affine"),
    ("sequential", {"mask": {"kind": "activation", "layer": 4}}, "sequential.mask.layer"),
])
def test_each_methods_layer_specs_are_checked_against_the_depth(job, method, section, key):
    cfg = from_dict(RunConfig, job.data("x", method=method, **{method: section}))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ":"):
        preflight(cfg)


def test_valid_layer_specs_pass_and_local_data_is_read_once(job):
    plan = preflight(job.config("x", sequential={"layers": "3->1", "retain_layers": [0, 3]}))
    assert plan.depth == 4 and plan.mode == "fresh"
    assert len(plan.texts["forget"]) == 12 and len(plan.texts["retain"]) == 12
    assert not job.runs.exists()


def test_depth_is_read_from_config_json_a_run_directory_or_the_organism_preset(tmp_path, job):
    assert model_depth(str(job.root / "model"), None) == 4
    run_dir = tmp_path / "a-run"
    (run_dir / "model").mkdir(parents=True)
    for f in (job.root / "model").iterdir():
        (run_dir / "model" / f.name).write_bytes(f.read_bytes())
    assert model_depth(str(run_dir), None) == 4
    config = json.loads((run_dir / "model" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    assert model_depth("organism:small-filtered", None) == 32  # from the preset: nothing is built
    with pytest.raises(ModelNotFoundError, match="organism:huge"):
        model_depth("organism:huge", None)
