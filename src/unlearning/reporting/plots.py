"""Tamper curves as figures: accuracy against fine-tuning step, one line per attack.

Each panel has horizontal references: the base model (what unlearning removed), the filtered
twin (the organism's "never knew it") and chance. The title carries the shared recipe; each
line's label says what differs between the attacks (model, data, lr, ...). Matplotlib's Agg
backend through the object-oriented API, so nothing needs a display and no global figure state
leaks between calls.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from unlearning.reporting.figures import new_figure, save_png
from unlearning.reporting.pareto import Point, tradeoff_plot
from unlearning.reporting.tables import short_task
from unlearning.attacks.tamper import GENERAL_TASK, short_model_name
from unlearning.attacks.curves import CHANCE, data_label, point_metric, reference_acc


def _lr_label(c: dict[str, Any]) -> str:
    opt = c["optimizer"]
    if opt["name"] == "muon":
        return f"muon {opt['muon_lr']:g} / adamw {opt['adam_lr'] if opt.get('adam_lr') is not None else opt['lr']:g}"
    return f"{opt['lr']:g}"


def _warmup_label(c: dict[str, Any]) -> str:
    opt = c["optimizer"]
    if opt.get("warmup_steps") is not None:
        return str(opt["warmup_steps"])
    return f"{opt['warmup_ratio']:.0%}" if opt["warmup_ratio"] else "0"


# (name, value of a config dict as text); model and data first: they say what was attacked with what.
RECIPE_FIELDS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("model", lambda c: short_model_name(c["model"])),
    ("data", lambda c: data_label(c["data"]["source"])),
    ("lr", _lr_label),
    ("sched", lambda c: c["optimizer"]["schedule"]),
    ("warmup", _warmup_label),
    ("opt", lambda c: c["optimizer"]["name"]),
    ("dtype", lambda c: c["dtype"]),
    ("attack", lambda c: f"lora{c['lora_rank']}" if c["lora_rank"] else "full"),
    ("examples", lambda c: str(c["examples"])),
    ("batch", lambda c: f"{c['batch_size']}x{c['grad_accum']}"),
    ("steps", lambda c: str(c["steps"])),
    ("seed", lambda c: str(c["seed"])),
]


def describe_attacks(curves: list[dict[str, Any]]) -> tuple[list[str], str]:
    """Per-curve labels (what differs between the attacks) and one line of what they share."""
    values = [{k: f(c["config"]) for k, f in RECIPE_FIELDS} for c in curves]
    varying = [k for k, _ in RECIPE_FIELDS if len({v[k] for v in values}) > 1]
    shared = [k for k, _ in RECIPE_FIELDS if k not in varying and k != "model"]
    def label(v: dict[str, str], c: dict[str, Any]) -> str:
        if c["config"].get("label"):
            return c["config"]["label"]
        return ", ".join([v["model"]] + [v[k] if k == "data" else f"{k} {v[k]}" for k in varying if k != "model"])
    labels = [label(v, c) for v, c in zip(values, curves)]
    for i, lab in enumerate(labels):  # the same recipe twice (e.g. two runs): say which file
        if labels.count(lab) > 1 and curves[i].get("path"):
            labels[i] = f"{lab} [{Path(curves[i]['path']).parent.name}]"
    common = ", ".join(f"{k} {values[0][k]}" for k in shared) if curves else ""
    return labels, common


METRIC_NAMES = {"acc": "accuracy", "correct_prob": "probability of the correct answer"}
AXIS_NAMES = {"acc": "accuracy", "correct_prob": "P(correct answer)"}


def task_label(task: str) -> str:
    """``organism_hazard_cloze`` -> ``hazard_cloze``; a question file -> its file name."""
    name = short_task(task)
    return Path(name).name if "/" in name else name
REFERENCE_STYLES = {"base": dict(color="black", linestyle="--", linewidth=1.2),
                    "filtered": dict(color="tab:green", linestyle=":", linewidth=1.8)}
REFERENCE_NAMES = {"base": "base model", "filtered": "filtered twin"}
# Green and gray are kept for the references (filtered twin, chance), black for the base model.
CURVE_COLORS = ["C0", "C1", "C3", "C4", "C5", "C6", "C8", "C9"]


def panels_for(curves: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(task, metric) per panel: the primary task's accuracy and correct_prob, then general accuracy."""
    primary = curves[0]["primary_task"]
    def present(task: str, metric: str) -> bool:
        return any(point_metric(p, task, metric) is not None for c in curves for p in c["points"])
    panels = [(primary, "acc")]
    if present(primary, "correct_prob"):
        panels.append((primary, "correct_prob"))
    if primary != GENERAL_TASK and present(GENERAL_TASK, "acc"):
        panels.append((GENERAL_TASK, "acc"))
    return panels


