"""Runs as SLURM jobs through submitit: one ``torchrun`` per node, the rendezvous set from SLURM.

:func:`submit_run` (one run) and :func:`submit_runs` (a job array: a sweep's rows)
write each run's resolved config beside the job logs and submit a :class:`TorchrunJob`. On every
node of the job, submitit starts one task (``ntasks-per-node=1``), which runs::

    python -m torch.distributed.run --nnodes N --node-rank $SLURM_NODEID --nproc-per-node G \\
        --master-addr <first host of $SLURM_JOB_NODELIST> --master-port <port + job id % 1000> \\
        --no-python <this environment's bin>/unlearn run <row>.yaml [--resume]

so every GPU of every node is one rank of the run's process group (DDP, data-parallel evaluation;
:mod:`unlearning.training.distributed`). The port moves with the job id, so two array tasks that
share a node do not meet at one port.

Preemption and time-outs: submitit asks SLURM for ``USR2`` 90 s before the end (``--signal``),
calls :meth:`TorchrunJob.checkpoint` and requeues the job (``scontrol requeue``; at most
``max_requeues`` times for time-outs, always for preemption). The requeued job runs the same
command with ``--resume``, which continues from the run's last checkpoint
(``train.checkpoint_every`` sets how much a preemption may lose).

``cluster: local`` runs the same job through submitit's ``LocalExecutor`` on this machine (the
test of a launch without a cluster; ``processes_per_node`` CPU ranks under gloo).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from unlearning.core.config import param, to_dict
from unlearning.core.errors import ConfigError
from unlearning.core.io import atomic_write_yaml, read_json
from unlearning.core.rundir import safe_name


@dataclass
class SlurmSettings:
    """Where and how each run is submitted (``--slurm.<key>`` of ``unlearn sweep``)."""
    cluster: Literal["slurm", "local", "debug"] = param(
        "slurm", help="slurm: sbatch; local: submitit's local executor (try a launch on this machine); "
                      "debug: submitit's in-process executor (tests)")
    nodes: int = param(1, min=1, help="nodes per run: one torchrun on each")
    gpus_per_node: int = param(1, min=0, help="GPUs per node, one rank each")
    processes_per_node: int | None = param(None, min=1, help="ranks per node (unset: gpus_per_node, at least 1)")
    cpus_per_task: int | None = param(None, min=1, help="CPU cores per node (the node's one task)")
    mem_gb: float | None = param(None, min=0, help="memory per node in GB")
    timeout_min: int = param(60, min=1, help="wall-clock limit of each job (--time)")
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    extra_sbatch: list[str] = param([], help="more #SBATCH options, 'key=value' or 'flag' "
                                             "(e.g. mail-type=END, exclusive)")
    setup: list[str] = param([], help="shell lines run before the job (module load ..., source venv/bin/activate)")
    port: int = param(29500, min=1, max=65535, help="rendezvous port (on SLURM plus job id % 1000)")
    requeue: bool = param(True, help="requeue on preemption or time-out and resume from the checkpoint")
    max_requeues: int = param(3, min=0, help="requeues after time-outs (preemptions are always requeued)")
    array_parallelism: int = param(256, min=1, help="array tasks running at once")
    folder: str | None = param(None, help="job logs, submission files and row configs "
                                          "(default: <output_dir>/<sweep>/slurm, or the study's submitit/)")

    @property
    def nproc_per_node(self) -> int:
        return self.processes_per_node or max(1, self.gpus_per_node)

    def executor_parameters(self) -> dict[str, Any]:
        """submitit's AutoExecutor parameters (``slurm_*`` are ignored by the local executor)."""
        extra: dict[str, Any] = {}
        for line in self.extra_sbatch:
            key, eq, value = line.removeprefix("--").partition("=")
            if not key:
                raise ConfigError(f"slurm.extra_sbatch: {line!r} is not an sbatch option; write 'key=value' "
                                  f"or 'flag' (e.g. mail-type=END)")
            extra[key] = value if eq else True
        if self.requeue:
            extra.setdefault("requeue", True)  # some clusters refuse `scontrol requeue` without it
        out: dict[str, Any] = {"nodes": self.nodes, "tasks_per_node": 1, "gpus_per_node": self.gpus_per_node,
                               "timeout_min": self.timeout_min, "slurm_additional_parameters": extra,
                               "slurm_array_parallelism": self.array_parallelism}
        optional = {"cpus_per_task": self.cpus_per_task, "mem_gb": self.mem_gb, "slurm_partition": self.partition,
                    "slurm_account": self.account, "slurm_qos": self.qos, "slurm_constraint": self.constraint,
                    "slurm_setup": list(self.setup) or None}
        out.update({k: v for k, v in optional.items() if v is not None})
        return out


