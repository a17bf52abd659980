"""``unlearn tamper``'s report: the fine-tuning curves' tables and the attack grid's table and plots.

Two parts, both text plus the JSON that goes into ``results.json``:

* :func:`curves_report` (fine-tuning cells, and ``--plot-only``): the notebook's table (the base
  model first, one row per attack, one column per evaluated step), the recovery summary of each
  curve (:func:`unlearning.attacks.curves.summarize_curve`), the strongest attack and ``tamper.png``;
* :func:`grid_report` (the whole grid, rank 0): that, then the methods x attacks table
  (:mod:`unlearning.attacks.grid`), ``grid.png``, ``probe.png``, ``in_context.png``, and each
  cell's kind, role, status and headline in ``records`` (which the results store records: the
  probe and in-context cells have no curve summary in ``attacks``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unlearning.attacks.cells import BENIGN_SOURCE
from unlearning.attacks.curves import point_metric, reference_acc, strongest, summarize_curve
from unlearning.attacks.grid import attack_grid
from unlearning.attacks.record import RECORD_NAME
from unlearning.attacks.session import GridRun
from unlearning.attacks.tamper import short_model_name
from unlearning.reporting.attack_plots import plot_grid, plot_in_context, plot_probe
from unlearning.reporting.plots import describe_attacks, plot_curves
from unlearning.reporting.tables import attack_grid_table, format_table, short_task


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
    """Each curve's recovery numbers by attack name (``results.json["attacks"]``, the store's attack rows)."""
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


def curves_report(curves: list[dict[str, Any]], plot_path: Path,
                  roles: dict[str, str] | None = None) -> tuple[str, dict[str, Any]]:
    """The curves' tables and summary lines, ``plot_path`` drawn; and their part of ``results.json``."""
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


def grid_report(run: GridRun, folder: Path) -> tuple[str, dict[str, Any]]:
    """The grid's table text (``table.md``) and ``results.json``; the plots are written into ``folder``."""
    records = run.records
    texts, results = [], {}
    if run.curves:
        text, results = curves_report(run.curves, folder / "tamper.png", run.roles)
        texts.append(text)
    grid = attack_grid(records, run.rows, run.task)
    plots = {"grid": str(plot_grid(grid, folder / "grid.png"))}
    for kind, plot in (("probe", plot_probe), ("in_context", plot_in_context)):
        if any(r["kind"] == kind for r in records):
            plots[kind] = str(plot([r for r in records if r["kind"] == kind], folder / f"{kind}.png"))
    texts.append(attack_grid_table(grid, short_model_name) + "\n\nplots: " + ", ".join(plots.values()))
    failed = [r["name"] for r in records if r["status"] != "complete"]
    if failed and not run.curves:  # with curves, their summary already names the failed ones
        texts.append("FAILED or unfinished: " + "; ".join(failed))
    results.update(grid=grid, plots={**results.get("plots", {}), **plots}, records={
        r["name"]: {"kind": r["kind"], "model": r["model"], "role": r["role"], "status": r["status"],
                    "error": r.get("error"), "task": r["task"], "headline": r["headline"],
                    "path": str(folder / "attacks" / r["name"] / RECORD_NAME)}
        for r in records})
    if run.curves:
        results["plots"]["curves"] = results["plot"]
    return "\n\n".join(texts), results
