"""Bad input, one table: each case is one line on stderr that names the key or file and the fix,
within 5 seconds, and nothing is written.

Every case runs the real command line (``unlearning.cli.main``) from a working directory of its own,
on the cheap local job of :mod:`run_setup` (a saved tiny GPT-NeoX, corpora, a question file), with
the hub offline. A message "names the fix" when it holds the case's fix text: the setting to change,
the command to run, or what a good value looks like.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from run_setup import Job
from unlearning import cli, runner


INFO_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO) ")  # progress notes may come first; warnings count


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return Job(tmp_path_factory.mktemp("bad_inputs"))


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def truncated_copy(job: Job, d: Path) -> str:
    """A copy of the job's model folder whose weights file lost its second half."""
    folder = d / "truncated"
    folder.mkdir()
    for f in (job.root / "model").iterdir():
        data = f.read_bytes()
        (folder / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    return str(folder)


def corrupt_cache(d: Path) -> str:
    """An organism cache (UNLEARNING_HOME) whose tiny build.json was cut off mid-write."""
    root = d / "home" / "organism" / "tiny"
    root.mkdir(parents=True)
    (root / "build.json").write_text('{"format_version": 3, "config": {"wor')
    return str(d / "home")


def run_args(job: Job, *extra: str) -> list[str]:
    return ["run", str(job.yaml("x")), "--name=x", *extra]


# case: (argv given the job and the case's directory, the key or file named, the fix)
CASES = {
    # --- a wrong key, type or range in each section of `unlearn run`
    "top-level key": (lambda j, d: run_args(j, "--bogus=1"), "bogus", "unknown key"),
    "method name": (lambda j, d: run_args(j, "--method=magic"), "method", "sequential"),
    "data key": (lambda j, d: run_args(j, "--data.forget.colum=text"), "data.forget.colum", "column"),
    "data range": (lambda j, d: run_args(j, "--data.seq_len=0"), "data.seq_len", "minimum"),
    "train type": (lambda j, d: run_args(j, "--train.batch_size=abc"), "train.batch_size", "integer"),
    "train range": (lambda j, d: run_args(j, "--train.grad_accum=0"), "train.grad_accum", "minimum"),
    "optimizer choice": (lambda j, d: run_args(j, "--train.optimizer.name=sgd"), "train.optimizer.name", "adamw"),
    "eval range": (lambda j, d: run_args(j, "--eval.batch_size=0"), "eval.batch_size", "minimum"),
    "save type": (lambda j, d: run_args(j, "--save.model=maybe"), "save.model", "true"),
    "logging choice": (lambda j, d: run_args(j, "--logging.level=LOUD"), "logging.level", "INFO"),
    "sequential key": (lambda j, d: run_args(j, "--sequential.bogus=1"), "sequential.bogus", "unknown key"),
    "sequential choice": (lambda j, d: run_args(j, "--sequential.forget_loss=magic"), "sequential.forget_loss",
                          "choose"),
    "rmu range": (lambda j, d: run_args(j, "--method=rmu", "--rmu.steps=0"), "rmu.steps", "minimum"),
    "circuit breaker key": (lambda j, d: run_args(j, "--method=circuit_breaker", "--circuit_breaker.bogus=1"),
                            "circuit_breaker.bogus", "unknown key"),
    # --- layers
    "layer out of range": (lambda j, d: run_args(j, "--sequential.layers=[3, 7]"), "sequential.layers",
                           "4 layers"),
    "layer spec": (lambda j, d: run_args(j, "--sequential.layers=31->11:4"), "sequential.layers", "4 layers"),
    "rmu layer": (lambda j, d: run_args(j, "--method=rmu", "--rmu.layer=9"), "rmu.layer", "4 layers"),
    "retain layer out of range": (lambda j, d: run_args(j, "--sequential.retain_layers=[9]"),
                                  "sequential.retain_layers", "4 layers"),
    "LoRA layer out of range": (lambda j, d: run_args(j, "--sequential.finetune=lora", "--sequential.lora.layers=[4]"),
                                "sequential.lora.layers", "4 layers"),
    # --- data files
    "missing data file": (lambda j, d: run_args(j, f"--data.forget.source={d / 'missing.jsonl'}"),
                          "missing.jsonl", "check the path"),
    "empty data file": (lambda j, d: run_args(j, f"--data.retain.source={write(d / 'empty.jsonl', '')}"),
                        "empty.jsonl", "one example per row"),
    "wrong-column data file": (lambda j, d: run_args(j, "--data.retain.source="
                                                     + write(d / "col.jsonl", json.dumps({"body": "x"}) + "\n")),
                               "col.jsonl", "data.retain.column"),
    "column not in the file": (lambda j, d: run_args(j, "--data.forget.column=body"), "data.forget.source",
                               "set data.forget.column"),
    "not JSON": (lambda j, d: run_args(j, f"--data.forget.source={write(d / 'bad.jsonl', '{x' + chr(10))}"),
                 "bad.jsonl", "line 1"),
    # --- tasks
    "unknown task": (lambda j, d: run_args(j, "--eval.tasks=[organism_hazard_clozee]"), "organism_hazard_clozee",
                     "organism_hazard_cloze"),
    "missing benchmark file": (lambda j, d: run_args(j, f"--eval.tasks=[{d / 'wmdp.jsonl'}]"), "wmdp.jsonl",
                               "check the path"),
    "empty task list": (lambda j, d: run_args(j, "--eval.tasks=[]"), "eval.tasks", "give at least one"),
    "eval unknown task": (lambda j, d: ["eval", "--model", str(j.root / "model"), "--tasks", "no_such_task"],
                          "no_such_task", "known tasks"),
    # --- models
    "hub id offline": (lambda j, d: run_args(j, "--model=nobody/no-such-model"), "nobody/no-such-model",
                       "HF_HUB_OFFLINE"),
    "missing model folder": (lambda j, d: run_args(j, f"--model={d / 'no-model'}"), "no-model", "does not exist"),
    "missing reference model": (lambda j, d: run_args(j, f"--eval.reference={d / 'no-ref'}"), "eval.reference",
                                "does not exist"),
    "unknown organism": (lambda j, d: run_args(j, "--model=organism:huge"), "organism:huge", "tiny"),
    "corrupt weights": (lambda j, d: run_args(j, f"--model={truncated_copy(j, d)}"), "model.safetensors",
                        "truncated"),
    "eval corrupt weights": (lambda j, d: ["eval", "--model", truncated_copy(j, d), "--tasks",
                                           f"{j.root / 'q.jsonl'}:cloze"], "model.safetensors", "truncated"),
    # --- the organism cache, output folders, config files
    "corrupt cache": (lambda j, d: ["eval", "--model", "organism:tiny", "--tasks", "organism_hazard_cloze"],
                      "build.json", "unlearn organism build --preset tiny --force"),
    "unwritable output dir": (lambda j, d: run_args(j, f"--output_dir={write(d / 'a-file', '')}/runs"),
                              "output_dir", "a-file"),
    "missing config file": (lambda j, d: ["run", str(d / "nope.yaml")], "nope.yaml", "check the path"),
    "config not YAML": (lambda j, d: ["run", write(d / "bad.yaml", "a: [1, 2\n")], "bad.yaml", "line"),
    "tamper range": (lambda j, d: ["tamper", "--model", str(j.root / "model"), "--steps", "0"], "attack.steps", "minimum"),
    "tamper missing data": (lambda j, d: ["tamper", "--model", str(j.root / "model"), "--data",
                                          str(d / "gone.jsonl"), "--tasks", f"{j.root / 'q.jsonl'}:cloze"],
                            "gone.jsonl", "check the path"),
    "tamper missing model": (lambda j, d: ["tamper", "--model", str(d / "runs" / "gone")], "gone", "does not exist"),
    "sweep missing grid": (lambda j, d: ["sweep", str(d / "grid.yaml")], "grid.yaml", "check the path"),
    "sweep unknown override": (lambda j, d: ["sweep", str(Path(cli.__file__).parent / "configs" / "grids"
                                                          / "kl_retain_cb_grid_tiny.yaml"), "--train.bogus=1"],
                               "train.bogus", "unknown key"),
    "organism unknown preset": (lambda j, d: ["organism", "build", "--preset", "huge"], "preset", "tiny"),
}


def snapshot(*roots: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for r in roots for p in r.rglob("*")}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_naming_the_key_and_the_fix_fast_and_writes_nothing(job, case, tmp_path, capsys,
                                                                                  monkeypatch):
    argv_of, named, fix = CASES[case]

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(runner, "load_model", no_loading)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("UNLEARNING_RUNS", str(tmp_path / "runs"))
    if case == "corrupt cache":
        monkeypatch.setenv("UNLEARNING_HOME", corrupt_cache(tmp_path))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    argv = argv_of(job, tmp_path)  # builds its inputs first: they are not "written" by the command
    before = snapshot(job.root, tmp_path)

    start = time.perf_counter()
    code = cli.main(argv)
    seconds = time.perf_counter() - start

    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.strip() and not INFO_LINE.match(line)]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"unlearn {argv[0]}: error: "), err
    assert named in lines[0] and fix in lines[0], err
    assert seconds < 5, f"{seconds:.1f} s"
    assert snapshot(job.root, tmp_path) == before, "the command wrote files"
    assert not (tmp_path / "runs").exists() and not list(work.iterdir())


def test_the_table_covers_the_issue(job):
    assert len(CASES) >= 25