def unlearn_program() -> str:
    """The ``unlearn`` command of this Python environment (the job runs in the same one)."""
    beside = Path(sys.executable).parent / "unlearn"
    found = str(beside) if beside.exists() else shutil.which("unlearn")
    if found is None:
        raise ConfigError("executor: slurm runs the `unlearn` command on each node, and this environment has "
                          "none; install the package (pip install -e .) in the environment that submits")
    return found


def torchrun_command(config: str | Path, settings: SlurmSettings, *, resume: bool, program: str,
                     env: Any = None) -> list[str]:
    """The node's torchrun command running ``program`` (``unlearn``); ``env``: a submitit
    JobEnvironment (default: this job's)."""
    import submitit  # optional dependency (the sweep extra)
    env = env if env is not None else submitit.JobEnvironment()
    on_slurm = os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
    port = settings.port + (int(env.raw_job_id) % 1000 if on_slurm else 0)
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(env.num_nodes),
               "--node-rank", str(env.node), "--nproc-per-node", str(settings.nproc_per_node),
               "--master-addr", env.hostnames[0] if on_slurm else "127.0.0.1", "--master-port", str(port),
               "--no-python", program, "run", str(config)]
    return command + (["--resume"] if resume else [])


try:
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # submitit is optional: only launching needs it
    _Checkpointable = object  # type: ignore[assignment,misc]


class TorchrunJob(_Checkpointable):  # type: ignore[misc,valid-type]
    """One run as a submitit job: torchrun on this node; returns the run's results.json (node 0)."""

    def __init__(self, config: str | Path, run_dir: str | Path, settings: SlurmSettings, resume: bool = False,
                 program: str | None = None):
        self.config, self.run_dir, self.settings, self.resume = str(config), str(run_dir), settings, resume
        self.program = program or unlearn_program()

    def command(self, env: Any = None) -> list[str]:
        return torchrun_command(self.config, self.settings, resume=self.resume, program=self.program, env=env)

    def __call__(self) -> dict[str, Any] | None:
        subprocess.run(self.command(), check=True)
        results = Path(self.run_dir) / "results.json"
        return read_json(results) if results.exists() else None

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """On preemption or time-out: the same run again, continuing from its checkpoint."""
        import submitit
        return submitit.helpers.DelayedSubmission(TorchrunJob(self.config, self.run_dir, self.settings, resume=True,
                                                              program=self.program))


def executor(folder: str | Path, settings: SlurmSettings, name: str = "unlearn") -> Any:
    """A submitit AutoExecutor for ``settings`` (sbatch, or the local executor): the one place a job
    meets submitit (a sweep's torchrun jobs, a study's trial jobs)."""
    try:
        import submitit  # optional: only launching needs it
    except ImportError as e:
        raise ConfigError("executor: slurm needs submitit: pip install 'unlearning[sweep]'") from e
    try:
        ex = submitit.AutoExecutor(folder=str(folder), cluster=settings.cluster,
                                   slurm_max_num_timeout=settings.max_requeues if settings.requeue else 0)
    except RuntimeError as e:  # submitit's "Could not detect srun"
        raise ConfigError(f"slurm.cluster: slurm, but {e}; submit from a SLURM login node, or try the launch "
                          f"here with --slurm.cluster local") from None
    ex.update_parameters(name=name, **settings.executor_parameters())
    return ex


def _job(cfg: Any, folder: Path, settings: SlurmSettings, resume: bool) -> TorchrunJob:
    """Write the run's resolved config into ``folder`` and make its job."""
    path = atomic_write_yaml(folder / f"{safe_name(cfg.name)}.yaml", to_dict(cfg))
    return TorchrunJob(path.resolve(), (Path(cfg.output_dir) / cfg.name).resolve(), settings, resume)


def submit_run(cfg: Any, settings: SlurmSettings, *, resume: bool = False, folder: str | Path | None = None) -> Any:
    """Submit one run (a RunConfig with its ``name``) as one job; returns the submitit Job, whose
    ``result()`` is the run's results.json."""
    folder = Path(folder or settings.folder or Path(cfg.output_dir) / "slurm")
    job = _job(cfg, folder, settings, resume)
    return executor(folder, settings, name=safe_name(cfg.name)).submit(job)


def submit_runs(cfgs: Sequence[Any], settings: SlurmSettings, *, resume: Sequence[bool] | None = None,
                folder: str | Path, name: str = "sweep") -> list[Any]:
    """Submit several runs as one job array (one task per run); returns the Jobs in order."""
    resume = list(resume) if resume is not None else [False] * len(cfgs)
    folder = Path(folder)
    jobs = [_job(cfg, folder, settings, r) for cfg, r in zip(cfgs, resume, strict=True)]
    ex = executor(folder, settings, name=name)
    with ex.batch():  # submitit turns the batch into one array
        submitted = [ex.submit(job) for job in jobs]
    return submitted