def _draw_panel(ax: Any, curves: list[dict[str, Any]], labels: list[str], task: str, metric: str) -> None:
    # An attack and its benign control share a colour (same model and recipe); the control is dashed.
    groups: dict[tuple[str, ...], str] = {}
    failed_drawn = False
    for curve, label in zip(curves, labels):
        key = tuple(f(curve["config"]) for k, f in RECIPE_FIELDS if k != "data")
        color = groups.setdefault(key, CURVE_COLORS[len(groups) % len(CURVE_COLORS)])
        benign = data_label(curve["config"]["data"]["source"]) == "benign"
        good = [p for p in curve["points"] if point_metric(p, task, metric) is not None]
        ax.plot([p["step"] for p in good], [point_metric(p, task, metric) for p in good], marker="o",
                markersize=3.5, color=color, label=label, linestyle="--" if benign else "-")
        failed = [p["step"] for p in curve["points"] if "error" in p]
        if failed:  # a failed evaluation is shown as such, never as a value
            ax.plot(failed, [0.02] * len(failed), "x", color="red", markersize=8,
                    label=None if failed_drawn else "evaluation failed")
            failed_drawn = True
    seen: set[tuple[str, str, float]] = set()
    for curve in curves:
        refs = curve.get("references") or {}
        for kind in ("base", "filtered"):
            value = reference_acc(refs, kind, task, metric)
            if value is None:
                continue
            key = (kind, refs[kind].get("model", ""), round(value, 6))
            if key in seen:
                continue
            seen.add(key)
            model = short_model_name(refs[kind].get("model", ""))
            ax.axhline(value, label=f"{REFERENCE_NAMES[kind]} ({model}): {value:.3f}", **REFERENCE_STYLES[kind])
    # Four choices: chance accuracy and a uniform correct_prob are both 0.25.
    ax.axhline(CHANCE, color="gray", linestyle="-.", linewidth=1, label=f"chance ({CHANCE:g})")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel(AXIS_NAMES.get(metric, metric))
    ax.set_title(f"{task_label(task)}: {METRIC_NAMES.get(metric, metric)}", fontsize=10)
    ax.grid(alpha=0.3)


