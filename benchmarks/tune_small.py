"""Boundary search on the ``small`` organism: where does the shipped sequential default sit among
24 Optuna trials over its coefficients and learning rate? (one H100, ~9 min with the build)

    python benchmarks/tune_small.py [--out runs/tune_small] [--copy-to docs/tune_small]

1. builds ``organism:small`` if its cache is missing (timed);
2. runs ``unlearn tune src/unlearning/configs/organism_small.yaml`` in this process's API form:
   ``sequential.remove_coef`` 1:100 log, ``sequential.retain_coef`` 0.5:200 log and the config's learning
   rate (``train.optimizer.muon_lr`` for its Muon optimizer, ``lr`` for AdamW) from a quarter to four times
   its value, log; the default sampler (TPE), multi-objective (hazard accuracy down, general and benign-bio
   up); ``--jobs`` trials at once as worker processes on the one GPU;
3. the config's own values are the first trial (``enqueue_base``), so the report says whether the shipped
   point lies on the Pareto front and which trials dominate it;
4. trials are SHORTER than the shipped run, to fit the budget: ``--steps-per-layer`` (default 32 of the
   config's 128) over the config's 7 layer phases, every trial the same, the base-config trial included;
   the base model and the filtered twin are evaluated once (by the first trial);
5. writes ``<out>/tune_small/pareto.md`` and ``pareto.png`` (and copies them to ``--copy-to``), and
   ``<out>/timings.json``; prints the Pareto table and the verdict on the shipped point.

A rerun with the same arguments resumes the study (Optuna's storage ``<out>/optuna.db``): complete trials
are kept, killed ones are run again from their checkpoints; ``--deadline`` stops starting new ones.
On a CPU, ``--preset tiny --config src/unlearning/configs/organism_tiny.yaml --trials 3 --jobs 2
--steps-per-layer 2 --limit 16`` checks the script in about a minute.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))
# The trial workers are new interpreters (a forkserver): they find the package through PYTHONPATH.
os.environ["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])
# Each worker process drives the GPU from one Python thread; CPU thread pools only oversubscribe the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from unlearning.core.config import read_yaml  # noqa: E402
from unlearning.core.io import atomic_write_json  # noqa: E402
from unlearning.core.logs import setup_logging  # noqa: E402

log = logging.getLogger("tune_small")


def lr_key(config: dict) -> tuple[str, float]:
    """The learning rate that moves the trained matrices: Muon's for a Muon config, else AdamW's."""
    opt = (config.get("train") or {}).get("optimizer") or {}
    if opt.get("name") == "muon":
        return "train.optimizer.muon_lr", float(opt.get("muon_lr", 0.02))
    return "train.optimizer.lr", float(opt.get("lr", 1e-3))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--config", default=str(SRC / "unlearning" / "configs" / "organism_small.yaml"))
    ap.add_argument("--out", default="runs/tune_small")
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--jobs", type=int, default=12, help="trials at once on the GPU")
    ap.add_argument("--steps-per-layer", type=int, default=32)
    ap.add_argument("--deadline", type=float, default=420,
                    help="seconds from the script's start (the build included) after which no new trial starts; "
                         "those under way finish")
    ap.add_argument("--limit", type=int, default=None, help="questions per task (default: all)")
    ap.add_argument("--copy-to", default=None, help="also copy pareto.md and pareto.png here (e.g. docs/tune_small)")
    args = ap.parse_args()
    setup_logging()
    from unlearning.organism import PRESETS, ensure_organism
    from unlearning.tune.study import TuneSettings, tune

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ensure_organism(args.preset, seed=PRESETS[args.preset].seed)
    timings["organism_s"] = round(time.perf_counter() - t0, 1)
    try:  # the build may have used the GPU in this process; the workers need it, not us
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass

    config = read_yaml(args.config)
    key, lr = lr_key(config)
    over = ["sequential.remove_coef=1:100:log", "sequential.retain_coef=0.5:200:log", f"{key}={lr / 4:g}:{lr * 4:g}:log"]
    overrides: dict = {"model": f"organism:{args.preset}", "sequential": {"steps_per_layer": args.steps_per_layer}}
    if args.limit:
        overrides["eval"] = {"limit": args.limit}
    settings = TuneSettings(config=args.config, over=over, trials=args.trials, jobs=args.jobs, name="tune_small",
                            output_dir=args.out, enqueue_base=True,
                            timeout=max(0.0, args.deadline - (time.perf_counter() - t0)))
    t1 = time.perf_counter()
    outcome = tune(settings, overrides)
    timings["tune_s"] = round(time.perf_counter() - t1, 1)
    timings["total_s"] = round(time.perf_counter() - t0, 1)
    study = outcome.study
    states = [t.state.name for t in study.get_trials()]
    timings.update(trials={s: states.count(s) for s in sorted(set(states))}, jobs=args.jobs,
                   steps_per_layer=args.steps_per_layer, over=over)
    atomic_write_json(Path(args.out) / "timings.json", timings)
    print(outcome.report["table"].read_text())
    print(json.dumps(timings))
    if args.copy_to:
        dest = Path(args.copy_to)
        dest.mkdir(parents=True, exist_ok=True)
        for path in outcome.report.values():
            shutil.copy2(path, dest / path.name)
        print(f"copied {', '.join(p.name for p in outcome.report.values())} to {dest}")
    return 0 if outcome.ran or states.count("COMPLETE") else 1


if __name__ == "__main__":
    sys.exit(main())
