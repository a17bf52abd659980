"""The results store: a 4-run sweep fills it, a second invocation skips every row and changes nothing,
--rebuild recreates the same store from the run directories, several processes record at once, a
killed sweep (SIGKILL) resumes with the store following, and a store that cannot be written never
costs a run. The report's tables (test_report_store.py) read this store.

The runs are the sweep tests' local job (tests/run_setup.py: a 4-layer random GPT-NeoX) with its
questions split into a hazard and a general file, evaluated as the organism tasks of those names,
and a second random model as the filtered twin.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from run_setup import Job
from tiny_models import VOCAB, save_tiny
from unlearning import sweep as sweep_module
from unlearning.cli import main
from unlearning.core.faults import ENV
from unlearning.core.io import read_json, read_jsonl
from unlearning.core.store import STORE_FILE, Store, describe_run_dir
from unlearning.sweep import load_grid, run_grid

SRC = Path(__file__).resolve().parents[1] / "src"
REMOVE, RETAIN = (1.0, 40.0), (0.0, 3.0)


def questions(path: Path, seed: int, n: int = 6) -> str:
    rng = random.Random(seed)
    rows = [{"question": f"w{rng.randrange(3, VOCAB)} w{rng.randrange(3, VOCAB)}",
             "choices": [f"w{rng.randrange(3, VOCAB)}" for _ in range(4)], "answer": rng.randrange(4)} for _ in range(n)]
    path.write_text("".join(json.dumps(q) + "\n" for q in rows))
    return str(path)


def store_job(root: Path) -> Job:
    """The local job with hazard / general question files and a filtered-twin stand-in (another random model)."""
    job = Job(root)
    job.hazard, job.general = questions(root / "hazard.jsonl", 11), questions(root / "general.jsonl", 12)
    save_tiny(root / "twin", family="gpt_neox", layers=4, seed=5)
    return job


def grid_file(job: Job, name: str = "g", *, remove=REMOVE, retain=RETAIN, **sections) -> Path:
    base = job.data("unused", eval={"tasks": [f"organism_hazard_cloze={job.hazard}",
                                              f"organism_general_cloze={job.general}"],
                                    "reference": str(job.root / "twin"), "batch_size": 8},
                    sequential={"steps_per_layer": 1}, **sections)
    del base["name"]
    (job.root / f"{name}-base.yaml").write_text(yaml.safe_dump(base))
    path = job.root / f"{name}.yaml"
    path.write_text(f"base: {name}-base.yaml\nname: {name}\ngrid:\n  sequential.remove_coef: {list(remove)}\n"
                    f"  sequential.retain_coef: {list(retain)}\n")
    return path


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A 4-run sweep (remove_coef x retain_coef), run once for the module."""
    job = store_job(tmp_path_factory.mktemp("store"))
    grid = load_grid(grid_file(job))
    outcomes = run_grid(grid)
    assert [o.status for o in outcomes] == ["complete"] * 4
    job.grid, job.store = grid, Store(job.runs)
    return job


