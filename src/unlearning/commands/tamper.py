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

import gc
import itertools
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from unlearning.attacks.curves import point_metric, read_curve, reference_acc, strongest, summarize_curve
from unlearning.attacks.tamper import (GENERAL_TASK, AttackConfig, base_model_of, evaluation_point, 
                                       run_attack, short_model_name)
from unlearning.core.cli import parse_command
from unlearning.core.config import from_dict, merge, param, to_dict
from unlearning.core.errors import ConfigError, UserError
from unlearning.organism.registry import organism_preset
from unlearning.core.io import atomic_write_text, read_json
from unlearning.core.logs import setup_logging
from unlearning.core.rundir import RunDir, check_writable, safe_name
from unlearning.core.runtime import (barrier, configure_cpu_threads, init_distributed, is_main_process, resolve_device,
                                     same_on_every_rank)
from unlearning.model.loading import load_model
from unlearning.preflight import preflight_attack
from unlearning.reporting.plots import describe_attacks, plot_curves
from unlearning.reporting.tables import format_table, short_task

log = logging.getLogger(__name__)

DATA_ALIASES = {"organism-tamper": "organism:tamper", "organism-benign": "organism:benign_tamper",
                "organism-benign-tamper": "organism:benign_tamper"}
SWEPT = ("lr", "schedule", "dtype", "optimizer", "seed")
BENIGN_SOURCE = "organism:benign_tamper"


