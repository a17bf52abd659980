"""SLURM sweeps through submitit, without a cluster: the submission a 2-node x 4-GPU row would get
(sbatch rendered by submitit's own submit path, with a stand-in ``sbatch`` on PATH), the torchrun
command each node runs, requeue on preemption, and one row end to end through submitit's local
executor (a real torchrun with two CPU ranks)."""

from __future__ import annotations

import json
import os
import socket
import stat
import sys

import pytest
import yaml

submitit = pytest.importorskip("submitit")

from unlearning.core.config import to_dict  # noqa: E402
from unlearning.core.errors import ConfigError  # noqa: E402
from unlearning.launch import SlurmSettings, TorchrunJob  # noqa: E402
from unlearning.runner import load_run_config  # noqa: E402
from unlearning.sweep import load_grid, row_config, run_grid  # noqa: E402

BASE = {"model": "organism:tiny", "method": "sequential", "save": {"model": False},
        "data": {"num_train_examples": 8, "seq_len": 32},
        "train": {"batch_size": 2, "grad_accum": 1},
        "eval": {"before": False, "reference": None, "limit": 4, "tasks": ["organism_hazard_cloze"]},
        "sequential": {"layers": "3->2:1", "steps_per_layer": 1, "finetune": "full", "retain_losses": {"l2": 1.0}}}
TWO_NODES = SlurmSettings(nodes=2, gpus_per_node=4, timeout_min=90, partition="gpu", account="lab",
                          cpus_per_task=32, extra_sbatch=["mail-type=END", "exclusive"],
                          setup=["module load cuda/12.4"])


def write_grid(tmp_path, coefs):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    rows = "".join(f"  - {{sequential.remove_coef: {c}}}\n" for c in coefs)
    (tmp_path / "grid.yaml").write_text(f"base: base.yaml\nname: g\nrows:\n{rows}")
    return load_grid(tmp_path / "grid.yaml")


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    """An ``sbatch`` that records its arguments and answers as SLURM does."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"sbatch": f'echo "$@" >> {tmp_path / "sbatch_calls"}\necho "Submitted batch job 4242"',
                       "srun": "exit 1"}.items():  # submitit looks for srun to know it is on a cluster
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path / "sbatch_calls"


def test_a_two_node_sweep_row_gets_its_sbatch_torchrun_and_requeue(tiny_organism, tmp_path, fake_sbatch,
                                                                   monkeypatch):
    grid = write_grid(tmp_path, [1, 2])
    outcomes = run_grid(grid, output_dir=str(tmp_path / "runs"), executor="slurm", slurm=TWO_NODES)
    assert [o.status for o in outcomes] == ["submitted", "submitted"]
    assert len(fake_sbatch.read_text().splitlines()) == 1  # one array for the whole sweep
    folder = tmp_path / "runs" / "g" / "slurm"
    [submission] = folder.glob("*_submission.sh")
    text = submission.read_text()
    for line in ["#SBATCH --array=0-1%2", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --cpus-per-task=32", "#SBATCH --time=90",
                 "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --mail-type=END",
                 "#SBATCH --exclusive", "#SBATCH --requeue",
                 "#SBATCH --signal=USR2@90",  # submitit's warning before the end: checkpoint, then requeue
                 "module load cuda/12.4"]:
        assert line in text.splitlines(), line
    [launch] = [line for line in text.splitlines() if "submitit.core._submit" in line]
    assert launch.startswith("srun ")  # one task per node (ntasks-per-node=1), each starts its node's torchrun

    # What node 1 of array task 1 runs: torchrun, the rendezvous at the job's first host
    pickles = sorted(folder.glob("4242_*_submitted.pkl"))
    assert len(pickles) == 2
    job = submitit.core.utils.DelayedSubmission.load(pickles[1]).function
    assert isinstance(job, TorchrunJob)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    for key, value in {"SLURM_JOB_ID": "4244", "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "1",
                       "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[017-018]",
                       "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2"}.items():
        monkeypatch.setenv(key, value)
    command = job.command()
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    flags = dict(zip(command[3:13:2], command[4:13:2]))
    assert flags == {"--nnodes": "2", "--node-rank": "1", "--nproc-per-node": "4", "--master-addr": "gpu017",
                     "--master-port": str(29500 + 4244 % 1000)}
    assert command[13] == "--no-python" and command[14].endswith("unlearn") and command[15] == "run"
    assert command[-1] != "--resume"
    # the row's config file is the row's resolved config
    assert to_dict(load_run_config(command[16])) == to_dict(row_config(grid, grid.rows[1], str(tmp_path / "runs")))

    # preemption: submitit calls checkpoint(), which resubmits the same run with --resume
    again = job.checkpoint()
    assert isinstance(again, submitit.helpers.DelayedSubmission)
    assert again.function.command()[-1] == "--resume" and again.function.command()[:-1] == command


def test_bad_extra_sbatch_line_is_one_line_error():
    with pytest.raises(ConfigError, match="slurm.extra_sbatch"):
        SlurmSettings(extra_sbatch=["=5"]).executor_parameters()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_one_sweep_row_end_to_end_through_the_local_executor(tiny_organism, tmp_path, monkeypatch):
    """submitit's LocalExecutor runs the job: torchrun with two CPU ranks (gloo) runs `unlearn run`."""
    monkeypatch.setenv("UNLEARNING_HOME", os.environ["UNLEARNING_HOME"])  # the job's environment
    grid = write_grid(tmp_path, [1])
    settings = SlurmSettings(cluster="local", gpus_per_node=0, processes_per_node=2, port=_free_port(),
                             timeout_min=5)
    [outcome] = run_grid(grid, output_dir=str(tmp_path / "runs"), executor="slurm", slurm=settings)
    assert outcome.status == "submitted"
    results = outcome.job.result()  # waits for the job
    assert results["status"] == "complete" and "after" in results
    run_dir = tmp_path / "runs" / "g" / grid.rows[0].name
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["layer"] for r in records] == [3, 2]
    log = (run_dir / "log.txt").read_text()
    assert "4 examples per step" in log  # batch 2 on each of the two ranks
