"""Methods that resist tampering, on the ``small`` organism (one GPU): the main job, UNDO (and TAR), attacked.

    python benchmarks/resist_small.py [--out runs/resist_small] [--tar] [--copy-to docs/figures]  # -> docs/figures/resist_small.png, .md

1. builds ``organism:small`` if its cache is missing (about 5 minutes on an H100);
2. the README's main job (``configs/organism_small.yaml``) -> ``<out>/main``;
3. UNDO from it (``configs/undo_small.yaml``, its ``model`` set to ``<out>/main``) -> ``<out>/undo``;
   with ``--tar`` also TAR (``configs/tar_small.yaml``) -> ``<out>/tar``;
4. attacks the filtered twin, the main job's model and each resisting model with the notebook's
   recipe (full fine-tuning on ``organism:tamper``, 512 examples, lr 2e-5, linear, 110 steps) and a
   LoRA attack (rank 16 on every linear layer, lr 1e-3, 110 steps), hazard and general evaluated
   every 22 steps;
5. prints one table (held-out hazard, benign-bio, general before any attack, the compute UNDO spent
   as a share of the twin's pretraining, and the peak hazard under each attack, with the twin and
   the base organism as rows) and writes ``<out>/resist.md``, ``<out>/resist.json`` and
   ``<out>/resist.png`` (peak hazard under attack against general accuracy, one point per model).

Every stage already complete in ``--out`` is skipped, so a rerun after a kill, or after a
command-time limit, continues where it stopped: on a fresh machine run it twice if one call may
last only 10 minutes (the build and the main job take about 8 of them). ``--preset tiny --quick``
is the CPU smoke test of this script (a few steps of everything, 16 questions per task).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("resist_small")

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "unlearning" / "configs"
HAZARD, BENIGN, GENERAL = "organism_hazard_cloze", "organism_benign_bio_cloze", "organism_general_cloze"
ATTACKS = {"full": ["--lr", "2e-5"], "lora16": ["--lora", "16", "--lr", "1e-3"]}
QUICK = {"main": ["--sequential.steps_per_layer", "2"], "undo": ["--undo.steps", "3"], "tar": ["--tar.steps", "2"]}


def free_gpu() -> None:
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def unlearn(name: str, config: Path, out: Path, extra: list[str]) -> dict[str, Any]:
    """``unlearn run`` in-process; a complete run directory is reused as it is."""
    from unlearning.runner import load_run_config, run
    rundir = out / name
    done = rundir / "results.json"
    if done.exists() and json.loads(done.read_text()).get("status") == "complete":
        log.info("%s: complete in %s", name, rundir)
        return json.loads(done.read_text())
    cfg = load_run_config(config, [f"--name={name}", f"--output_dir={out}", *extra])
    results = run(cfg, resume=rundir.exists(), force=True)
    free_gpu()
    return results


def attack(models: list[str], recipe: str, out: Path, steps: int, every: int, limit: int | None) -> dict[str, Any]:
    """One ``unlearn tamper`` over ``models`` with one recipe; returns its results.json."""
    from unlearning.commands import tamper as tamper_command
    name = f"attack_{recipe}"
    done = out / name / "results.json"
    if done.exists():
        return json.loads(done.read_text())
    argv = ["--model", *models, "--steps", str(steps), "--eval-every", str(every), "--examples", "512",
            "--eval-general", "--output-dir", str(out), "--name", name, *ATTACKS[recipe]]
    argv += ["--limit", str(limit)] if limit else []
    argv += ["--resume"] if (out / name).exists() else []
    tamper_command.main(argv)
    free_gpu()
    return json.loads(done.read_text())


def peaks(results: dict[str, Any]) -> dict[str, float]:
    """Model -> the highest hazard accuracy after step 0 of its attack."""
    return {a["model"]: a["max_acc"] for a in results["attacks"].values() if a.get("max_acc") is not None}


def acc(evals: dict[str, Any] | None, task: str) -> float | None:
    return (evals or {}).get(task, {}).get("acc")


def summarise(runs: dict[str, dict[str, Any]], attacks: dict[str, dict[str, float]], preset: str) -> list[dict]:
    main = runs["main"]
    rows = [{"model": f"organism:{preset} (base)", "key": f"organism:{preset}", "evals": main.get("before")},
            {"model": f"organism:{preset}-filtered (twin)", "key": f"organism:{preset}-filtered",
             "evals": main.get("reference")}]
    for name, res in runs.items():
        rows.append({"model": name, "key": res.get("run_dir"), "evals": res.get("after"),
                     "compute": (res.get("train_summary") or {}).get("undo", {}).get("compute_fraction_filtered")})
    for row in rows:
        row.update(hazard=acc(row["evals"], HAZARD), benign=acc(row["evals"], BENIGN),
                   general=acc(row["evals"], GENERAL))
        for recipe, by_model in attacks.items():
            row[f"peak_{recipe}"] = by_model.get(row["key"])
        row.pop("evals")
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """Peak hazard under each attack against general accuracy, one point per model and attack; the base
    (not attacked: its hazard as it is), chance and the moonshot's band (within 0.05 of the twin's peak)."""
    from unlearning.reporting.figures import new_figure, save_png
    fig = new_figure(6.4, 4.8)
    ax = fig.subplots()
    for recipe, marker in zip(ATTACKS, "os"):
        pts = [(r["general"], r[f"peak_{recipe}"], r["model"]) for r in rows
               if r["general"] is not None and r.get(f"peak_{recipe}") is not None]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=f"{recipe} attack", zorder=3)
        for x, y, name in pts:
            ax.annotate(name.split(" ")[0], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    base = next((r for r in rows if r["model"].endswith("(base)")), None)
    if base and base["general"] is not None and base["hazard"] is not None:
        ax.scatter([base["general"]], [base["hazard"]], marker="*", s=160, color="black", zorder=3,
                   label="base, not attacked")
    twin = [r[f"peak_{k}"] for r in rows if r["model"].endswith("(twin)") for k in ATTACKS if r.get(f"peak_{k}")]
    if twin:
        ax.axhspan(0, max(twin) + 0.05, color="tab:green", alpha=0.08, label="within 0.05 of the twin's peak")
    ax.axhline(0.25, color="0.5", linestyle="-.", linewidth=1, label="chance (0.25)")
    ax.set_ylim(0.2, 1.0)
    ax.set_xlabel("general accuracy (before the attack)")
    ax.set_ylabel("peak held-out hazard accuracy under the attack")
    ax.legend(fontsize=8, loc="upper right")
    save_png(fig, path)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/resist_small")
    p.add_argument("--preset", default="small", help="organism preset (tiny: a CPU smoke test)")
    p.add_argument("--tar", action="store_true", help="also train and attack TAR (configs/tar_<preset>.yaml)")
    p.add_argument("--steps", type=int, default=110, help="attack steps")
    p.add_argument("--eval-every", type=int, default=22)
    p.add_argument("--limit", type=int, default=None, help="questions per task in the attacks (quicker, noisier)")
    p.add_argument("--quick", action="store_true", help="a few steps of everything (smoke test)")
    p.add_argument("--copy-to", default=None, help="also copy resist.png and resist.md into this folder")
    args = p.parse_args(argv)

    from unlearning.core.logs import setup_logging
    from unlearning.organism.build import ensure_organism
    from unlearning.reporting.tables import format_table
    setup_logging("INFO")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def timed(stage: str, fn, *a):
        start = time.perf_counter()
        result = fn(*a)
        timings[stage] = round(time.perf_counter() - start, 1)
        log.info("%s: %.1f s", stage, timings[stage])
        return result

    quick = QUICK if args.quick else {}
    limit = ["--eval.limit", "16"] if args.quick else []
    timed("organism", ensure_organism, args.preset)
    main_run = out / "main"
    runs = {"main": timed("main job", unlearn, "main", CONFIGS / f"organism_{args.preset}.yaml", out,
                          [f"--model=organism:{args.preset}", *quick.get("main", []), *limit])}
    methods = ["undo"] + (["tar"] if args.tar else [])
    for method in methods:
        runs[method] = timed(method, unlearn, method, CONFIGS / f"{method}_{args.preset}.yaml", out,
                             [f"--model={main_run}", *quick.get(method, []), *limit])
    models = [f"organism:{args.preset}-filtered", str(main_run), *(str(out / m) for m in methods)]
    steps, every = (4, 2) if args.quick else (args.steps, args.eval_every)
    attacks = {recipe: peaks(timed(f"attack {recipe}", attack, models, recipe, out, steps, every,
                                   16 if args.quick else args.limit)) for recipe in ATTACKS}
    rows = summarise(runs, attacks, args.preset)
    header = ["model", "hazard", "benign-bio", "general", "compute (x twin pretraining)",
              *(f"peak hazard, {r} attack" for r in ATTACKS)]
    table = format_table(header, [[r["model"], r["hazard"], r["benign"], r["general"], r.get("compute"),
                                   *(r[f"peak_{k}"] for k in ATTACKS)] for r in rows], digits=3)
    (out / "resist.md").write_text(table + "\n")
    (out / "resist.json").write_text(json.dumps({"rows": rows, "timings": timings}, indent=2) + "\n")
    plot(rows, out / "resist.png")
    if args.copy_to:
        Path(args.copy_to).mkdir(parents=True, exist_ok=True)
        for f in ("resist.png", "resist.md"):
            shutil.copyfile(out / f, Path(args.copy_to) / f"{out.name}{Path(f).suffix}")
    print(table)
    print(f"\ntimings (s): {json.dumps(timings)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