@dataclass
class TamperCommandConfig:
    """The attack grid (models x swept values), the recipe every attack shares (``attack``), and
    what the command does with the results. Swept keys left unset take the recipe's value, so the
    recipe's defaults live in :class:`AttackConfig` only; per attack the grid sets ``attack.model``,
    ``attack.optimizer.lr|schedule|name``, ``attack.dtype`` and ``attack.seed``."""

    # The notebook's flags, kept short: each is a key of the shared recipe.
    ALIASES: ClassVar[dict[str, str]] = {
        "steps": "attack.steps", "eval_every": "attack.eval_every", "examples": "attack.examples",
        "seq_len": "attack.seq_len", "batch_size": "attack.batch_size", "grad_accum": "attack.grad_accum",
        "max_grad_norm": "attack.max_grad_norm", "lora": "attack.lora_rank", "lora_alpha": "attack.lora_alpha",
        "revision": "attack.revision", "device": "attack.device", "organism": "attack.organism",
        "tasks": "attack.eval.tasks", "limit": "attack.eval.limit", "eval_batch_size": "attack.eval.batch_size",
        "data": "attack.data.source", "data_column": "attack.data.column", "data_split": "attack.data.split",
        "weight_decay": "attack.optimizer.weight_decay", "muon_lr": "attack.optimizer.muon_lr"}

    model: list[str] = param([], many=True, help="models to attack, one row each: run directory, model folder, "
                                                 "organism:<preset>[-filtered] or hub id")
    lr: list[float] | None = param(None, help="learning rates to sweep (unset: attack.optimizer.lr)")
    schedule: list[str] | None = param(None, help="linear|cosine|constant to sweep (unset: attack.optimizer.schedule)")
    dtype: list[str] | None = param(None, help="compute precisions auto|bf16|fp16|fp32 to sweep (unset: attack.dtype)")
    optimizer: list[str] | None = param(None, help="adamw|muon to sweep (unset: attack.optimizer.name)")
    seed: list[int] | None = param(None, help="seeds to sweep (unset: attack.seed)")
    warmup: float | None = param(None, min=0, help="warm-up: a whole number of steps, or a share of the steps "
                                                   "when below 1 (unset: attack.optimizer's)")
    benign: bool = param(False, help=f"add a benign attack ({BENIGN_SOURCE}) per recipe")
    eval_general: bool = param(False, help=f"also evaluate {GENERAL_TASK}")
    base: str = param("auto", help="the base model row and reference: auto (the organism), none, or a model")
    reference: str = param("auto", help="the filtered-twin reference: auto, none, or a model")
    output_dir: str | None = param(None, help="parent of the run directory (default $UNLEARNING_RUNS or runs)")
    name: str | None = param(None, help="run directory name (default tamper-<time>)")
    resume: bool = param(False, help="continue the attacks of run --name")
    keep_state: bool = param(False, help="keep each attack's final state.pt (weights+optimizer)")
    log_level: str = param("INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    plot_only: list[str] | None = param(None, many=True, help="redraw and compare tamper.json files (or "
                                                              "run/attack folders); trains nothing")
    output: str | None = param(None, help="with plot_only: the PNG to write (default tamper_compare.png)")
    attack: AttackConfig = field(default_factory=AttackConfig)


def data_source(text: str) -> str:
    text = DATA_ALIASES.get(text, text)
    if text.startswith(("organism:", "hub:")) or Path(text).expanduser().exists() or Path(text).suffix:
        return text
    return f"hub:{text}"  # a bare hub dataset id


def swept_values(cfg: TamperCommandConfig) -> dict[str, list[Any]]:
    """Each swept key's values; an unset one is the shared recipe's single value."""
    recipe = cfg.attack
    own = {"lr": recipe.optimizer.lr, "schedule": recipe.optimizer.schedule, "dtype": recipe.dtype,
           "optimizer": recipe.optimizer.name, "seed": recipe.seed}
    return {k: getattr(cfg, k) if getattr(cfg, k) else [own[k]] for k in SWEPT}


def attack_configs(cfg: TamperCommandConfig) -> list[tuple[str, AttackConfig]]:
    """Every (model, data, lr, schedule, dtype, optimizer, seed) combination, with a folder name each."""
    if not cfg.model:
        raise UserError("model: give at least one model to attack (--model A [B ...]), or --plot-only FILES")
    sources = [data_source(cfg.attack.data.source)] + ([BENIGN_SOURCE] if cfg.benign else [])
    tasks = list(cfg.attack.eval.tasks)
    tasks += [GENERAL_TASK] if cfg.eval_general and GENERAL_TASK not in tasks else []
    warmup = ({} if cfg.warmup is None else {"warmup_steps": int(cfg.warmup)} if cfg.warmup >= 1
              else {"warmup_ratio": cfg.warmup})
    swept = swept_values(cfg)
    varying = {k for k in SWEPT if len(swept[k]) > 1}
    recipe = to_dict(cfg.attack)
    out = []
    for model, source, lr, schedule, dtype, optimizer, seed in itertools.product(
            cfg.model, sources, *(swept[k] for k in SWEPT)):
        attack = from_dict(AttackConfig, merge(recipe, {
            "model": model, "data": {"source": source}, "dtype": dtype, "seed": seed, "eval": {"tasks": tasks},
            "optimizer": {"name": optimizer, "lr": lr, "schedule": schedule, **warmup},
            "organism": cfg.attack.organism or organism_preset(model)}))
        if source.startswith("organism:") and attack.organism is None:
            raise UserError(f"attack.data.source {source}{' (--benign)' if source != sources[0] else ''}: the "
                            f"organism's corpora need an organism model, and {model!r} is not one; pass "
                            f"--organism tiny|small or --data PATH")
        parts = [short_model_name(model)] + (["benign"] if source == BENIGN_SOURCE else [])
        values = {"lr": f"lr{lr:g}", "schedule": schedule, "dtype": dtype, "optimizer": optimizer,
                  "seed": f"seed{seed}"}
        parts += [values[k] for k in SWEPT if k in varying]
        out.append((safe_name("-".join(parts)), attack))
    names = [n for n, _ in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"model / swept values: two attacks would share the folder {twice[0]!r}; "
                        f"a model or a comma-separated value is given twice")
    return out


def reference_models(cfg: TamperCommandConfig, model: str, organism: str | None) -> dict[str, str]:
    out = {}
    base = base_model_of(model) if cfg.base == "auto" else (None if cfg.base == "none" else cfg.base)
    if base:
        out["base"] = base
    filtered = (f"organism:{organism}-filtered" if organism else None) if cfg.reference == "auto" else (
        None if cfg.reference == "none" else cfg.reference)
    if filtered:
        out["filtered"] = filtered
    return out


def evaluate_model(name: str, cfg: AttackConfig) -> dict[str, Any]:
    """One plain evaluation (fp32 weights, as an attack's step 0) of ``name`` with ``cfg``'s tasks."""
    device = resolve_device(cfg.device)
    model, tokenizer = load_model(name, dtype=torch.float32, device=str(device))
    point = evaluation_point(model, tokenizer, cfg, device)
    del model
    free_memory()
    return point


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def eval_key(model: str, revision: str | None, cfg: AttackConfig) -> str:
    """One evaluation per model, revision and evaluation settings (the batch size changes no number)."""
    settings = {k: v for k, v in to_dict(cfg.eval).items() if k not in ("tasks", "batch_size") and v is not None}
    return f"{model}@{revision or ''}|{','.join(cfg.tasks)}|{cfg.eval.limit}" + "".join(
        f"|{k}={v}" for k, v in sorted(settings.items()) if k != "limit")


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
    attacks = attack_configs(options)
    checked = set()
    for _, cfg in attacks:  # before anything is written: each model, data file and task list once
        what = (cfg.model, cfg.revision, cfg.data.source, tuple(cfg.eval.tasks))
        if what not in checked:
            checked.add(what)
            preflight_attack(cfg)
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

    # References and step-0 evaluations are shared: one evaluation per (model, evaluation settings).
    cache_path = rundir.file("references.json")
    evals: dict[str, Any] = read_json(cache_path) if options.resume and cache_path.exists() else {}
    curves = []
    for name, cfg in attacks:
        refs = {}
        for kind, model in reference_models(options, cfg.model, cfg.organism).items():
            key = eval_key(model, None, cfg)
            if key not in evals or "error" in evals[key]:
                log.info("evaluating the %s reference %s", kind, model)
                evals[key] = evaluate_model(model, cfg)
                rundir.write_json("references.json", evals)
            refs[kind] = {"model": model, **evals[key]}
        own = eval_key(cfg.model, cfg.revision, cfg)
        step0 = evals.get(own)
        curve = run_attack(cfg, rundir.file("attacks") / name, name=name, references=refs, resume=options.resume,
                           keep_state=options.keep_state, step0=step0 if step0 and "error" not in step0 else None)
        if curve["points"] and curve["points"][0]["step"] == 0 and own not in evals:
            evals[own] = {k: v for k, v in curve["points"][0].items() if k in ("eval", "error")}
        curve["path"] = str(rundir.file("attacks") / name / "tamper.json")
        curves.append(curve)
        free_memory()

    if is_main_process():
        text, results = report(curves, rundir.file("tamper.png"))
        rundir.write_results(results)
        atomic_write_text(rundir.file("table.md"), text + "\n")
        print(text)
    return 0 if all(c["status"] == "complete" for c in curves) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
