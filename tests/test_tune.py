"""`unlearn tune` on the tiny organism: a study finishes (in worker processes, through submitit),
a killed study resumes, a NaN trial is recorded failed while the study goes on, sweep rows seed a
study, and bad --over / --objective values are one-line errors before anything is written.

Trials are one layer phase of two steps with 16 questions a task: the tests check the study's
mechanics, not how well it unlearns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from unlearning.launch import SlurmSettings
import yaml

from unlearning.core.errors import ConfigError
from unlearning.core.faults import ENV
from unlearning.core.paths import OPTUNA_DB
from unlearning.tune.space import parse_objectives
from unlearning.tune.study import TuneSettings, prepare, tune
from unlearning.tune.trials import open_study

optuna = pytest.importorskip("optuna")

TINY = {"model": "organism:tiny", "method": "sequential", "device": "cpu",
        "data": {"num_train_examples": 16, "seq_len": 64},
        "train": {"batch_size": 4, "grad_accum": 1, "optimizer": {"name": "adamw", "lr": 1.5e-3}},
        "eval": {"limit": 16, "batch_size": 32}, "save": {"model": False},
        "sequential": {"layers": [3], "steps_per_layer": 2, "forget_loss": "max_entropy_kl", "remove_coef": 5,
                       "retain_coef": 5, "retain_losses": {"l2": 1.0}, "retain_layers": "all", "finetune": "full"}}
OVER = ["sequential.remove_coef=1:100:log", "sequential.retain_coef=0.5:200:log", "train.optimizer.lr=1e-5:2e-3:log"]


@pytest.fixture
def config(tmp_path, tiny_organism):
    path = tmp_path / "tiny_tune.yaml"
    path.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "runs")}))
    return path


def settings(config: Path, **kw) -> TuneSettings:
    return TuneSettings(config=str(config), **{"over": OVER, "trials": 2, **kw})


def trial_files(folder: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(folder.glob("trial-*/trial.json"))}


def test_a_six_trial_tune_finishes_with_its_trial_files_and_pareto_report(config, tmp_path):
    out = tune(settings(config, trials=6, enqueue_base=True), {})
    study = out.study
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 6
    assert study.directions == [optuna.study.StudyDirection.MINIMIZE, optuna.study.StudyDirection.MAXIMIZE,
                                optuna.study.StudyDirection.MAXIMIZE]
    files = trial_files(out.folder)
    assert sorted(files) == [f"trial-{n:04d}" for n in range(6)]
    for t in trials:
        record = files[f"trial-{t.number:04d}"]
        assert record["study"] == "tiny_tune" and record["trial"] == t.number and record["state"] == "complete"
        assert record["params"] == t.params
        results = json.loads((out.folder / f"trial-{t.number:04d}" / "results.json").read_text())
        assert t.values == [results["after"][task]["acc"] for task in
                            ("organism_hazard_cloze", "organism_general_cloze", "organism_benign_bio_cloze")]
    assert trials[0].params == {"sequential.remove_coef": 5, "sequential.retain_coef": 5, "train.optimizer.lr": 1.5e-3}
    assert len({tuple(t.params.values()) for t in trials}) == 6  # the sampler draws, it does not repeat
    # the base model and the twin are evaluated once, by one trial
    assert sum("reference" in json.loads((out.folder / n / "results.json").read_text()) for n in files) == 1
    md = (out.folder / "pareto.md").read_text()
    front = sorted(t.number for t in study.best_trials)
    pareto_rows = md.split("## Pareto set")[1].split("## All trials")[0]
    assert sorted(int(line.split("|")[1]) for line in pareto_rows.splitlines()
                  if line.startswith("| ") and line.split("|")[1].strip().isdigit()) == front
    assert ("The base config (trial 0) is on the Pareto front." in md) == (0 in front)
    assert "| organism:tiny-filtered" in md and "| base model" in md
    png = (out.folder / "pareto.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert (tmp_path / "runs" / OPTUNA_DB).is_file()


def unlearn(*args: str, cwd: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1", PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    if fault:
        env[ENV] = fault
    return subprocess.run([sys.executable, "-m", "unlearning.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_killed_tune_resumes_in_two_workers_and_reruns_the_killed_trial_from_its_checkpoint(config, tmp_path):
    # heartbeat 2 s (grace 4 s): at 1 s a live trial on a loaded 2-core machine could miss its beats,
    # be failed as killed by the other worker and then fail to report its own result
    args = ["tune", str(config), "--over", ",".join(OVER[:2]), "--trials", "3", "--heartbeat", "2",
            "--train.checkpoint_every", "1"]
    # two steps a trial: the third step is trial 1's first; SIGKILL after its checkpoint
    killed = unlearn(*args, cwd=tmp_path, fault="train_step:3")
    assert killed.returncode == -9, killed.stderr[-2000:]
    folder = tmp_path / "runs" / "tiny_tune"
    assert [t.state.name for t in open_study(prepare(settings(config, over=OVER[:2]), {})).get_trials()] == \
        ["COMPLETE", "RUNNING"]
    done = unlearn(*args, "--jobs", "2", cwd=tmp_path)  # the rest in two worker processes
    assert done.returncode == 0, done.stderr[-3000:]
    trials = open_study(prepare(settings(config, over=OVER[:2]), {})).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials[2].user_attrs["pid"] != trials[3].user_attrs["pid"]  # run at once, by two workers
    assert trials[2].params == trials[1].params and trials[2].system_attrs["retry_history"] == [1]
    assert "error" not in trials[1].user_attrs  # a kill is not the parameters' failure: not counted
    files = trial_files(folder)
    assert sorted(files) == ["trial-0000", "trial-0001", "trial-0003"]
    assert files["trial-0001"]["trial"] == 2 and files["trial-0001"]["retry_of"] == [1]
    assert files["trial-0001"]["state"] == "complete"
    assert "resuming at step 1 of 2" in (folder / "trial-0001" / "log.txt").read_text()
    assert [json.loads(line)["step"] for line in (folder / "trial-0001" / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2]


def test_a_trial_that_goes_nan_is_recorded_failed_and_the_study_goes_on(config):
    out = tune(settings(config, over=["sequential.remove_coef=.inf|5"], sampler="grid",
                        objective=["organism_hazard_cloze:acc:min"]), {})
    by_coef = {t.params["sequential.remove_coef"]: t for t in out.study.get_trials()}
    bad, good = by_coef[float("inf")], by_coef[5]
    assert bad.state.name == "FAIL" and good.state.name == "COMPLETE"
    assert "non-finite" in bad.user_attrs["error"].lower() or "nan" in bad.user_attrs["error"].lower()
    record = trial_files(out.folder)[f"trial-{bad.number:04d}"]
    assert record["state"] == "failed" and record["error"] == bad.user_attrs["error"]
    assert json.loads((out.folder / f"trial-{bad.number:04d}" / "results.json").read_text())["status"] == "failed"
    assert bad.user_attrs["error"] in (out.folder / "pareto.md").read_text()
    assert (out.folder / "pareto.png").is_file()


def test_a_sweep_seeds_the_study_once(config, tmp_path):
    from unlearning.sweep import load_grid, run_grid
    grid = tmp_path / "coefs.yaml"
    grid.write_text(f"base: {config.name}\nname: coefs\nrows:\n  - {{sequential.remove_coef: 2}}\n"
                    f"  - {{sequential.remove_coef: 20, sequential.retain_coef: 1}}\n")
    rows = run_grid(load_grid(grid))
    assert [r.status for r in rows] == ["complete", "complete"]
    for _ in range(2):  # the second invocation adds nothing again
        out = tune(settings(config, over=OVER[:2], trials=1, seed_from_sweep="coefs", executor="submitit",
                            slurm=SlurmSettings(cluster="debug")), {})
    trials = out.study.get_trials()
    seeded = [t for t in trials if t.user_attrs.get("seeded_from")]
    assert len(seeded) == 2 and len(trials) == 3 and trials[2].state.name == "COMPLETE"
    for t, row in zip(seeded, rows):
        results = json.loads((row.path / "results.json").read_text())
        assert t.user_attrs["seeded_from"] == str(row.path)
        assert t.params == {"sequential.remove_coef": row.row.overrides["sequential.remove_coef"],
                            "sequential.retain_coef": row.row.overrides.get("sequential.retain_coef", 5)}
        assert t.values[0] == results["after"]["organism_hazard_cloze"]["acc"]
    assert "sweep row" in (out.folder / "pareto.md").read_text()
    assert (out.folder / "submitit").is_dir()  # the new trial ran as a submitit job


@pytest.mark.parametrize("over, message", [
    ("sequential.remove_cof=1:10", "over: sequential.remove_cof: not a key of the run config (did you mean "
                                   "sequential.remove_coef?)"),
    ("sequential.remove_coef", "over: 'sequential.remove_coef' has no range; write KEY=LOW:HIGH[:log]"),
    ("sequential.remove_coef=10:1", "over: sequential.remove_coef: low 10 must be below high 1"),
    ("sequential.remove_coef=0:10:log", "over: sequential.remove_coef: a log range needs low > 0"),
    ("sequential.remove_coef=1:10:lin", "the third part may only be log"),
    ("sequential.remove_coef=a:10", "over: sequential.remove_coef: low 'a' is not a number"),
    ("sequential.remove_coef=-1:10", "over: sequential.remove_coef: low -1 is below the key's minimum 0"),
    ("data.extra_retain_ratio=0.1:0.99", "over: data.extra_retain_ratio: high 0.99 is above the key's maximum 0.95"),
    ("sequential.steps_per_layer=1.5:4", "over: sequential.steps_per_layer: an integer key needs integer bounds"),
    ("sequential.forget_loss=1:3", "over: sequential.forget_loss: a range needs a number key"),
    ("rmu.steering_coef=1:10", "over: rmu.steering_coef: the config's method is sequential"),
    ("sequential.forget_loss=max_entropy_kl|bogus", "sequential.forget_loss: 'bogus' is not allowed"),
    ("sequential.remove_coef=1:2,sequential.remove_coef=3:4", "over: sequential.remove_coef is given twice"),
    ("sequential.retain_losses={l2: 1}|{kl: 1}", "over: sequential.retain_losses: {'l2': 1} cannot be a choice"),
])
def test_bad_over_specs_are_one_line_errors_naming_the_key_before_anything_is_written(config, tmp_path, over,
                                                                                      message):
    with pytest.raises(ConfigError) as e:
        prepare(settings(config, over=over.split(",")), {})
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "runs").exists()


def test_bad_objectives_and_cli_errors(config, tmp_path):
    tasks = ["organism_hazard_cloze", "organism_general_cloze"]
    with pytest.raises(ConfigError, match="is not TASK:METRIC:min|max"):
        parse_objectives(["organism_hazard_cloze:acc:down"], tasks)
    with pytest.raises(ConfigError, match="'nope' is not one of the run's eval tasks"):
        parse_objectives(["nope:acc:min"], tasks)
    with pytest.raises(ConfigError, match="no hazard task among eval.tasks"):
        parse_objectives(None, ["organism_general_cloze", "q.jsonl"])
    assert [(o.task, o.direction) for o in parse_objectives(None, ["wmdp_bio", "mmlu"])] == \
        [("wmdp_bio", "minimize"), ("mmlu", "maximize")]
    from unlearning.commands.tune import main
    with pytest.raises(ConfigError, match="sampler: grid needs A|B|C values"):
        main([str(config), "--over", "sequential.remove_coef=1:2", "--sampler", "grid"])
    with pytest.raises(ConfigError, match="enqueue_base: the config's train.optimizer.lr=0.0015 lies outside"):
        main([str(config), "--over", "train.optimizer.lr=1e-5:1e-3:log", "--enqueue-base"])
    with pytest.raises(ConfigError, match="seed_from_sweep: no sweep 'nope'"):
        main([str(config), "--over", "sequential.remove_coef=1:2", "--seed-from-sweep", "nope"])
    assert not (tmp_path / "runs").exists()
