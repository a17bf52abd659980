"""Cheap checks that a saved model's files are whole, done before loading it.

A truncated or corrupt file (a copy or download cut short, a full disk) otherwise surfaces as a deep
traceback from inside transformers that does not name the file. Here it is one
:class:`CorruptFileError` naming the file and the fix. Cheap: a safetensors file's header is read
(safetensors itself checks that the header's tensors cover the file exactly, which a truncated copy
breaks), JSON files are parsed; no tensor data is read or hashed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from unlearning.core.errors import CorruptFileError
from unlearning.core.paths import unlearning_home

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def organism_fix(preset: str) -> str:
    return f"rebuild the organism: `unlearn organism build --preset {preset} --force`"


def resave_fix(folder: str | Path) -> str:
    """How to write ``folder``'s model again: rebuild it if it is part of the organism cache."""
    root = (unlearning_home() / "organism").resolve()
    try:
        preset = Path(folder).resolve().relative_to(root).parts[0]
    except (ValueError, IndexError):
        return "re-save the model (or download it again)"
    return organism_fix(preset)


def check_json(path: Path, fix: str) -> Any:
    """``path`` parsed, or a one-line error naming it and ``fix``."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CorruptFileError(f"{path} is missing; {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{path} is corrupt (not valid JSON: {e}); {fix}") from None


def check_safetensors(path: Path, fix: str) -> None:
    """Read ``path``'s header only: safetensors refuses a file its header does not match."""
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise CorruptFileError(f"{path} is truncated or corrupt ({e}); {fix}") from None


def check_model_folder(folder: str | Path, fix: str | None = None, *, complete: bool = False) -> None:
    """The folder's JSON configs parse, its sharded index names shards that exist, and every
    safetensors file's header matches its size; with ``complete``, config.json and a weights file
    must be there too. ``fix`` defaults to :func:`resave_fix`."""
    folder = Path(folder)
    fix = fix or resave_fix(folder)
    if complete and not (folder / "config.json").is_file():
        raise CorruptFileError(f"{folder / 'config.json'} is missing; {fix}")
    for name in ("config.json", "adapter_config.json"):
        if (folder / name).exists():
            check_json(folder / name, fix)
    for index in sorted(folder.glob("*.index.json")):
        data = check_json(index, fix)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        for shard in sorted(set((weight_map or {}).values())):
            if not (folder / shard).is_file():
                raise CorruptFileError(f"{folder / shard} is missing (listed in {index.name}); {fix}")
    if complete and not any(f.suffix in WEIGHT_SUFFIXES for f in folder.iterdir()):
        raise CorruptFileError(f"{folder} holds no weights file (model.safetensors); {fix}")
    for weights in sorted(folder.glob("*.safetensors")):
        check_safetensors(weights, fix)
