"""Config loading: YAML + dotted overrides, and one-line errors naming the key."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from unlearning.core.config import from_dict, load_config, param, parse_overrides, to_dict
from unlearning.core.errors import ConfigError


@dataclass
class Inner:
    lr: float = param(1e-3, min=0)
    loss: Literal["l2", "kl"] = "l2"
    layers: list[int] = param([5, 10])
    steps: int = param(10, min=1, max=1000)
    note: str | None = None


@dataclass
class Outer:
    train: Inner = field(default_factory=Inner)
    name: str = "x"
    flag: bool = False


def test_defaults_yaml_and_overrides_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.5\n  steps: 3\nname: fromfile\n")
    cfg = load_config(Outer, path, ["--train.lr", "2e-4", "--train.layers=[1,2,3]", "--flag"])
    assert cfg.train.lr == 2e-4 and cfg.train.steps == 3 and cfg.name == "fromfile"
    assert cfg.train.layers == [1, 2, 3] and cfg.flag is True and cfg.train.loss == "l2"


@pytest.mark.parametrize("overrides, message", [
    (["--train.lr", "-1"], "train.lr: -1.0 is below the minimum 0"),
    (["--train.steps", "5000"], "train.steps: 5000 is above the maximum 1000"),
    (["--train.loss", "mse"], "train.loss: 'mse' is not allowed; choose one of 'l2', 'kl'"),
    (["--train.lrr", "1"], "train.lrr: unknown key; allowed keys are layers, loss, lr, note, steps"),
    (["--train.steps", "2.5"], "train.steps: expected an integer"),
    (["--train.lr", "fast"], "train.lr: expected a number"),
    (["--flag", "maybe"], "flag: expected true or false"),
    (["--train.layers", "[1, x]"], "train.layers[1]: expected an integer"),
])
def test_errors_name_the_key_and_the_allowed_values(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(Outer, None, overrides)
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Outer, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(Outer, bad)


def test_round_trip_through_dict():
    cfg = load_config(Outer, None, ["--train.note", "hello", "--train.layers", "7"])
    assert cfg.train.layers == [7]
    assert from_dict(Outer, to_dict(cfg)) == cfg


def test_parse_overrides_nests_and_reads_yaml_values():
    assert parse_overrides(["--a.b.c", "1", "--d=[x, y]", "--e-f", "null"]) == \
        {"a": {"b": {"c": 1}}, "d": ["x", "y"], "e_f": None}
    with pytest.raises(ConfigError, match="--dotted.key value"):
        parse_overrides(["lr", "1"])


@dataclass
class WithWeights:
    weights: dict[str, float] = param({"l2": 1.0})
    train: Inner = field(default_factory=Inner)


@pytest.mark.parametrize("overrides, message", [
    (["--weights", "{l2: 1, kl:2}"], "weights: 'kl:2' reads as one key with no value; YAML needs a space after "
                                     "each colon ({kl: 2})"),
    (["--train", "{lr:0.1}"], "train: 'lr:0.1' reads as one key with no value"),
])
def test_a_mapping_without_spaces_after_colons_says_how_to_write_it(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(WithWeights, None, overrides)
    assert str(e.value).startswith(message)
    assert load_config(WithWeights, None, ["--weights", "{l2: 1, kl: 2}"]).weights == {"l2": 1, "kl": 2}
