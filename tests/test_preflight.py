"""`unlearn run` checks what it can before the weights load: fast, one line naming the key, no run directory."""

from __future__ import annotations

import json
import time

import pytest

from run_setup import Job
from unlearning import runner
from unlearning.cli import main
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


def _write(path, text):
    path.write_text(text)
    return str(path)


BAD_INPUT = {
    "missing data file": (lambda root: ["--data.forget.source=missing.jsonl"], "data.forget.source", "not found"),
    "empty data file": (lambda root: [f"--data.retain.source={_write(root / 'empty.jsonl', '')}"],
                        "data.retain.source", "the file is empty; it needs one example per row"),
    "wrong column": (lambda root: ["--data.forget.column=body"], "data.forget.source", "set data.forget.column"),
    "layer out of range": (lambda root: ["--sequential.layers=[3, 7]"], "sequential.layers", "4 layers"),
    "retain layer out of range": (lambda root: ["--sequential.retain_layers=[9]"], "sequential.retain_layers",
                                  "4 layers"),
    "lora layer out of range": (lambda root: ["--sequential.finetune=lora", "--sequential.lora.layers=[4]"],
                                "sequential.lora.layers", "4 layers"),
    "unknown task": (lambda root: ["--eval.tasks=[organism_hazard_clozee]"], "eval.tasks", "unknown task"),
    "missing task file": (lambda root: ["--eval.tasks=[nope.jsonl]"], "eval.tasks", "nope.jsonl"),
    "no task": (lambda root: ["--eval.tasks=[]"], "eval.tasks", "no task"),
    "missing model folder": (lambda root: [f"--model={root / 'no-model'}"], "model", "does not exist"),
    "hub id offline": (lambda root: ["--model=nobody/no-such-model"], "model", "HF_HUB_OFFLINE"),
    "missing reference": (lambda root: [f"--eval.reference={root / 'no-ref'}"], "eval.reference", "does not exist"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_fails_fast_in_one_line_naming_the_key_and_leaves_no_run_directory(job, case, capsys,
                                                                                       monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args, key, detail = BAD_INPUT[case]
    start = time.perf_counter()
    assert main(["run", str(job.yaml("x")), "--name=x", *args(job.root)]) == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"unlearn run: error: {key}:") and detail in err, err
    assert not job.runs.exists()


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
