"""``unlearn tamper``: fine-tune unlearned models on hazard-adjacent text and watch accuracy come back.

    unlearn tamper --model runs/seq-small                       # the notebook's recipe
    unlearn tamper --model runs/seq-small organism:small-filtered --benign --eval-general
    unlearn tamper --model runs/seq-small --lr 1e-5,2e-5,5e-5 --seed 0,1   # a small sweep
    unlearn tamper --plot-only runs/tamper-a runs/tamper-b/attacks/x/tamper.json --output cmp.png

Comma-separated ``--lr``, ``--schedule``, ``--dtype``, ``--optimizer`` and ``--seed`` values run
every combination; several ``--model`` values attack each model; ``--benign`` adds, per recipe,
an attack on general text (``organism:benign_tamper``) to tell relearning from generic damage.
The run directory gets ``attacks/<attack>/tamper.json`` (each attack's curve, written after every
evaluation), ``references.json`` (the base model and the filtered twin, evaluated once),
``results.json`` (per-attack summary: accuracy by step, half-gap step, recovery AUC; the strongest
attack), ``tamper.png`` and ``table.md``; the table is printed at the end. Exit status 1 when an
attack failed (its curve file says why).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import logging
import sys
from pathlib import Path
from typing import Any

from unlearning.core.config import from_dict
from unlearning.core.errors import ConfigError, UserError
from unlearning.core.io import atomic_write_text, read_json
from unlearning.core.rundir import RunDir, safe_name
from unlearning.reporting.tables import format_table, short_task
from unlearning.attacks.tamper import (DEFAULT_TASKS, GENERAL_TASK, AttackConfig, base_model_of, evaluation_point,
                               run_attack, short_model_name)
from unlearning.organism.registry import organism_preset
from unlearning.attacks.curves import point_metric, read_curve, reference_acc, strongest, summarize_curve

log = logging.getLogger(__name__)

DATA_ALIASES = {"organism-tamper": "organism:tamper", "organism-benign": "organism:benign_tamper",
                "organism-benign-tamper": "organism:benign_tamper"}
SWEPT = ("lr", "schedule", "dtype", "optimizer", "seed")
BENIGN_SOURCE = "organism:benign_tamper"


def csv(kind: type) -> Any:
    def parse(text: str) -> list[Any]:
        try:
            return [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated {kind.__name__} values") from None
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unlearn tamper", description=__doc__.replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", action="extend", default=[], metavar="MODEL",
                   help="run directory, model folder, organism:<preset>[-filtered] or hub id (several: one row each)")
    p.add_argument("--revision", default=None)
    p.add_argument("--data", default="organism:tamper",
                   help="organism-tamper (default), organism-benign, a local .jsonl/.json/.parquet/.txt, or a hub id")
    p.add_argument("--data-column", default="text")
    p.add_argument("--data-split", default="train")
    p.add_argument("--examples", type=int, default=512, help="unique training examples")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=110)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--lr", type=csv(float), default=[2e-5], help="learning rate(s), comma-separated")
    p.add_argument("--schedule", type=csv(str), default=["linear"], help="linear|cosine|constant, comma-separated")
    p.add_argument("--warmup", type=float, default=0,
                   help="warm-up: a whole number of steps, or a share of the steps when below 1")
    p.add_argument("--dtype", type=csv(str), default=["auto"], help="compute precision(s): auto|bf16|fp16|fp32")
    p.add_argument("--optimizer", type=csv(str), default=["adamw"], help="adamw|muon, comma-separated")
    p.add_argument("--muon-lr", type=float, default=None, help="Muon's learning rate (--optimizer muon)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--lora", type=int, default=0, metavar="RANK", help="LoRA rank; 0 = full fine-tuning")
    p.add_argument("--lora-alpha", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seed", type=csv(int), default=[0], help="seed(s), comma-separated")
    p.add_argument("--tasks", type=csv(str), default=list(DEFAULT_TASKS), help="evaluated tasks; the first is primary")
    p.add_argument("--eval-general", action="store_true", help=f"also evaluate {GENERAL_TASK}")
    p.add_argument("--limit", type=int, default=None, help="questions per task (quick checks)")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--organism", default=None,
                   help="organism preset for organism:* data and tasks (default: the model's)")
    p.add_argument("--benign", action="store_true", help="add a benign attack (organism:benign_tamper) per recipe")
    p.add_argument("--base", default="auto",
                   help="the base model row and reference: auto (the organism), none, or a model")
    p.add_argument("--reference", default="auto", help="the filtered-twin reference: auto, none, or a model")
    p.add_argument("--device", default="auto")
    p.add_argument("--output-dir", default=None, help="parent of the run directory (default $UNLEARNING_RUNS or runs)")
    p.add_argument("--name", default=None, help="run directory name (default tamper-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the attacks of run --name")
    p.add_argument("--keep-state", action="store_true", help="keep each attack's final state.pt (weights+optimizer)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--plot-only", nargs="+", default=None, metavar="FILE",
                   help="redraw and compare tamper.json files (or run/attack folders); trains nothing")
    p.add_argument("--output", default=None, help="--plot-only: the PNG to write (default tamper_compare.png)")
    return p


def data_source(text: str) -> str:
    text = DATA_ALIASES.get(text, text)
    if text.startswith(("organism:", "hub:")) or Path(text).expanduser().exists() or Path(text).suffix:
        return text
    return f"hub:{text}"  # a bare hub dataset id


def attack_configs(args: argparse.Namespace) -> list[tuple[str, AttackConfig]]:
    """Every (model, data, lr, schedule, dtype, optimizer, seed) combination, with a folder name each."""
    if not args.model:
        raise UserError("--model: give at least one model to attack (or --plot-only FILES)")
    sources = [data_source(args.data)] + ([BENIGN_SOURCE] if args.benign else [])
    tasks = list(args.tasks) + ([GENERAL_TASK] if args.eval_general and GENERAL_TASK not in args.tasks else [])
    warmup = {"warmup_steps": int(args.warmup)} if args.warmup >= 1 else {"warmup_ratio": args.warmup}
    varying = {k for k in SWEPT if len(getattr(args, k)) > 1}
    out = []
    for model, source, lr, schedule, dtype, optimizer, seed in itertools.product(
            args.model, sources, args.lr, args.schedule, args.dtype, args.optimizer, args.seed):
        opt = {"name": optimizer, "lr": lr, "schedule": schedule, "weight_decay": args.weight_decay, **warmup}
        if args.muon_lr is not None:
            opt["muon_lr"] = args.muon_lr
        cfg = from_dict(AttackConfig, {
            "model": model, "revision": args.revision, "examples": args.examples, "seq_len": args.seq_len,
            "data": {"source": source, "column": args.data_column, "split": args.data_split},
            "steps": args.steps, "eval_every": args.eval_every, "batch_size": args.batch_size,
            "grad_accum": args.grad_accum, "optimizer": opt, "max_grad_norm": args.max_grad_norm,
            "dtype": dtype, "lora_rank": args.lora, "lora_alpha": args.lora_alpha, "tasks": tasks,
            "eval_batch_size": args.eval_batch_size, "eval_limit": args.limit,
            "organism": args.organism or organism_preset(model), "seed": seed, "device": args.device})
        if source.startswith("organism:") and cfg.organism is None:
            raise UserError(f"--data {source}{' (--benign)' if source != sources[0] else ''}: the organism's corpora "
                            f"need an organism model, and {model!r} is not one; pass --organism tiny|small "
                            f"or --data PATH")
        parts = [short_model_name(model)] + (["benign"] if source == BENIGN_SOURCE else [])
        values = {"lr": f"lr{lr:g}", "schedule": schedule, "dtype": dtype, "optimizer": optimizer,
                  "seed": f"seed{seed}"}
        parts += [values[k] for k in SWEPT if k in varying]
        out.append((safe_name("-".join(parts)), cfg))
    names = [n for n, _ in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"--model / swept values: two attacks would share the folder {twice[0]!r}; "
                        f"a model or a comma-separated value is given twice")
    return out


def reference_models(args: argparse.Namespace, model: str, organism: str | None) -> dict[str, str]:
    out = {}
    base = base_model_of(model) if args.base == "auto" else (None if args.base == "none" else args.base)
    if base:
        out["base"] = base
    filtered = (f"organism:{organism}-filtered" if organism else None) if args.reference == "auto" else (
        None if args.reference == "none" else args.reference)
    if filtered:
        out["filtered"] = filtered
    return out


def evaluate_model(name: str, cfg: AttackConfig) -> dict[str, Any]:
    """One plain evaluation (fp32 weights, as an attack's step 0) of ``name`` with ``cfg``'s tasks."""
    import torch

    from unlearning.model.loading import load_model
    from unlearning.core.runtime import resolve_device
    device = resolve_device(cfg.device)
    model, tokenizer = load_model(name, dtype=torch.float32, device=str(device))
    point = evaluation_point(model, tokenizer, cfg, device)
    del model
    free_memory()
    return point


def free_memory() -> None:
    gc.collect()
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def eval_key(model: str, revision: str | None, cfg: AttackConfig) -> str:
    """One evaluation per model, revision, task list and question limit."""
    return f"{model}@{revision or ''}|{','.join(cfg.tasks)}|{cfg.eval_limit}"


def tamper_table(curves: list[dict[str, Any]], labels: list[str]) -> str:
    """The notebook's table: the base model first, one row per attack, one column per evaluated step."""
    task = curves[0]["primary_task"]
    steps = sorted({p["step"] for c in curves for p in c["points"]})
    rows, seen = [], set()
    for kind, title in (("base", "Baseline (target)"), ("filtered", "Filtered twin (no attack)")):
        for c in curves:
            acc = reference_acc(c.get("references") or {}, kind, task)
            model = (c.get("references") or {}).get(kind, {}).get("model")
            if acc is not None and (kind, model) not in seen:
                seen.add((kind, model))
                rows.append([f"{title}: {short_model_name(model)}", acc] + [None] * (len(steps) - 1))
    for c, label in zip(curves, labels):
        by_step = {p["step"]: p for p in c["points"]}
        cells = [("FAILED" if "error" in by_step[s] else point_metric(by_step[s], task)) if s in by_step else None
                 for s in steps]
        rows.append([label + ("" if c["status"] == "complete" else f" ({c['status']})")] + cells)
    return format_table([f"Model ({short_task(task)} acc)"] + [f"Step {s}" for s in steps], rows)


def summaries(curves: list[dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    out = {}
    for c, label in zip(curves, labels):
        task = c["primary_task"]
        out[c["name"]] = {"label": label, "model": c["model"], "data": c["config"]["data"]["source"],
                          "status": c["status"], "error": c.get("error"), "curve": c.get("path"),
                          **summarize_curve(c["points"], task, reference_acc(c.get("references") or {}, "base", task))}
    return out


def summary_table(summary: dict[str, Any]) -> str:
    rows = [[s["label"], s["step0_acc"], s["max_acc"], s["max_acc_step"], s["final_acc"], s["gap"],
             s["half_gap_step"] if s["half_gap_step"] is not None else ("not reached" if s["gap"] and s["gap"] > 0
                                                                        else None),
             s["recovery_auc"], s["mean_acc"]] for s in summary.values()]
    return format_table(["Attack", "step-0 acc", "max acc", "at step", "final acc", "gap (base - step 0)",
                         "half-gap step", "recovery AUC", "mean acc"], rows)


def attacks_only(summary: dict[str, Any]) -> dict[str, Any]:
    """The hazard-data attacks: benign fine-tuning is a control, not a contender for the strongest attack."""
    return {k: s for k, s in summary.items() if s["data"] != BENIGN_SOURCE}


def strongest_by_model(summary: dict[str, Any]) -> dict[str, str | None]:
    models = {s["model"] for s in summary.values()}
    return {m: strongest({k: s for k, s in attacks_only(summary).items() if s["model"] == m}) for m in sorted(models)}


def report(curves: list[dict[str, Any]], plot_path: Path) -> tuple[str, dict[str, Any]]:
    from unlearning.reporting.plots import describe_attacks, plot_curves
    labels, shared = describe_attacks(curves)
    summary = summaries(curves, labels)
    plot_curves(curves, plot_path)
    # The strongest attack is the sweep's recipe that brings back the most; accuracies of different
    # models start from different places, so with several models it is named per model.
    per_model = strongest_by_model(summary)
    best = strongest(attacks_only(summary)) if len(per_model) == 1 else None
    text = "\n\n".join([tamper_table(curves, labels), summary_table(summary)])
    lines = [f"recipe: {shared}" if shared else "", f"plot: {plot_path}"]
    for model, name in per_model.items():
        if name is not None:
            top = summary[name]
            where = "" if len(per_model) == 1 else f" on {short_model_name(model)}"
            lines.append(f"strongest attack{where}: {top['label']} (max acc {top['max_acc']:.4f} at step "
                         f"{top['max_acc_step']}, from {top['step0_acc']:.4f} at step 0)")
    failed = [s["label"] for s in summary.values() if s["status"] != "complete"]
    if failed:
        lines.append("FAILED or unfinished: " + "; ".join(failed))
    text += "\n\n" + "\n".join(line for line in lines if line)
    return text, {"attacks": summary, "strongest": best, "strongest_per_model": per_model,
                  "plot": str(plot_path), "recipe": shared}


def plot_only(files: list[str], output: str | None) -> int:
    paths: list[Path] = []
    for f in files:
        path = Path(f)
        found = sorted(path.glob("**/tamper.json")) if path.is_dir() and not (path / "tamper.json").exists() else [path]
        if not found:
            raise UserError(f"--plot-only: {path} holds no tamper.json")
        paths += found
    curves = [read_curve(p) for p in paths]
    text, _ = report(curves, Path(output or "tamper_compare.png"))
    print(text)
    return 0 if all(c["status"] == "complete" for c in curves) else 1


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from unlearning.core.runtime import configure_cpu_threads
    configure_cpu_threads()
    if args.plot_only:
        from unlearning.core.logs import setup_logging
        setup_logging(args.log_level)
        return plot_only(args.plot_only, args.output)
    if args.resume and not args.name:
        raise UserError("--resume: name the run to continue with --name")
    attacks = attack_configs(args)
    rundir = RunDir.for_command(args.output_dir, args.name, "tamper")
    if rundir.results_path.exists() and not args.resume:
        raise ConfigError(f"--name: {rundir.path} already holds results; pass --resume or choose another --name")
    rundir.start_logging(args.log_level)
    rundir.write_config({k: v for k, v in vars(args).items() if k not in ("plot_only", "output")})

    # References and step-0 evaluations are shared: one evaluation per (model, tasks, limit).
    cache_path = rundir.file("references.json")
    evals: dict[str, Any] = read_json(cache_path) if args.resume and cache_path.exists() else {}
    curves = []
    for name, cfg in attacks:
        refs = {}
        for kind, model in reference_models(args, cfg.model, cfg.organism).items():
            key = eval_key(model, None, cfg)
            if key not in evals or "error" in evals[key]:
                log.info("evaluating the %s reference %s", kind, model)
                evals[key] = evaluate_model(model, cfg)
                rundir.write_json("references.json", evals)
            refs[kind] = {"model": model, **evals[key]}
        own = eval_key(cfg.model, cfg.revision, cfg)
        step0 = evals.get(own)
        curve = run_attack(cfg, rundir.file("attacks") / name, name=name, references=refs, resume=args.resume,
                           keep_state=args.keep_state, step0=step0 if step0 and "error" not in step0 else None)
        if curve["points"] and curve["points"][0]["step"] == 0 and own not in evals:
            evals[own] = {k: v for k, v in curve["points"][0].items() if k in ("eval", "error")}
        curve["path"] = str(rundir.file("attacks") / name / "tamper.json")
        curves.append(curve)
        free_memory()

    text, results = report(curves, rundir.file("tamper.png"))
    rundir.write_results(results)
    atomic_write_text(rundir.file("table.md"), text + "\n")
    print(text)
    return 0 if all(c["status"] == "complete" for c in curves) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
