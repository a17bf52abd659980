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

BUILD_KEYS = ("format_version", "config")  # any format's build.json: enough to tell a stale build
CURRENT_KEYS = ("checkpoint_steps", "early_checkpoint", "corpus_counts")  # the current format's, used below


def _require_keys(paths: Any, info: Any, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in info] if isinstance(info, dict) else list(keys)
    if missing:
        raise CorruptFileError(f"{paths.build_json} is corrupt (no {', '.join(missing)}); "
                               f"{organism_fix(paths.preset)}")


def read_build_info(paths: Any) -> dict[str, Any]:
    """``build.json`` parsed, or a one-line error naming it and the rebuild command."""
    info = check_json(paths.build_json, organism_fix(paths.preset))
    _require_keys(paths, info, BUILD_KEYS)
    return info


def _require_file(path: Path, fix: str) -> None:
    if not path.is_file():
        raise CorruptFileError(f"{path} is missing; {fix}")
    if path.stat().st_size == 0:
        raise CorruptFileError(f"{path} is empty; {fix}")


def check_cache(paths: Any, info: dict[str, Any]) -> None:
    """Every file a complete build left (``info`` is its build.json) is present and whole."""
    fix = organism_fix(paths.preset)
    _require_keys(paths, info, CURRENT_KEYS)
    for path in (paths.quality_json, paths.world_json):
        check_json(path, fix)
    for name in info["corpus_counts"]:  # every data file the build wrote, corpora and question sets
        _require_file(paths.data / name, fix)
    _require_file(paths.root / "tokenizer" / "tokenizer.json", fix)
    folders = [paths.model, paths.filtered] + [paths.checkpoint(f"step{s}") for s in info["checkpoint_steps"]]
    for folder in folders:
        check_model_folder(folder, fix, complete=True)
