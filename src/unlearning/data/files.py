"""The one reader of local row files: ``.jsonl``, ``.json``, ``.parquet``, ``.csv``, ``.txt``.

Every local data file (a corpus, a benchmark's stand-in, a question file) is read here, so they
all fail the same way: one line naming the file and what is wrong (not found, empty, not valid
JSON at line N, missing column ``x`` in row N), followed by the caller's fix.

A ``.txt`` file holds one text per blank-line-separated block (rows ``{"text": block}``); a folder
reads every row file in it, in name order, each row tagged ``_file`` (the file's stem, e.g. an MMLU
subject).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unlearning.core.errors import DataError
from unlearning.core.io import missing_path_fix

ROW_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt")


def _fail(what: str, path: Path, problem: str, fix: str = "") -> DataError:
    return DataError(f"{what + ': ' if what else ''}{path}: {problem}{'; ' + fix if fix else ''}")


def read_rows(path: str | Path, what: str = "", columns: Sequence[str] = (), fix: str = "",
              suffixes: Sequence[str] = ROW_SUFFIXES) -> list[dict[str, Any]]:
    """The rows of a local file (or of every file with one of ``suffixes`` in a folder).

    ``what`` prefixes every error (e.g. ``task wmdp_bio``), ``columns`` must be in every row,
    ``fix`` says what a good file looks like."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in suffixes)
        if not files:
            raise _fail(what, path, f"the folder holds no {'/'.join(suffixes)} files", fix)
        return [{**row, "_file": f.stem} for f in files for row in read_rows(f, what, columns, fix, suffixes)]
    if not path.is_file():
        raise _fail(what, path, "file not found", missing_path_fix(path))
    if path.suffix not in suffixes:
        raise _fail(what, path, f"not a {'/'.join(suffixes)} file", fix)
    if path.stat().st_size == 0:
        raise _fail(what, path, "the file is empty", fix)
    rows = _READERS[path.suffix](path, what, fix)
    if not rows:
        raise _fail(what, path, "the file has no rows", fix)
    if not all(isinstance(r, dict) for r in rows):
        raise _fail(what, path, "every row must be a JSON object (one per line in .jsonl)", fix)
    require_columns(rows, columns, what, path, fix)
    return rows


def require_columns(rows: Sequence[dict[str, Any]], columns: Sequence[str], what: str, source: str | Path,
                    fix: str = "") -> None:
    """Fail naming the first row (1-based) that lacks one of ``columns``."""
    for i, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        if missing:
            have = ", ".join(k for k in row if not k.startswith("_"))
            raise _fail(what, Path(source), f"row {i + 1}: missing column {missing[0]!r} (columns: {have}); "
                                            f"rows need {', '.join(columns)}", fix)


def _json_rows(path: Path, what: str, fix: str) -> list[Any]:
    text = path.read_text()
    if text.lstrip().startswith("["):  # one JSON array of rows
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise _fail(what, path, f"not valid JSON at line {e.lineno} ({e.msg})", fix) from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):  # JSON lines (a .json file may hold them too)
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise _fail(what, path, f"line {lineno} is not valid JSON ({e.msg})", fix) from None
    return rows


def _parquet_rows(path: Path, what: str, fix: str) -> list[Any]:
    import pyarrow.parquet  # heavy; only parquet files need it

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several kinds for a malformed file
        raise _fail(what, path, f"cannot be read as parquet ({type(e).__name__}: {e})", fix) from None


def _csv_rows(path: Path, what: str, fix: str) -> list[Any]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _text_rows(path: Path, what: str, fix: str) -> list[Any]:
    return [{"text": block.strip()} for block in re.split(r"\n\s*\n", path.read_text()) if block.strip()]


_READERS = {".jsonl": _json_rows, ".json": _json_rows, ".parquet": _parquet_rows, ".csv": _csv_rows,
            ".txt": _text_rows}
