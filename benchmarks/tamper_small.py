"""Tamper attacks on the ``small`` organism: is unlearned knowledge hidden or gone? (one GPU, ~6 min)

    python benchmarks/tamper_small.py [--out runs/tamper_small] [--copy-plot docs/figures/tamper_small.png]

1. builds ``organism:small`` if its cache is missing (the first use of ``load_model`` does that);
2. unlearns it with the sequential default (the shipped ``organism_small.yaml`` run config) and,
   when its module is present, with a representation method (``--rep-method``, default the first
   of rmu, circuit_breaker, checkpoint_transfer that imports), on the same config otherwise;
3. attacks (a) the filtered twin, (b) the sequential model, (c) the representation model with the
   notebook's recipe (512 examples of ``organism:tamper``, lr 2e-5, linear, 110 steps, evaluated
   every 10), plus the benign attack (``organism:benign_tamper``) on each, evaluating hazard and
   general cloze accuracy;
4. prints the notebook-style table and the summary, and writes ``<out>/tamper/`` (results.json,
   table.md, tamper.png, each attack's tamper.json) and ``<out>/timings.json``.

The tamper corpus is about hazard entities disjoint from the evaluated ones: accuracy that comes
back on the evaluated entities was hidden, not relearned. Each stage that is already complete
in ``--out`` is skipped, so a rerun after a kill continues.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path

log = logging.getLogger("tamper_small")

REP_METHODS = ("rmu", "circuit_breaker", "checkpoint_transfer")


def free_gpu() -> None:
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def unlearn(method: str, preset: str, config: Path, out: Path, extra: list[str]) -> Path:
    """Run ``unlearn run`` in-process (skipped when the run directory already has its results)."""
    from unlearning.runner import load_run_config, run
    name = f"{method}_{preset}"
    rundir = out / name
    results = rundir / "results.json"
    if results.exists() and "after" in json.loads(results.read_text()):
        log.info("%s: already unlearned in %s", method, rundir)
        return rundir
    cfg = load_run_config(config, [f"--name={name}", f"--output_dir={out}", f"--model=organism:{preset}",
                                   f"--method={method}", *extra])
    run(cfg, resume=rundir.exists())
    free_gpu()
    return rundir


def representation_method(wanted: str | None) -> str | None:
    for name in ([wanted] if wanted else REP_METHODS):
        try:
            importlib.import_module(f"unlearning.methods.{name}")
            return name
        except ImportError as e:
            log.warning("representation method %s is not available (%s)", name, e)
    return None


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/tamper_small", help="where the unlearned models and the attack go")
    p.add_argument("--preset", default="small", help="organism preset (tiny: a CPU smoke test of this script)")
    p.add_argument("--config", default=None,
                   help="run config for the unlearning (default: the shipped organism_<preset>.yaml)")
    p.add_argument("--rep-method", default=None, choices=REP_METHODS + ("none",))
    p.add_argument("--rep-config", default=None, help="run config for the representation method (default: --config)")
    p.add_argument("--steps", type=int, default=110)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--limit", type=int, default=None, help="questions per task (quicker, noisier)")
    p.add_argument("--no-benign", action="store_true", help="skip the benign attacks (halves the attack time)")
    p.add_argument("--copy-plot", default=None, help="also copy tamper.png here (e.g. docs/figures/tamper_small.png)")
    args = p.parse_args(argv)

    from unlearning.commands import tamper as tamper_command
    from unlearning.core.logs import setup_logging
    setup_logging("INFO")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = Path(args.config) if args.config else (
        Path(tamper_command.__file__).resolve().parents[1] / "configs" / f"organism_{args.preset}.yaml")
    if not config.exists():
        raise SystemExit(f"--config: {config} not found; pass the small organism's run config")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def timed(stage: str, fn, *a):
        start = time.perf_counter()
        result = fn(*a)
        timings[stage] = round(time.perf_counter() - start, 1)
        log.info("%s: %.1f s", stage, timings[stage])
        return result

    def ensure_small() -> None:
        from unlearning.organism.build import ensure_organism
        ensure_organism(args.preset)

    timed("organism", ensure_small)
    models = [f"organism:{args.preset}-filtered",
              str(timed("unlearn sequential", unlearn, "sequential", args.preset, config, out, []))]
    rep = None if args.rep_method == "none" else representation_method(args.rep_method)
    if rep is not None:
        try:
            models.append(str(timed(f"unlearn {rep}", unlearn, rep, args.preset, Path(args.rep_config or config),
                                    out, [])))
        except Exception as e:  # the comparison still stands on (a) and (b); say what is missing
            log.error("unlearning with %s failed (%s: %s); attacking (a) and (b) only", rep, type(e).__name__, e)
            rep = None

    attack = ["--model", *models, "--steps", str(args.steps), "--eval-every", str(args.eval_every),
              "--examples", "512", "--lr", "2e-5", "--schedule", "linear", "--eval-general",
              "--eval-batch-size", "128", "--output-dir", str(out), "--name", "tamper"]
    attack += [] if args.no_benign else ["--benign"]
    attack += ["--limit", str(args.limit)] if args.limit else []
    if (out / "tamper").exists():
        attack.append("--resume")
    rc = timed("tamper attacks", tamper_command.main, attack)
    timings["total"] = round(time.perf_counter() - t0, 1)
    (out / "timings.json").write_text(json.dumps({**timings, "models": models, "representation_method": rep},
                                                 indent=2) + "\n")
    if args.copy_plot:
        Path(args.copy_plot).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "tamper" / "tamper.png", args.copy_plot)
    print(f"\ntimings (s): {json.dumps(timings)}")
    if rep is None:
        print("(c) no representation-method model: none of rmu / circuit_breaker / checkpoint_transfer ran")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