def git_head() -> str:
    return subprocess.run(["git", "-C", str(SRC), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def numbers(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(numbers(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def test_a_sweep_fills_the_store_with_each_row_s_config_results_and_loss_terms(swept):
    records = swept.store.records(sweep="g")
    assert len(records) == 4 and {r["status"] for r in records} == {"complete"} and {r["kind"] for r in records} == {"run"}
    assert swept.store.query("PRAGMA journal_mode")[0]["journal_mode"] == "wal"
    by_name = {r["run_dir"]: r for r in records}
    for row in swept.grid.rows:
        folder = swept.runs / "g" / row.name
        rec = by_name[f"g/{row.name}"]
        assert rec["varied"] == row.overrides  # the swept keys with the row's values
        assert rec["config"] == yaml.safe_load((folder / "config.yaml").read_text())
        assert rec["git_commit"] == git_head() and rec["method"] == "sequential"
        results = read_json(folder / "results.json")
        assert rec["started_at"] == results["started_at"] and rec["finished_at"] == results["finished_at"]
        for section in ("before", "after", "reference"):  # every number of every task
            stored = {f"{t}.{m}": v for t, ms in rec["metrics"][section].items() for m, v in ms.items()}
            assert stored == numbers(results[section]), section
        last = read_jsonl(folder / "metrics.jsonl")[-1]
        assert rec["terms"]["final"] == {k: v for k, v in last.items() if k not in ("step", "phase", "layer",
                                                                                   "phase_step", "time")}
        assert rec["reference_model"] == str(swept.root / "twin")
        assert (folder / "training.png").stat().st_size > 10_000  # drawn at the end of training


def test_a_second_invocation_skips_all_four_and_leaves_the_store_as_it_was(swept, monkeypatch):
    before = swept.store.dump()
    calls = []
    monkeypatch.setattr(sweep_module, "run", lambda cfg, **kw: calls.append(cfg.name))
    outcomes = run_grid(swept.grid)
    assert calls == [] and [o.note for o in outcomes] == ["complete, skipped"] * 4
    assert swept.store.sync() == 0 and swept.store.dump() == before


def test_rebuild_recreates_the_same_store_from_the_run_directories(swept, tmp_path):
    before = swept.store.dump()
    assert len(before["runs"]) >= 4 and before["metrics"] and before["terms"]
    db = swept.runs / STORE_FILE
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    assert swept.store.rebuild() == len(before["runs"])
    assert swept.store.dump() == before
    db.write_bytes(b"this is not a database" * 100)  # a damaged file is moved aside, then rebuilt
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    swept.store.rebuild()
    assert swept.store.dump() == before and list(swept.runs.glob(f"{STORE_FILE}.corrupt-*"))


WRITER = """
import sys, time
from unlearning.core.store import Store
root, folders, start = sys.argv[1], sys.argv[2:-1], float(sys.argv[-1])
while time.time() < start:  # every writer begins at the same moment
    time.sleep(0.001)
store = Store(root)
for _ in range(3):
    for folder in folders:
        store.record(folder)
"""


def test_concurrent_processes_record_at_once_without_losing_a_record(tmp_path):
    root = tmp_path / "runs"
    folders = []
    for i in range(24):
        d = root / "g" / f"row{i}"
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(yaml.safe_dump({"method": "sequential", "sequential": {"remove_coef": i}}))
        (d / "results.json").write_text(json.dumps({"status": "complete", "after": {"t": {"acc": i / 24}}}))
        (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "forget_loss": float(i)}) + "\n")
        folders.append(str(d))
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    start = f"{__import__('time').time() + 2.0}"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(root), *folders[i::2], *folders, start], env=env,
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    store = Store(root)
    assert store.query("PRAGMA integrity_check")[0]["integrity_check"] == "ok"
    records = store.records()
    assert sorted(r["run_dir"] for r in records) == sorted(f"g/row{i}" for i in range(24))
    assert all(r["metrics"]["after"]["t"]["acc"] == int(r["run_dir"][5:]) / 24 for r in records)
    assert all(r["terms"]["final"] == {"forget_loss": float(r["run_dir"][5:])} for r in records)
    assert store.query("SELECT COUNT(*) AS n FROM metrics")[0]["n"] == 24  # no duplicated rows


def unlearn(*args: str, fault: str | None = None, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1", PYTHONPATH=str(SRC))
    if fault:
        env[ENV] = fault
    return subprocess.run([sys.executable, "-m", "unlearning.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_killed_sweep_resumes_and_the_store_follows_it(tmp_path, capsys):
    """Killed with SIGKILL in a real process (no finally, no atexit), then resumed here."""
    job = store_job(tmp_path)
    grid = grid_file(job, "k", remove=(1.0, 4.0), retain=(1.0,), train={"checkpoint_every": 1})
    # 3 steps a row: step 5 is the second row's second step
    killed = unlearn("sweep", str(grid), fault="train_step:5", cwd=job.root)
    assert killed.returncode == -9, killed.stderr[-2000:]
    store = Store(job.runs)
    assert [r["status"] for r in store.records(sweep="k")] == ["complete", "running"]
    assert main(["sweep", str(grid)]) == 0
    done = capsys.readouterr()
    records = store.records(sweep="k")
    assert [r["status"] for r in records] == ["complete", "complete"]
    assert records[1]["resumed_at"] is not None and records[1]["metrics"]["after"]
    assert "| k/remove_coef4.0_retain_coef1.0" in done.out  # the sweep prints the store's table
    live = store.dump()
    store.rebuild()
    assert store.dump() == live


def test_a_store_that_cannot_be_written_loses_no_run_and_a_plot_error_fails_nothing(tmp_path, monkeypatch):
    """results.db is a folder (no database can open there) and the training plot raises: the run
    completes, log.txt says both, and the next report (a sync) records the run."""
    from unlearning import runner
    job = store_job(tmp_path)
    (job.runs / STORE_FILE).mkdir(parents=True)
    def broken(run_dir):
        raise RuntimeError("no display today")
    monkeypatch.setattr(runner, "write_training_curves", broken)
    results = runner.run(job.config("solo", eval={"tasks": [f"organism_hazard_cloze={job.hazard}"]}))
    assert results["status"] == "complete" and job.results("solo")["status"] == "complete"
    log = (job.runs / "solo" / "log.txt").read_text()
    assert "results store" in log and "--rebuild" in log and "training curves not drawn" in log
    (job.runs / STORE_FILE).rmdir()
    store = Store(job.runs)
    assert store.sync() == 1 and store.records()[0]["status"] == "complete"
    assert describe_run_dir(job.runs / "solo", job.runs)["run"]["signature"] == store.records()[0]["signature"]


def test_a_trial_json_written_after_the_run_is_picked_up_for_its_study(swept):
    """unlearn tune writes trial.json into a trial's folder once the run is over: the next report's
    sync records the study, the trial and its parameters."""
    d = swept.root / "study-runs" / "t0"
    d.mkdir(parents=True)
    for name in ("config.yaml", "results.json", "metrics.jsonl"):
        (d / name).write_bytes((swept.runs / "g" / swept.grid.rows[0].name / name).read_bytes())
    store = Store(swept.root / "study-runs")
    store.sync()
    assert store.records()[0]["study"] is None
    (d / "trial.json").write_text(json.dumps({"study": "s", "trial": 0, "state": "complete",
                                              "params": {"sequential.remove_coef": 1.0}}))
    assert store.sync() == 1
    [rec] = store.records(study="s")
    assert (rec["trial"], rec["trial_state"], rec["varied"]) == (0, "complete", {"sequential.remove_coef": 1.0})
    assert store.query("SELECT study FROM runs", frame=False) == [{"study": "s"}]
    with pytest.raises(sqlite3.OperationalError):
        store.query("SELECT nope FROM runs")
