"""Organism model names -> local folders (building the organism on first use).

``organism:<preset>`` is the unfiltered model, ``organism:<preset>-filtered`` its filtered twin,
``organism:<preset>@step<N>`` (or ``revision="step<N>"``) an early pretraining checkpoint and
``revision="early"`` the checkpoint the build chose as the default early one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from unlearning.core.errors import ModelNotFoundError
from unlearning.organism.presets import PRESETS

PREFIX = "organism:"
_NAME = re.compile(r"^organism:(?P<preset>[^@]+?)(?P<filtered>-filtered)?(?:@(?P<revision>[^@]+))?$")
MAIN_REVISIONS = (None, "", "main")


@dataclass(frozen=True)
class OrganismName:
    preset: str
    filtered: bool
    revision: str | None  # None: the final model; "early" or "step<N>": a checkpoint


def is_organism_name(name: str) -> bool:
    return str(name).startswith(PREFIX)


def parse_organism_name(name: str, revision: str | None = None) -> OrganismName:
    """Split ``organism:<preset>[-filtered][@<revision>]``; ``revision`` may also come separately."""
    match = _NAME.match(str(name))
    if not match:
        raise ModelNotFoundError(
            f"model: {name!r} is not an organism name; write organism:<preset>[-filtered][@step<N>|@early] "
            f"with a preset among {', '.join(PRESETS)}")
    preset = match["preset"]
    if preset not in PRESETS:
        raise ModelNotFoundError(f"model: unknown organism preset {preset!r} in {name!r}; "
                                 f"choose one of {', '.join(PREFIX + p for p in PRESETS)}")
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


def resolve_organism(name: str, revision: str | None = None) -> Path:
    """The save_pretrained() folder an organism name and revision point to (built if missing)."""
    from unlearning.organism.build import ensure_organism

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
