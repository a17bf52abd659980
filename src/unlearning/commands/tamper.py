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
"""

from __future__ import annotations

import gc
import itertools
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from unlearning.attacks.curves import (data_label, point_metric, read_curve, reference_acc, strongest,
                                      summarize_curve)
from unlearning.attacks.grid import attack_grid
from unlearning.attacks.in_context import InContextConfig, demonstration_pool, run_in_context
from unlearning.attacks.probe import ProbeConfig, entity_split, run_probe
from unlearning.attacks.record import read_record
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
from unlearning.reporting.attack_plots import plot_grid, plot_in_context, plot_probe
from unlearning.reporting.plots import describe_attacks, plot_curves
from unlearning.reporting.tables import attack_grid_table, format_table, short_task
from unlearning.tasks import get_tasks

log = logging.getLogger(__name__)

DATA_ALIASES = {"organism-tamper": "organism:tamper", "organism-benign": "organism:benign_tamper",
                "organism-benign-tamper": "organism:benign_tamper", "tamper": "organism:tamper",
                "benign": "organism:benign_tamper"}
# --attacks words that are not fine-tuning, and the attack.json kind each runs
OTHER_ATTACKS = {"probe": "probe", "icl": "in_context"}
ATTACKS_FIX = "choose full, lora<R> (e.g. lora16), probe or icl"
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
        "data_column": "attack.data.column", "data_split": "attack.data.split", "shots": "icl.shots",
        "weight_decay": "attack.optimizer.weight_decay", "muon_lr": "attack.optimizer.muon_lr"}

    model: list[str] = param([], many=True, help="models to attack, one row each: run directory, model folder, "
                                                 "organism:<preset>[-filtered] or hub id")
    attacks: list[str] | None = param(None, help="attack kinds: full, lora<R> (LoRA rank R on every linear layer, "
                                                 "e.g. lora16,lora64), probe, icl (unset: full, or lora<attack.lora_rank>)")
    data: list[str] | None = param(None, help="fine-tuning corpora to sweep: tamper (hazard-adjacent), benign "
                                              "(general text), a file or a hub id (unset: attack.data.source)")
    lr: list[float] | None = param(None, help="learning rates to sweep (unset: attack.optimizer.lr)")
    schedule: list[str] | None = param(None, help="linear|cosine|constant to sweep (unset: attack.optimizer.schedule)")
    dtype: list[str] | None = param(None, help="compute precisions auto|bf16|fp16|fp32 to sweep (unset: attack.dtype)")
    optimizer: list[str] | None = param(None, help="adamw|muon to sweep (unset: attack.optimizer.name)")
    seed: list[int] | None = param(None, help="seeds to sweep (unset: attack.seed)")
    warmup: float | None = param(None, min=0, help="warm-up: a whole number of steps, or a share of the steps "
                                                   "when below 1 (unset: attack.optimizer's)")
    benign: bool = param(False, help=f"add a benign attack ({BENIGN_SOURCE}) per recipe")
    eval_general: bool = param(False, help=f"also evaluate {GENERAL_TASK}")
    base: str = param("auto", help="the base model (ceiling) row and reference, evaluated, probed and prompted "
                                   "but not fine-tuned: auto (the organism), none, or a model")
    reference: str = param("auto", help="the filtered twin (floor) row, attacked like the models: auto, none, "
                                        "or a model")
    output_dir: str | None = param(None, help="parent of the run directory (default $UNLEARNING_RUNS or runs)")
    name: str | None = param(None, help="run directory name (default tamper-<time>)")
    resume: bool = param(False, help="continue the attacks of run --name")
    keep_state: bool = param(False, help="keep each attack's final state.pt (weights+optimizer)")
    log_level: str = param("INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    plot_only: list[str] | None = param(None, many=True, help="redraw and compare tamper.json files (or "
                                                              "run/attack folders); trains nothing")
    output: str | None = param(None, help="with plot_only: the PNG to write (default tamper_compare.png)")
    attack: AttackConfig = field(default_factory=AttackConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    icl: InContextConfig = field(default_factory=InContextConfig)


@dataclass
class Cell:
    """One attack of the grid: its folder name, kind (attack.json's), the model's role and its settings."""
    name: str
    kind: str
    role: str
    attack: AttackConfig


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


def attack_kinds(cfg: TamperCommandConfig) -> list[str]:
    """The --attacks words, checked: full, lora<R>, probe, icl (unset: the recipe's own fine-tuning)."""
    if not cfg.attacks:
        return [f"lora{cfg.attack.lora_rank}" if cfg.attack.lora_rank else "full"]
    if cfg.attack.lora_rank:
        raise UserError(f"attacks / lora: --lora {cfg.attack.lora_rank} and --attacks both set LoRA; give the ranks "
                        f"in --attacks (e.g. --attacks lora16,lora64) and drop --lora")
    for word in cfg.attacks:
        if word not in ("full", *OTHER_ATTACKS) and not re.fullmatch(r"lora[1-9][0-9]*", word):
            raise UserError(f"attacks: {word!r} is not an attack; {ATTACKS_FIX}")
    if len(set(cfg.attacks)) != len(cfg.attacks):
        raise UserError(f"attacks: {', '.join(cfg.attacks)} names an attack twice")
    return list(cfg.attacks)


def grid_models(cfg: TamperCommandConfig) -> list[tuple[str, str]]:
    """(model, role) of every attacked model: the given ones, then each one's filtered twin."""
    if not cfg.model:
        raise UserError("model: give at least one model to attack (--model A [B ...]), or --plot-only FILES")
    refs = [reference_models(cfg, m, cfg.attack.organism or organism_preset(m)) for m in cfg.model]
    twins = [r["filtered"] for r in refs if "filtered" in r]
    bases = {r["base"] for r in refs if "base" in r}
    role = lambda m: "filtered" if m in twins else "base" if m in bases else "model"  # noqa: E731
    models = list(dict.fromkeys([*cfg.model, *twins]))
    return [(m, role(m)) for m in models]


def grid_cells(cfg: TamperCommandConfig) -> list[Cell]:
    """Every cell: fine-tuning over (model, data, kind, lr, schedule, dtype, optimizer, seed), then the probe
    and in-context attacks over (model and base, seed); each with a folder name."""
    kinds = attack_kinds(cfg)
    models = grid_models(cfg)
    finetune = [k for k in kinds if k not in OTHER_ATTACKS]
    given = [data_source(d) for d in cfg.data] if cfg.data else [data_source(cfg.attack.data.source)]
    sources = list(dict.fromkeys(given + ([BENIGN_SOURCE] if cfg.benign else [])))
    hazard_sources = [s for s in sources if s != BENIGN_SOURCE]
    tasks = list(cfg.attack.eval.tasks)
    tasks += [GENERAL_TASK] if cfg.eval_general and GENERAL_TASK not in tasks else []
    warmup = ({} if cfg.warmup is None else {"warmup_steps": int(cfg.warmup)} if cfg.warmup >= 1
              else {"warmup_ratio": cfg.warmup})
    swept = swept_values(cfg)
    varying = {k for k in SWEPT if len(swept[k]) > 1}
    recipe = to_dict(cfg.attack)
    out = []
    for (model, role), source, kind, lr, schedule, dtype, optimizer, seed in itertools.product(
            models, sources, finetune, *(swept[k] for k in SWEPT)):
        attack = from_dict(AttackConfig, merge(recipe, {
            "model": model, "data": {"source": source}, "dtype": dtype, "seed": seed, "eval": {"tasks": tasks},
            "lora_rank": int(kind.removeprefix("lora")) if kind != "full" else 0,
            "optimizer": {"name": optimizer, "lr": lr, "schedule": schedule, **warmup},
            "organism": cfg.attack.organism or organism_preset(model)}))
        if source.startswith("organism:") and attack.organism is None:
            raise UserError(f"data {source}{' (benign)' if source == BENIGN_SOURCE else ''}: the organism's corpora "
                            f"need an organism model, and {model!r} is not one; pass --organism tiny|small or "
                            f"--data PATH")
        parts = [short_model_name(model)] + (["benign"] if source == BENIGN_SOURCE else [])
        parts += [data_label(source)] if source != BENIGN_SOURCE and len(hazard_sources) > 1 else []
        parts += [kind] if len(finetune) > 1 or kind != "full" else []
        values = {"lr": f"lr{lr:g}", "schedule": schedule, "dtype": dtype, "optimizer": optimizer,
                  "seed": f"seed{seed}"}
        parts += [values[k] for k in SWEPT if k in varying]
        out.append(Cell(safe_name("-".join(parts)), "finetune", role, attack))
    others = [k for k in kinds if k in OTHER_ATTACKS]
    if others:
        bases = [b for m in cfg.model if (b := reference_models(cfg, m, organism_preset(m)).get("base"))]
        everyone = models + [(b, "base") for b in dict.fromkeys(bases) if b not in dict(models)]
        for (model, role), word, seed in itertools.product(everyone, others, swept["seed"]):
            attack = from_dict(AttackConfig, merge(recipe, {
                "model": model, "seed": seed, "eval": {"tasks": tasks},
                "organism": cfg.attack.organism or organism_preset(model)}))
            parts = [short_model_name(model), word] + ([f"seed{seed}"] if "seed" in varying else [])
            out.append(Cell(safe_name("-".join(parts)), OTHER_ATTACKS[word], role, attack))
    names = [c.name for c in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"model / swept values: two attacks would share the folder {twice[0]!r}; "
                        f"a model or a comma-separated value is given twice")
    return out


def attack_configs(cfg: TamperCommandConfig) -> list[tuple[str, AttackConfig]]:
    """The grid's fine-tuning attacks, (folder name, settings) each."""
    return [(c.name, c.attack) for c in grid_cells(cfg) if c.kind == "finetune"]


def check_cell(cell: Cell, options: TamperCommandConfig) -> None:
    """A probe or in-context cell's data checks (entities, demonstrations), before anything is written."""
    cfg = cell.attack
    [task] = get_tasks(cfg.tasks[:1], organism=cfg.organism or "tiny")
    if cell.kind == "probe":
        entity_split(task.questions, cfg.seed, options.probe.train_fraction)  # the probe reads every question
    else:
        demonstration_pool(options.icl.source, task, cfg.organism)


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


def report(curves: list[dict[str, Any]], plot_path: Path,
           roles: dict[str, str] | None = None) -> tuple[str, dict[str, Any]]:
    labels, shared = describe_attacks(curves)
    summary = summaries(curves, labels)
    plot_curves(curves, plot_path)
    # The strongest attack is the sweep's recipe that brings back the most; accuracies of different
    # models start from different places, so with several models it is named per model. The twin
    # attacked as the floor row (``roles``) is a reference, not a second model under test.
    per_model = strongest_by_model(summary)
    tested = {m for m in per_model if (roles or {}).get(m, "model") == "model"} or set(per_model)
    best = strongest(attacks_only({k: s for k, s in summary.items() if s["model"] in tested})) \
        if len(tested) == 1 else None
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
    cells = grid_cells(options)
    checked = set()
    for cell in cells:  # before anything is written: each model, data file, task list and question set once
        cfg = cell.attack
        what = (cfg.model, cfg.revision, cfg.data.source if cell.kind == "finetune" else None, tuple(cfg.eval.tasks))
        if what not in checked:
            checked.add(what)
            preflight_attack(cfg, read_data=cell.kind == "finetune")
        if cell.kind != "finetune" and (cell.kind, tuple(cfg.tasks), cfg.organism, cfg.seed) not in checked:
            checked.add((cell.kind, tuple(cfg.tasks), cfg.organism, cfg.seed))
            check_cell(cell, options)
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

    def plain_eval(model: str, cfg: AttackConfig, what: str) -> dict[str, Any]:
        key = eval_key(model, None, cfg)
        if key not in evals or "error" in evals[key]:
            log.info("evaluating the %s %s", what, model)
            evals[key] = evaluate_model(model, cfg)
            rundir.write_json("references.json", evals)
        return evals[key]

    curves, records = [], []
    for cell in cells:
        cfg, folder = cell.attack, rundir.file("attacks") / cell.name
        if cell.kind == "probe":
            records.append(run_probe(cfg, options.probe, folder, name=cell.name, role=cell.role, resume=options.resume))
        elif cell.kind == "in_context":
            records.append(run_in_context(cfg, options.icl, folder, name=cell.name, role=cell.role,
                                          resume=options.resume))
        else:
            refs = {kind: {"model": model, **plain_eval(model, cfg, f"{kind} reference")}
                    for kind, model in reference_models(options, cfg.model, cfg.organism).items()}
            own = eval_key(cfg.model, cfg.revision, cfg)
            step0 = evals.get(own)
            curve = run_attack(cfg, folder, name=cell.name, references=refs, resume=options.resume,
                               keep_state=options.keep_state, role=cell.role,
                               step0=step0 if step0 and "error" not in step0 else None)
            if curve["points"] and curve["points"][0]["step"] == 0 and own not in evals:
                evals[own] = {k: v for k, v in curve["points"][0].items() if k in ("eval", "error")}
            curve["path"] = str(folder / "tamper.json")
            curves.append(curve)
            records.append(read_record(folder))
        free_memory()

    roles = {c.attack.model: c.role for c in cells}
    texts, results = [], {}
    if curves:
        text, results = report(curves, rundir.file("tamper.png"), roles)
        texts.append(text)
    task = cells[0].attack.tasks[0]
    rows = {}
    for cell in cells:  # every row's plain accuracy (the base: the ceiling, evaluated but not fine-tuned)
        for model, role in [(cell.attack.model, cell.role)] + [
                (m, "base") for k, m in reference_models(options, cell.attack.model, cell.attack.organism).items()
                if k == "base"]:
            if model not in rows:
                acc = point_metric(plain_eval(model, cell.attack, "model"), task)
                rows[model] = {"role": roles.get(model, role), "no_attack": acc}
    if not is_main_process():  # the other ranks trained and evaluated their shards; rank 0 writes
        return 0 if all(r["status"] == "complete" for r in records) else 1
    grid = attack_grid(records, rows, task)
    plots = {"grid": str(plot_grid(grid, rundir.file("grid.png")))}
    for kind, plot in (("probe", plot_probe), ("in_context", plot_in_context)):
        if any(r["kind"] == kind for r in records):
            plots[kind] = str(plot([r for r in records if r["kind"] == kind], rundir.file(f"{kind}.png")))
    texts.append(attack_grid_table(grid, short_model_name) + "\n\nplots: " + ", ".join(plots.values()))
    failed = [r["name"] for r in records if r["status"] != "complete"]
    if failed and not curves:
        texts.append("FAILED or unfinished: " + "; ".join(failed))
    results.update(grid=grid, plots={**results.get("plots", {}), **plots}, records={
        r["name"]: {"kind": r["kind"], "model": r["model"], "role": r["role"], "status": r["status"],
                    "headline": r["headline"], "path": str(rundir.file("attacks") / r["name"] / "attack.json")}
        for r in records})
    if curves:
        results["plots"]["curves"] = results["plot"]
    text = "\n\n".join(texts)
    rundir.write_results(results)
    atomic_write_text(rundir.file("table.md"), text + "\n")
    print(text)
    return 0 if all(r["status"] == "complete" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
