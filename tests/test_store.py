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
from unlearning.core.run_records import describe_run_dir
from unlearning.core.store import STORE_FILE, Store
from unlearning.sweep import load_grid, run_grid

SRC = Path(__file__).resolve().parents[1] / "src"
REMOVE, RETAIN = (1.0, 40.0), (0.0, 3.0)


def questions(path: Path, seed: int, n: int = 6) -> str:
    rng = random.Random(seed)
    rows = [{"question": f"w{rng.randrange(3, VOCAB)} w{rng.randrange(3, VOCAB)}",
             "choices": [f"w{rng.randrange(3, VOCAB)}" for _ in range(4)], "answer": rng.randrange(4)} for _ in range(n)]
    path.write_text("".join(json.dumps(q) + "\n" for q in rows))
    return str(path)


def known_by(model_dir: Path, path: Path) -> None:
    """Rewrite a question file's answers to the choices ``model_dir`` prefers: the base model "knows"
    every answer (accuracy 1), so unlearning and relearning have something to remove and bring back."""
    from unlearning.evaluation import evaluate
    from unlearning.model.loading import load_model
    from unlearning.tasks import get_tasks
    model, tokenizer = load_model(str(model_dir), device="cpu")
    [result] = evaluate(model, tokenizer, get_tasks([f"{path}:cloze"]), device="cpu", batch_size=8,
                        log_samples=True).values()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row, sample in zip(rows, result["samples"], strict=True):
        row["answer"] = sample["prediction"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def store_job(root: Path) -> Job:
    """The local job with hazard / general question files (the base model knows the hazard answers)
    and a filtered-twin stand-in (another random model)."""
    job = Job(root)
    job.hazard, job.general = questions(root / "hazard.jsonl", 11), questions(root / "general.jsonl", 12)
    known_by(root / "model", root / "hazard.jsonl")
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


def test_a_trial_json_written_after_the_run_is_picked_up_for_its_study(swept, capsys):
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
    assert main(["report", "--runs-root", str(store.root), "--study", "s", "--format", "json"]) == 0
    [table] = json.loads(capsys.readouterr().out)["tables"]
    [row] = [r for r in table["rows"] if r["run"] == "t0"]
    assert row["sequential.remove_coef"] == 1.0 and row["notes"] == "trial 0 complete"
    assert (store.root / "reports" / "s" / "report.json").is_file()  # a study's report has a folder of its own
    with pytest.raises(sqlite3.OperationalError):
        store.query("SELECT nope FROM runs")


# ------------------------------------------------------------------------------------------- the report

def report(capsys, swept, *args: str) -> str:
    assert main(["report", "--runs-root", str(swept.runs), *args]) == 0
    return capsys.readouterr().out


def md_cell(v) -> str:
    return "-" if v is None else ("*" if v else "") if isinstance(v, bool) else f"{v:.4f}" if isinstance(v, float) else str(v)


def test_pareto_front_minimises_hazard_and_maximises_general():
    from unlearning.reporting.pareto import pareto_front
    assert pareto_front([(0.3, 0.8), (0.5, 0.9), (0.4, 0.7), (None, 0.95), (0.3, 0.8)],
                        ["minimize", "maximize"]) == [True, True, False, False, True]


def test_report_tables_match_the_store_in_md_csv_and_json(swept, capsys, tmp_path):
    out = {f: report(capsys, swept, "--sweep", "g", "--format", f, "--output-dir", str(tmp_path / f))
           for f in ("md", "csv", "json")}
    [table] = json.loads(out["json"])["tables"]
    records = {r["run_dir"]: r for r in swept.store.records(sweep="g")}
    first = records[min(records)]
    hazard, general = "organism_hazard_cloze", "organism_general_cloze"
    assert table["title"] == "sequential"
    assert [r["run"] for r in table["rows"]] == [f"base (before): {first['model']}", *sorted(records),
                                                 f"filtered twin: {swept.root / 'twin'}"]
    base, *runs, twin = table["rows"]
    for row, metrics in ((base, first["metrics"]["before"]), (twin, first["metrics"]["reference"])):
        assert (row["hazard acc"], row["general acc"], row["correct_prob"]) == (
            metrics[hazard]["acc"], metrics[general]["acc"], metrics[hazard]["correct_prob"])
    for row in runs:
        rec = records[row["run"]]
        after = rec["metrics"]["after"]
        assert {k: row[k] for k in rec["varied"]} == rec["varied"] and set(rec["varied"]) < set(row)
        assert (row["forget_loss"], row["retain_loss"]) == (rec["terms"]["final"]["forget_loss"],
                                                            rec["terms"]["final"]["retain_loss"])
        assert (row["hazard acc"], row["general acc"], row["correct_prob"]) == (
            after[hazard]["acc"], after[general]["acc"], after[hazard]["correct_prob"])
        dominated = any(o["hazard acc"] <= row["hazard acc"] and o["general acc"] >= row["general acc"] and
                        (o["hazard acc"], o["general acc"]) != (row["hazard acc"], row["general acc"]) for o in runs)
        assert row["pareto"] is (not dominated) and row["notes"] == ""
    assert not base["pareto"] and not twin["pareto"]
    csv_rows = list(__import__("csv").DictReader(__import__("io").StringIO(out["csv"])))
    assert len(csv_rows) == len(table["rows"])
    for c, j in zip(csv_rows, table["rows"]):  # CSV: the same values, unrounded
        assert c["table"] == "sequential" and {k: c[k] for k in j} == {k: "" if v is None else str(v) for k, v in j.items()}
    md_rows = [line for line in out["md"].splitlines() if line.startswith("| ")]
    assert [c.strip() for c in md_rows[0].strip("|").split("|")] == table["columns"]
    for line, j in zip(md_rows[1:], table["rows"], strict=True):  # Markdown: the same values to 4 places
        assert [c.strip() for c in line.strip("|").split("|")] == [md_cell(j[c]) for c in table["columns"]]
    for f in out:
        assert (tmp_path / f / f"report.{f}").read_text() == out[f]


def assert_png(path: Path) -> None:
    from matplotlib.image import imread
    image = imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 300 and image[..., :3].std() > 0.05, path  # drawn, not blank


def test_plots_are_written_beside_the_sweep_s_table_and_into_each_run(swept, capsys):
    report(capsys, swept, "--sweep", "g")  # a sweep's report goes into its own folder
    folder = swept.runs / "g"
    assert (folder / "report.md").read_text().startswith("## sequential")
    assert_png(folder / "hazard_vs_general.png")
    for row in swept.grid.rows:
        assert_png(folder / row.name / "training.png")


def test_compare_shows_two_configs_differences_and_results_side_by_side(swept, capsys):
    a, b = (swept.runs / "g" / swept.grid.rows[i].name for i in (0, 3))
    config, results = json.loads(report(capsys, swept, "--compare", str(a), str(b), "--format", "json"))["tables"]
    assert {r["key"]: (r[f"g/{a.name}"], r[f"g/{b.name}"]) for r in config["rows"]} == {
        "sequential.remove_coef": (REMOVE[0], REMOVE[1]), "sequential.retain_coef": (RETAIN[0], RETAIN[1])}
    ra, rb = swept.store.records(run_dirs=[f"g/{a.name}", f"g/{b.name}"])
    by = {r["result"]: (r[f"g/{a.name}"], r[f"g/{b.name}"]) for r in results["rows"]}
    assert by["after hazard_cloze acc"] == (ra["metrics"]["after"]["organism_hazard_cloze"]["acc"],
                                           rb["metrics"]["after"]["organism_hazard_cloze"]["acc"])
    assert by["final forget_loss"] == (ra["terms"]["final"]["forget_loss"], rb["terms"]["final"]["forget_loss"])


@pytest.mark.parametrize("args, says", [
    (["--sweep", "nope"], "sweep: no sweep named 'nope'"),
    (["--compare", "a"], "compare: give two run directories"),
    (["--sweep", "g", "--study", "s"], "--sweep and --study: choose one"),
])
def test_report_bad_input_is_one_line(swept, capsys, args, says):
    assert main(["report", "--runs-root", str(swept.runs), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1


def test_eval_only_and_tamper_only_folders_get_their_own_tables(swept, capsys, tmp_path):
    row = swept.runs / "g" / swept.grid.rows[0].name
    tasks = f"organism_hazard_cloze={swept.hazard},organism_general_cloze={swept.general}"
    assert main(["eval", "--model", str(row), "--tasks", tasks, "--device", "cpu",
                 "--output-dir", str(swept.runs / "eval-row0")]) == 0
    assert main(["tamper", "--model", str(row), "--data", str(swept.root / "forget.jsonl"), "--tasks",
                 f"{swept.hazard}:cloze", "--steps", "2", "--eval-every", "1", "--examples", "4",
                 "--seq-len", "16", "--batch-size", "2", "--lr", "3e-2", "--device", "cpu", "--base",
                 str(swept.root / "model"), "--reference", "none", "--output-dir", str(swept.runs),
                 "--name", "tamper-row0"]) == 0
    capsys.readouterr()
    tables = {t["title"]: t for t in json.loads(report(capsys, swept, "--format", "json"))["tables"]}
    assert list(tables) == ["sequential", "evaluations", "tamper attacks"]
    [ev] = tables["evaluations"]["rows"]
    evaluated = read_json(swept.runs / "eval-row0" / "results.json")
    assert ev["run"] == "eval-row0" and ev["hazard_cloze acc"] == evaluated["organism_hazard_cloze"]["acc"]
    assert ev["general_cloze acc"] == evaluated["organism_general_cloze"]["acc"]
    [(name, summary)] = read_json(swept.runs / "tamper-row0" / "results.json")["attacks"].items()
    assert summary["gap"] > 0 and summary["recovery_auc"] is not None  # the attack has a gap to close
    [attack] = tables["tamper attacks"]["rows"]
    assert (attack["attack"], attack["gap"], attack["half-gap step"], attack["recovery AUC"], attack["max acc"]) == (
        name, summary["gap"], summary["half_gap_step"], summary["recovery_auc"], summary["max_acc"])
    runs = {r["run"]: r for r in tables["sequential"]["rows"]}  # the attacked run carries its tamper summary
    assert runs[f"g/{row.name}"]["tamper gap"] == summary["gap"]
    assert runs[f"g/{row.name}"]["recovery AUC"] == summary["recovery_auc"]
    assert all(r["tamper gap"] is None for k, r in runs.items() if k != f"g/{row.name}")
    report(capsys, swept, str(row), str(swept.runs / "tamper-row0"), "--output-dir", str(tmp_path))
    assert_png(tmp_path / "tamper.png")  # the chosen runs' tamper curves
