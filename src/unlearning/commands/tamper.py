"""``unlearn tamper``: fine-tune unlearned models on hazard-adjacent text and watch accuracy come back.

    unlearn tamper --model runs/seq-small                       # the notebook's recipe
    unlearn tamper --model runs/seq-small organism:small-filtered --benign --eval-general
    unlearn tamper --model runs/seq-small --lr 1e-5,2e-5,5e-5 --seed 0,1   # a small sweep
    unlearn tamper --model runs/seq-small --attacks full,lora16,lora64,probe,icl \
        --lr 2e-6,2e-5,1e-4,5e-4 --data tamper,benign --steps 500 --eval-every 50   # the attack grid
    unlearn tamper --plot-only runs/tamper-a runs/tamper-b/attacks/x/tamper.json --output cmp.png

The grid: every ``--model`` x ``--attacks`` kind. Fine-tuning kinds (``full``, ``lora<R>``: LoRA
of rank R on every linear layer) also run every ``--data`` corpus (``tamper``: the organism's
hazard-adjacent text; ``benign``: general text, which is known to bring unlearned knowledge back
too; or a file / hub id) and every comma-separated ``--lr``, ``--schedule``, ``--dtype``,
``--optimizer`` and ``--seed`` value. ``probe`` (a linear probe per layer, trained on one half of the
entities, tested on the other: :mod:`unlearning.attacks.probe`) and ``icl`` (``--shots`` k
demonstrations about other entities: :mod:`unlearning.attacks.in_context`) run once per model and
seed. The filtered twin is attacked the same way (``--reference``: the floor row), and the base
model is evaluated (``--base``: the ceiling; probed and prompted too).

The run directory gets ``attacks/<cell>/attack.json`` for every cell (its headline number and
details, :mod:`unlearning.attacks.record`), a fine-tuning cell's ``tamper.json`` curve (written after
every evaluation), ``references.json`` (plain evaluations, once per model), ``results.json`` (the
fine-tuning summaries, the strongest attack, and ``grid``: the methods x attacks table as JSON,
:mod:`unlearning.attacks.grid`), ``table.md`` and the plots ``tamper.png`` (curves), ``probe.png``,
``in_context.png`` and ``grid.png``. ``--resume`` skips finished cells and continues the others.
Exit status 1 when an attack failed (its files say why).

Many GPUs: ``torchrun --nproc-per-node N unlearn tamper ...`` trains each fine-tuning cell with DDP
(every rank holds the model), or with ``--parallel fsdp`` (``attack.parallel``) with FSDP2: the
model is built on the meta device, sharded, and each rank loads only its shards, for a full
fine-tuning attack that does not fit one GPU (fp16 and Muon are refused with it). Evaluations run on
the sharded model; probe and icl cells train nothing and run replicated either way.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from unlearning.attacks.cells import AttackGridConfig, grid_cells
from unlearning.attacks.curves import read_curve
from unlearning.attacks.session import run_cells
from unlearning.core.cli import parse_command
from unlearning.core.config import param, to_dict
from unlearning.core.errors import ConfigError, UserError
from unlearning.core.io import atomic_write_text
from unlearning.core.logs import setup_logging
from unlearning.core.rundir import RunDir, check_writable
from unlearning.core.runtime import barrier, configure_cpu_threads, init_distributed, is_main_process, same_on_every_rank
from unlearning.preflight import preflight_grid
from unlearning.reporting.attack_report import curves_report, grid_report


@dataclass
class TamperCommandConfig(AttackGridConfig):
    """The attack grid (:class:`~unlearning.attacks.cells.AttackGridConfig`: models x swept values and
    the shared recipe), and what the command does with the results."""

    # The notebook's flags, kept short: each is a key of the shared recipe.
    ALIASES: ClassVar[dict[str, str]] = {
        "steps": "attack.steps", "eval_every": "attack.eval_every", "examples": "attack.examples",
        "seq_len": "attack.seq_len", "batch_size": "attack.batch_size", "grad_accum": "attack.grad_accum",
        "max_grad_norm": "attack.max_grad_norm", "lora": "attack.lora_rank", "lora_alpha": "attack.lora_alpha",
        "revision": "attack.revision", "device": "attack.device", "organism": "attack.organism",
        "tasks": "attack.eval.tasks", "limit": "attack.eval.limit", "eval_batch_size": "attack.eval.batch_size",
        "data_column": "attack.data.column", "data_split": "attack.data.split", "shots": "icl.shots",
        "weight_decay": "attack.optimizer.weight_decay", "muon_lr": "attack.optimizer.muon_lr",
        "parallel": "attack.parallel"}

    output_dir: str | None = param(None, help="parent of the run directory (default $UNLEARNING_RUNS or runs)")
    name: str | None = param(None, help="run directory name (default tamper-<time>)")
    resume: bool = param(False, help="continue the attacks of run --name")
    keep_state: bool = param(False, help="keep each attack's final state.pt (weights+optimizer)")
    log_level: str = param("INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    plot_only: list[str] | None = param(None, many=True, help="redraw and compare tamper.json files (or "
                                                              "run/attack folders); trains nothing")
    output: str | None = param(None, help="with plot_only: the PNG to write (default tamper_compare.png)")


def plot_only(files: list[str], output: str | None) -> int:
    paths: list[Path] = []
    for f in files:
        path = Path(f)
        found = sorted(path.glob("**/tamper.json")) if path.is_dir() and not (path / "tamper.json").exists() else [path]
        if not found:
            raise UserError(f"--plot-only: {path} holds no tamper.json")
        paths += found
    curves = [read_curve(p) for p in paths]
    text, _ = curves_report(curves, Path(output or "tamper_compare.png"))
    print(text)
    return 0 if all(c["status"] == "complete" for c in curves) else 1


def main(argv: list[str]) -> int:
    parsed = parse_command(TamperCommandConfig, argv, prog="unlearn tamper", description=__doc__)
    if parsed is None:
        return 0
    options, _ = parsed
    configure_cpu_threads()
    if options.plot_only:
        setup_logging(options.log_level)
        return plot_only(options.plot_only, options.output)
    if options.resume and not options.name:
        raise UserError("resume: name the run to continue with --name")
    cells = grid_cells(options)
    preflight_grid(cells, options.probe, options.icl)  # before anything is written or any weights load
    init_distributed()  # under torchrun: DDP training, each rank evaluates a shard, rank 0 writes
    rundir = RunDir.for_command(options.output_dir, options.name, "tamper", create=False)
    rundir = RunDir(same_on_every_rank(rundir.path), create=False)  # tamper-<time>: rank 0's time
    if rundir.results_path.exists() and not options.resume:
        raise ConfigError(f"name: {rundir.path} already holds results; pass --resume or choose another --name")
    check_writable(rundir.path, "output_dir")
    barrier()
    rundir = RunDir(rundir.path)
    rundir.start_logging(options.log_level)
    rundir.write_config({k: v for k, v in to_dict(options).items() if k not in ("plot_only", "output")})

    run = run_cells(options, cells, rundir, resume=options.resume, keep_state=options.keep_state)
    exit_code = 0 if run.complete else 1
    if not is_main_process():  # the other ranks trained and evaluated their shards; rank 0 writes
        return exit_code
    text, results = grid_report(run, rundir.path)
    rundir.write_results(results)
    atomic_write_text(rundir.file("table.md"), text + "\n")
    print(text)
    return exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
