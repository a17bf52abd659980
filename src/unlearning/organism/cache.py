"""Cheap checks that a complete-looking organism cache is whole, done each time it is opened.

``build.json`` is written last, so its presence means a build finished; files can still be damaged
afterwards (a copied cache cut short, a full disk, a deleted file). Without these checks that shows
up later as a deep traceback far from the cause. Each check is cheap (presence, size, a JSON parse,
a safetensors header): no file is hashed or loaded in full.

``paths`` is an ``organism.build.OrganismPaths`` (not imported: build.py imports this module).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unlearning.core.errors import CorruptFileError
from unlearning.model.integrity import check_json, check_model_folder, organism_fix

BUILD_KEYS = ("format_version", "config", "checkpoint_steps", "early_checkpoint", "corpus_counts")


def read_build_info(paths: Any) -> dict[str, Any]:
    """``build.json`` parsed, or a one-line error naming it and the rebuild command."""
    info = check_json(paths.build_json, organism_fix(paths.preset))
    missing = [k for k in BUILD_KEYS if k not in info] if isinstance(info, dict) else list(BUILD_KEYS)
    if missing:
        raise CorruptFileError(f"{paths.build_json} is corrupt (no {', '.join(missing)}); "
                               f"{organism_fix(paths.preset)}")
    return info


def _require_file(path: Path, fix: str) -> None:
    if not path.is_file():
        raise CorruptFileError(f"{path} is missing; {fix}")
    if path.stat().st_size == 0:
        raise CorruptFileError(f"{path} is empty; {fix}")


def check_cache(paths: Any, info: dict[str, Any]) -> None:
    """Every file a complete build left (``info`` is its build.json) is present and whole."""
    fix = organism_fix(paths.preset)
    for path in (paths.quality_json, paths.world_json):
        check_json(path, fix)
    for name in info["corpus_counts"]:  # every data file the build wrote, corpora and question sets
        _require_file(paths.data / name, fix)
    _require_file(paths.root / "tokenizer" / "tokenizer.json", fix)
    folders = [paths.model, paths.filtered] + [paths.checkpoint(f"step{s}") for s in info["checkpoint_steps"]]
    for folder in folders:
        check_model_folder(folder, fix, complete=True)
