"""Atomic writes and run directories: a killed writer never leaves half a result file."""

import json
import os
from unittest import mock

import pytest

from unlearning.core.io import append_jsonl, atomic_write_json, read_jsonl
from unlearning.core.rundir import RunDir


def test_atomic_write_keeps_old_file_when_the_write_dies(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"a": 1})
    real_fsync = os.fsync

    def boom(fd):
        real_fsync(fd)
        raise KeyboardInterrupt  # killed between write and rename
    with mock.patch("unlearning.core.io.os.fsync", boom), pytest.raises(KeyboardInterrupt):
        atomic_write_json(path, {"a": 2, "big": list(range(1000))})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left behind


def test_jsonl_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"step": 1})
    append_jsonl(path, {"step": 2})
    with open(path, "a") as f:
        f.write('{"step": 3, "lo')
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]


def test_rundir_layout(tmp_path):
    rd = RunDir(tmp_path / "r")
    rd.write_config({"x": 1})
    rd.write_results({"organism_hazard_cloze": {"acc": 0.5}})
    logger = rd.metrics_logger()
    logger.log({"loss": 1.5}, step=1)
    assert (tmp_path / "r" / "config.yaml").read_text().strip() == "x: 1"
    assert rd.read_results() == {"organism_hazard_cloze": {"acc": 0.5}}
    rec = read_jsonl(rd.metrics_path)[0]
    assert rec["loss"] == 1.5 and rec["step"] == 1
