"""A truncated or corrupt model file is one line naming the file and the fix, not a deep traceback."""

from __future__ import annotations

import json

import pytest

from tiny_models import save_tiny
from unlearning.cli import main
from unlearning.core.errors import CorruptFileError, UserError
from unlearning.model.integrity import resave_fix
from unlearning.model.loading import load_model, load_weights


def truncate(path, keep: float = 0.5) -> None:
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * keep))


@pytest.fixture
def saved(tmp_path):
    folder = tmp_path / "model"
    save_tiny(folder, family="gpt_neox", layers=2)
    return folder


@pytest.mark.parametrize("damage", ["truncated", "cut_to_header", "garbage"])
def test_damaged_weights_name_the_file_and_the_fix(saved, damage):
    weights = saved / "model.safetensors"
    if damage == "truncated":
        truncate(weights)
    elif damage == "cut_to_header":
        truncate(weights, keep=0.0001)
    else:
        weights.write_bytes(b"\x00" * 64)
    for load in (load_model, load_weights):
        with pytest.raises(CorruptFileError) as e:
            load(saved, device="cpu")
        assert isinstance(e.value, UserError)
        message = str(e.value)
        assert str(weights) in message and "re-save the model" in message and "\n" not in message


def test_corrupt_config_is_named(saved):
    (saved / "config.json").write_text('{"model_type": "gpt_neox", ')
    with pytest.raises(CorruptFileError, match=r"config\.json is corrupt \(not valid JSON"):
        load_model(saved, device="cpu")


def test_a_shard_missing_from_a_sharded_model_is_named(saved):
    (saved / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"gpt_neox.embed_in.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CorruptFileError, match=r"model-00002-of-00002\.safetensors is missing \(listed in"):
        load_model(saved, device="cpu")


def test_a_truncated_adapter_is_named(tmp_path, saved):
    import peft

    model, _ = load_model(saved, device="cpu")
    adapter = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["query_key_value"]))
    adapter.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(saved)
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    truncate(tmp_path / "adapter" / "adapter_model.safetensors")
    with pytest.raises(CorruptFileError, match="adapter_model.safetensors is truncated or corrupt"):
        load_model(tmp_path / "adapter", device="cpu")


def test_the_fix_for_an_organism_file_is_the_forced_rebuild(tmp_path, monkeypatch):
    monkeypatch.setenv("UNLEARNING_HOME", str(tmp_path / "home"))
    folder = tmp_path / "home" / "organism" / "tiny" / "checkpoints" / "step50"
    assert resave_fix(folder) == "rebuild the organism: `unlearn organism build --preset tiny --force`"
    assert "re-save the model" in resave_fix(tmp_path / "elsewhere")


def test_the_cli_prints_one_line(saved, tmp_path, capsys):
    truncate(saved / "model.safetensors")
    code = main(["eval", "--model", str(saved), "--tasks", "organism_hazard_cloze",
                 "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("unlearn eval: error: ")]
    assert code == 2 and len(errors) == 1   # 2: the CLI caught a UserError (anything else would raise)
    assert "model.safetensors is truncated" in errors[0]
