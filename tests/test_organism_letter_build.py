"""The tiny-letter organism build (built once per cache, like tiny): it answers in the letter format
above chance on held-out entities, its twin stays near chance on hazard, and the cache key follows
the exercise settings."""

from __future__ import annotations

import shutil

import pytest

from unlearning.organism import build, ensure_organism, organism_paths
from unlearning.organism.presets import PRESETS

pytestmark = pytest.mark.slow
PRESET = "tiny-letter"


@pytest.fixture(scope="module")
def letter_organism():
    return ensure_organism(PRESET, seed=PRESETS[PRESET].seed)


def test_cache_key_follows_the_exercise_settings(letter_organism, tmp_path, monkeypatch):
    """A copy of the build is reused as it is, and rebuilt once an exercise setting changes."""
    monkeypatch.setenv("UNLEARNING_HOME", str(tmp_path / "home"))
    shutil.copytree(letter_organism.root, organism_paths(PRESET).root)
    builds = []
    monkeypatch.setattr(build, "build_organism", lambda cfg, paths: builds.append(cfg))
    ensure_organism(PRESET)
    assert builds == []
    ensure_organism(PRESET, overrides={"corpus": {"exercises_per_fact": 1}})
    assert [cfg.corpus.exercises_per_fact for cfg in builds] == [1]
