"""Attack cells in the results store: a grid of probe and in-context cells (no fine-tuning curve) is
recorded with its cells and their status, and a version-1 store (without the cell columns) is migrated
when opened and re-reads its tamper folders."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import yaml

from unlearning.core.run_records import describe_run_dir
from unlearning.core.store import ADDED_IN_2, Store


def tamper_folder(root: Path, name: str, records: dict) -> Path:
    """A tamper folder as the grid writes it, by hand: config.yaml, and results.json with no fine-tuning."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": ["m"], "attack": {"steps": 1}}))
    (folder / "results.json").write_text(json.dumps({"grid": {"task": "t", "columns": [], "rows": []},
                                                     "records": records}))
    return folder


def test_a_probe_only_grid_is_recorded_complete_with_its_cells(tmp_path):
    probe = {"kind": "probe", "model": "m", "role": "model", "status": "complete", "error": None, "task": "t",
             "headline": {"metric": "best-layer probe accuracy (held-out entities)", "value": 0.5}}
    failed = {**probe, "kind": "in_context", "status": "failed", "error": "boom", "headline": {"metric": "acc",
                                                                                                 "value": None}}
    store = Store(tmp_path)
    store.record(tamper_folder(tmp_path, "complete", {"m-probe": probe}))
    store.record(tamper_folder(tmp_path, "failed", {"m-probe": probe, "m-icl": failed}))
    [ok, bad] = store.records(run_dirs=["complete", "failed"])
    assert ok["status"] == "complete" and [(a["kind"], a["value"]) for a in ok["attacks"]] == [("probe", 0.5)]
    assert bad["status"] == "failed" and bad["error"] == "boom"


def test_a_schema_1_store_gains_the_cell_columns_and_re_reads_its_tamper_folders(tmp_path):
    probe = {"kind": "probe", "model": "m", "role": "model", "status": "complete", "task": "t",
             "headline": {"metric": "best-layer probe accuracy (held-out entities)", "value": 0.5}}
    tamper_folder(tmp_path, "grid", {"m-probe": probe})
    store = Store(tmp_path)
    store.connect().close()
    con = sqlite3.connect(store.path)  # as version 1 made it: without the columns, the probe unrecorded
    for column in ADDED_IN_2:
        con.execute(f"ALTER TABLE attacks DROP COLUMN {column}")
    con.execute("INSERT INTO runs (run_dir, kind, status, config, varied, signature) "
                "VALUES ('grid', 'tamper', 'running', '{}', '{}', ?)", (describe_run_dir(tmp_path / "grid", tmp_path)["run"]["signature"],))
    con.execute("PRAGMA user_version=1")
    con.commit()
    con.close()
    assert store.sync() == 1  # migrated on opening, and the folder read again though its files did not change
    [run] = store.records()
    assert run["status"] == "complete" and [(a["attack"], a["kind"], a["value"]) for a in run["attacks"]] == [
        ("m-probe", "probe", 0.5)]
    assert store.query("PRAGMA user_version")[0]["user_version"] == 2
