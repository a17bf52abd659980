"""Atomic file writes: a killed process never leaves a half-written result file.

Files get the mode a plain ``open()`` would give them (0644 under the usual umask 022), so a run's
results and weights are readable by the group or other users the umask allows: temp-file writers
(``tempfile.mkstemp``, and safetensors >= 0.8, which writes through a 0600 temp file and renames it:
safetensors issue #782) would otherwise leave every file private to its writer.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (``os.umask`` can only be
    read by setting it, which for a moment gives files other threads create the wrong mode)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_mode(directory: bool = False) -> int:
    """The mode ``open()`` (``mkdir()`` for a directory) gives a new file under the current umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def match_umask(path: str | Path) -> Path:
    """Give ``path`` (and, for a folder, everything in it) the mode a plain write would have given it.

    For folders filled by writers that ignore the umask (``tempfile.mkdtemp``, safetensors'
    ``save_file`` and so ``save_pretrained``), called before the folder is renamed into place.
    """
    path = Path(path)
    file_mode, dir_mode = umask_mode(), umask_mode(directory=True)
    items = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in items:
        if not item.is_symlink():
            item.chmod(dir_mode if item.is_dir() else file_mode)
    return path


def missing_path_fix(path: Path) -> str:
    """The fix for a path that is not there: where a relative one was looked for."""
    return ("check the path" if path.is_absolute()
            else f"check the path (relative paths start from the working directory, {Path.cwd()})")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write to a temp file in the same folder, fsync, then rename over ``path`` (with the umask's mode)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), umask_mode())  # mkstemp creates 0600 whatever the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def dumps_json(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(obj, indent=indent, default=_json_default, allow_nan=True)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, dumps_json(obj) + "\n")


def atomic_write_yaml(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line; a line is written whole with a single write call."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, default=_json_default) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read JSON lines, skipping a torn last line left by a killed writer."""
    out = []
    path = Path(path)
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def is_finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
