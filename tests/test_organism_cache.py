"""A corrupt or partial organism cache is one line naming the file and `unlearn organism build --force`.

Each test damages a copy of the session's tiny build (the shared cache is never touched); the checks
run where the cache is opened (``ensure_organism``), so every model name and command gets them.
"""

from __future__ import annotations

import json
import shutil

import pytest

from unlearning.cli import main
from unlearning.commands.organism import OrganismCommandConfig
from unlearning.core.cli import parse_command
from unlearning.core.errors import CorruptFileError
from unlearning.model.loading import resolve_model_path
from unlearning.organism import build, ensure_organism, organism_paths

FIX = "`unlearn organism build --preset tiny --force`"


@pytest.fixture
def cache(tiny_organism, tmp_path, monkeypatch):
    """A private copy of the tiny build under a temp UNLEARNING_HOME; returns its OrganismPaths."""
    monkeypatch.setenv("UNLEARNING_HOME", str(tmp_path / "home"))
    paths = organism_paths("tiny")
    shutil.copytree(tiny_organism.root, paths.root)
    return paths


def truncate(path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def expect_one_line(path_named) -> str:
    with pytest.raises(CorruptFileError) as e:
        ensure_organism("tiny")
    message = str(e.value)
    assert str(path_named) in message and FIX in message and "\n" not in message
    return message


def test_an_intact_copy_opens(cache):
    assert ensure_organism("tiny") == cache
    assert resolve_model_path("organism:tiny@early").parent == cache.checkpoints


@pytest.mark.parametrize("folder", ["model", "filtered", "checkpoint"])
def test_a_truncated_model_file_is_named(cache, folder):
    root = cache.checkpoint(cache.revisions()[0]) if folder == "checkpoint" else getattr(cache, folder)
    truncate(root / "model.safetensors")
    assert "is truncated or corrupt" in expect_one_line(root / "model.safetensors")


def test_a_missing_model_file_is_named(cache):
    (cache.filtered / "model.safetensors").unlink()
    assert "holds no weights file" in expect_one_line(cache.filtered)


@pytest.mark.parametrize("text", ['{"format_version": 3, "conf', "[]", "{}"])
def test_a_corrupt_build_json_is_named(cache, text):
    cache.build_json.write_text(text)
    assert "is corrupt" in expect_one_line(cache.build_json)


def test_a_build_json_without_the_current_keys_is_named(cache):
    info = json.loads(cache.build_json.read_text())
    del info["corpus_counts"]
    cache.build_json.write_text(json.dumps(info))
    assert "no corpus_counts" in expect_one_line(cache.build_json)


def test_an_older_format_is_stale_not_corrupt(cache):
    cache.build_json.write_text(json.dumps({"format_version": -1, "config": {}}))  # rebuilt, as before
    assert build._stored_build(cache, force=False) is None


def test_force_rebuilds_past_an_unreadable_build_json(cache):
    cache.build_json.write_text("not json")
    assert build._stored_build(cache, force=True) is None    # --force goes on to rebuild, no error
    with pytest.raises(CorruptFileError):
        build._stored_build(cache, force=False)


@pytest.mark.parametrize("name", ["forget.jsonl", "questions/hazard.jsonl", "questions_qa/general.jsonl"])
def test_a_missing_data_file_is_named(cache, name):
    (cache.data / name).unlink()
    assert "is missing" in expect_one_line(cache.data / name)


def test_an_empty_data_file_and_a_corrupt_quality_json_are_named(cache):
    (cache.data / "retain.jsonl").write_text("")
    assert "is empty" in expect_one_line(cache.data / "retain.jsonl")
    (cache.data / "retain.jsonl").write_text('{"text": "x"}\n')
    cache.quality_json.write_text('{"unfiltered": ')
    expect_one_line(cache.quality_json)


def test_the_cli_prints_one_line_and_the_force_flag_exists(cache, capsys):
    truncate(cache.model / "model.safetensors")
    code = main(["organism", "build", "--preset", "tiny"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("unlearn organism: error: ")]
    assert code == 2 and len(errors) == 1   # 2: the CLI caught a UserError (anything else would raise)
    assert "model.safetensors is truncated" in errors[0] and FIX in errors[0]
    cfg, _ = parse_command(OrganismCommandConfig, ["build", "--preset", "tiny", "--force"], prog="unlearn organism")
    assert cfg.force
