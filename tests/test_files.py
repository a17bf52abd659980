"""The one local row-file reader (unlearning.data.files): every format, and one-line errors that name
the file, the problem and the fix."""

from __future__ import annotations

import json

import datasets
import pytest

from unlearning.core.errors import DataError
from unlearning.data.files import read_rows, require_columns

ROWS = [{"text": "a", "n": 1}, {"text": "b", "n": 2}]


def test_every_format_reads_the_same_rows(tmp_path):
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n")
    (tmp_path / "r.json").write_text(json.dumps(ROWS, indent=1))
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "r.parquet"))
    for suffix in (".jsonl", ".json", ".parquet"):
        assert read_rows(tmp_path / f"r{suffix}", columns=("text",)) == ROWS, suffix
    (tmp_path / "r.csv").write_text("text,n\na,1\nb,2\n")
    assert read_rows(tmp_path / "r.csv") == [{"text": "a", "n": "1"}, {"text": "b", "n": "2"}]
    (tmp_path / "r.txt").write_text("first text\nstill first\n\n\nsecond\n")
    assert read_rows(tmp_path / "r.txt") == [{"text": "first text\nstill first"}, {"text": "second"}]


def test_a_folder_reads_its_files_in_order_tagged_with_their_stem(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps(ROWS[1]) + "\n")
    (tmp_path / "a.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    (tmp_path / "notes.md").write_text("ignored")
    assert read_rows(tmp_path, suffixes=(".jsonl",)) == [{**ROWS[0], "_file": "a"}, {**ROWS[1], "_file": "b"}]
    with pytest.raises(DataError, match="the folder holds no .parquet files"):
        read_rows(tmp_path, suffixes=(".parquet",))


@pytest.mark.parametrize("name, content, message", [
    ("missing.jsonl", None, "missing.jsonl: file not found; check the path"),
    ("empty.jsonl", "", "empty.jsonl: the file is empty; FIX"),
    ("blank.jsonl", "\n\n", "blank.jsonl: the file has no rows; FIX"),
    ("bad.jsonl", '{"text": "a"}\n{"text": \n', "bad.jsonl: line 2 is not valid JSON .*; FIX"),
    ("bad.json", '[{"text": "a"},\n {"text": }]', "bad.json: not valid JSON at line 2 .*; FIX"),
    ("list.jsonl", '["a", "b"]\n', "list.jsonl: every row must be a JSON object"),
    ("cols.jsonl", '{"text": "a"}\n{"body": "b"}\n', r"cols.jsonl: row 2: missing column 'text' \(columns: body\)"),
    ("data.xlsx", "x", r"data.xlsx: not a .jsonl/.json/.parquet/.csv/.txt file"),
    ("broken.parquet", "not parquet", "broken.parquet: cannot be read as parquet"),
])
def test_errors_are_one_line_naming_the_file(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message) as info:
        read_rows(tmp_path / name, "data source", columns=("text",), fix="FIX")
    text = str(info.value)
    assert text.startswith(f"data source: {tmp_path / name}: ") and "\n" not in text


def test_require_columns_names_the_first_bad_row():
    with pytest.raises(DataError, match=r"task x: hub: row 3: missing column 'answer'.*rows need question, answer"):
        require_columns([{"question": 1, "answer": 2}] * 2 + [{"question": 3}], ("question", "answer"), "task x",
                        "hub")
