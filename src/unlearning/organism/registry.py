"""Organism model names -> local folders (building the organism on first use).

``organism:<preset>`` is the unfiltered model, ``organism:<preset>-filtered`` its filtered twin,
``organism:<preset>@step<N>`` (or ``revision="step<N>"``) an early pretraining checkpoint and
``revision="early"`` the checkpoint the build chose as the default early one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from unlearning.core.config import read_yaml
from unlearning.core.errors import ModelNotFoundError
from unlearning.organism.build import ensure_organism
from unlearning.organism.presets import PRESETS

PREFIX = "organism:"
_NAME = re.compile(r"^organism:(?P<preset>[^@]+?)(?P<filtered>-filtered)?(?:@(?P<revision>[^@]+))?$")
MAIN_REVISIONS = (None, "", "main")
RUN_CONFIG = "config.yaml"  # a run directory's config; its ``model`` names the model the run started from


@dataclass(frozen=True)
class OrganismName:
    preset: str
    filtered: bool
    revision: str | None  # None: the final model; "early" or "step<N>": a checkpoint


def is_organism_name(name: str) -> bool:
    return str(name).startswith(PREFIX)


def _match(name: str) -> re.Match[str]:
    """The name's parts, its preset checked (the combinations are checked by the callers)."""
    match = _NAME.match(str(name))
    if not match:
        raise ModelNotFoundError(
            f"model: {name!r} is not an organism name; write organism:<preset>[-filtered][@step<N>|@early] "
            f"with a preset among {', '.join(PRESETS)}")
    if match["preset"] not in PRESETS:
        raise ModelNotFoundError(f"model: unknown organism preset {match['preset']!r} in {name!r}; "
                                 f"choose one of {', '.join(PREFIX + p for p in PRESETS)}")
    return match


def parse_organism_name(name: str, revision: str | None = None) -> OrganismName:
    """Split ``organism:<preset>[-filtered][@<revision>]``; ``revision`` may also come separately."""
    match = _match(name)
    preset = match["preset"]
    in_name = match["revision"]
    revision = None if revision in MAIN_REVISIONS else revision
    if in_name and revision and in_name != revision:
        raise ModelNotFoundError(f"model: {name!r} names revision {in_name!r} but revision={revision!r} was "
                                 f"given too; give one of them")
    revision = in_name or revision
    if match["filtered"] and revision:
        raise ModelNotFoundError(f"model: {name!r} with revision {revision!r}: the filtered twin has no "
                                 f"checkpoints; checkpoints belong to organism:{preset}")
    return OrganismName(preset=preset, filtered=bool(match["filtered"]), revision=revision)


def organism_preset(model: str | Path) -> str | None:
    """The organism preset behind a model: ``organism:small-filtered@step200`` -> ``small``; a run
    directory -> the preset of the model its ``config.yaml`` names (followed through runs of runs);
    ``None`` for any other model. The one parser of model names into presets: runner, commands and
    attacks all ask here (an unknown preset fails here, naming the known ones)."""
    seen: set[str] = set()
    text = str(model)
    while not is_organism_name(text):
        config = Path(text).expanduser() / RUN_CONFIG
        if text in seen or not config.is_file():
            return None
        seen.add(text)
        inner = read_yaml(config).get("model")
        if not isinstance(inner, str):
            return None
        text = inner
    return _match(text)["preset"]


def resolve_organism(name: str, revision: str | None = None) -> Path:
    """The save_pretrained() folder an organism name and revision point to (built if missing)."""
    parsed = parse_organism_name(name, revision)
    paths = ensure_organism(parsed.preset)
    if parsed.filtered:
        return paths.filtered
    if parsed.revision is None:
        return paths.model
    valid = paths.revisions()
    rev = paths.early_revision() if parsed.revision == "early" else parsed.revision
    if not valid:
        raise ModelNotFoundError(f"revision: {parsed.revision!r}: organism:{parsed.preset} was built without "
                                 f"checkpoints (train.checkpoint_fracs is empty); the only revision is main")
    if rev not in valid:
        raise ModelNotFoundError(f"revision: {parsed.revision!r} is not a checkpoint of organism:{parsed.preset}; "
                                 f"valid revisions: main, early ({paths.early_revision()}), {', '.join(valid)}")
    return paths.checkpoint(rev)