def plot_curves(curves: list[dict[str, Any]], path: str | Path, *, title: str | None = None) -> Path:
    """Draw every curve (tamper.json contents) into one PNG at ``path`` (written atomically)."""
    if not curves:
        raise ValueError("plot_curves: no curves to draw")
    labels, shared = describe_attacks(curves)
    panels = panels_for(curves)
    fig = new_figure(6.2 * len(panels), 5.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (task, metric) in zip(axes, panels):
        _draw_panel(ax, curves, labels, task, metric)
    handles, names = axes[0].get_legend_handles_labels()
    # As many legend columns as the longest label lets fit across the figure (about 13 characters an inch).
    width = fig.get_figwidth() * 13
    ncols = max(1, min(3, len(names), int(width // (max(map(len, names)) + 8))))
    fig.legend(handles, names, loc="outside lower center", ncols=ncols, fontsize=8, frameon=False)
    primary = task_label(curves[0]["primary_task"])
    heading = title or f"Tamper attack: does {primary} accuracy come back under fine-tuning?"
    fig.suptitle(f"{heading}\n{shared}" if shared else heading, fontsize=11)
    return save_png(fig, path)


# ----------------------------------------------------------------------------- hazard against general

def plot_hazard_vs_general(runs: list[dict[str, Any]], path: str | Path, *, references: list[dict[str, Any]] = (),
                           hazard_task: str = "hazard", general_task: str = "general",
                           title: str | None = None) -> Path:
    """Each run as a point (hazard accuracy across, general accuracy up; ``runs``: {"label",
    "hazard", "general", "pareto"}), the Pareto front as a line through its points, the
    ``references`` ({"kind": base|filtered, "label", "hazard", "general"}) and chance. The goal is the
    top-left corner: hazard at chance, general where the base model was."""
    drawn = [r for r in runs if r["hazard"] is not None and r["general"] is not None]
    if not drawn:
        raise ValueError("plot_hazard_vs_general: no run has both accuracies")
    points = [Point(r["hazard"], r["general"], label=r["label"], front=bool(r["pareto"])) for r in drawn]
    refs = {f"{REFERENCE_NAMES[r['kind']]}: {short_model_name(r['label'])}": (r["hazard"], r["general"])
            for r in references if r["hazard"] is not None and r["general"] is not None}
    return tradeoff_plot(points, path, xlabel=f"hazard accuracy ({task_label(hazard_task)}; lower is better)",
                         ylabel=f"general accuracy ({task_label(general_task)}; higher is better)",
                         title=title or "Hazard against general accuracy", references=refs,
                         chance_x=CHANCE, chance_y=CHANCE, unit_axes=True,
                         front_label="Pareto front (low hazard, high general)")


# ----------------------------------------------------------------------------------- training curves

BOOKKEEPING = {"step", "phase", "layer", "phase_step", "time", "grad_norm"}


def plot_training_curves(records: list[dict[str, Any]], path: str | Path, *, title: str | None = None) -> Path:
    """A run's metrics.jsonl records by step: every loss (``*_loss``), weighted term (``*_term``)
    and coefficient (``*_coef``), and the learning rate, one panel each; dotted lines where a phase
    (a target layer, for the sequential method) begins."""
    records = [r for r in records if isinstance(r.get("step"), (int, float))]
    if not records:
        raise ValueError("plot_training_curves: no step records")
    keys = list(dict.fromkeys(k for r in records for k, v in r.items()
                              if k not in BOOKKEEPING and isinstance(v, (int, float)) and not isinstance(v, bool)))
    groups = [("losses", [k for k in keys if k.endswith("_loss")]), ("weighted terms", [k for k in keys if k.endswith("_term")]),
              ("coefficients", [k for k in keys if k.endswith("_coef")]), ("learning rate", [k for k in keys if k == "lr"])]
    named = {k for _, ks in groups for k in ks}
    groups.append(("other", [k for k in keys if k not in named]))
    groups = [(name, ks) for name, ks in groups if ks]
    fig = new_figure(6.0 * min(2, len(groups)), 3.6 * ((len(groups) + 1) // 2))
    axes = fig.subplots((len(groups) + 1) // 2, min(2, len(groups)), squeeze=False).ravel()
    # a new phase starts where the phase number changes: the line sits half a step before its first step
    starts = [b["step"] - 0.5 for a, b in zip(records, records[1:]) if b.get("phase") != a.get("phase")]
    for ax, (name, ks) in zip(axes, groups):
        for k in ks:
            good = [r for r in records if isinstance(r.get(k), (int, float))]
            ax.plot([r["step"] for r in good], [r[k] for r in good], label=k, linewidth=1.2)
        for i, x in enumerate(starts):
            ax.axvline(x, color="gray", linestyle=":", linewidth=1, label="phase boundary" if i == 0 else None)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    fig.suptitle(title or "training curves", fontsize=11)
    return save_png(fig, path)
