"""Figures of the attacks that are not fine-tuning curves, and of the whole grid.

* :func:`plot_probe`: held-out probe accuracy against layer, one line per model;
* :func:`plot_in_context`: accuracy against the number of demonstrations, one line per model;
* :func:`plot_grid`: the methods x attacks grid as grouped bars (one group per attack).

The filtered twin is drawn green and dotted, the base model black and dashed (as in the curve
plots of :mod:`unlearning.reporting.plots`), chance gray. Matplotlib's Agg backend through the
object-oriented API: nothing needs a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unlearning.attacks.curves import CHANCE
from unlearning.attacks.tamper import short_model_name
from unlearning.reporting.figures import new_figure, save_png
from unlearning.reporting.plots import CURVE_COLORS, REFERENCE_STYLES, task_label

ROLE_STYLES = {"filtered": REFERENCE_STYLES["filtered"], "base": REFERENCE_STYLES["base"]}
ROLE_SUFFIX = {"model": "", "filtered": " (filtered twin)", "base": " (base)"}


def _lines(ax: Any, records: list[dict[str, Any]], xy: Any) -> None:
    colors = iter(CURVE_COLORS * 8)
    for r in records:
        xs, ys = xy(r)
        style = ROLE_STYLES.get(r["role"]) or {"color": next(colors), "linestyle": "-", "linewidth": 1.5}
        ax.plot(xs, ys, marker="o", markersize=3.5, label=short_model_name(r["model"]) + ROLE_SUFFIX[r["role"]],
                **style)
    ax.axhline(CHANCE, color="gray", linestyle="-.", linewidth=1, label=f"chance ({CHANCE:g})")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_probe(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Probe records (attack.json contents) -> held-out accuracy per layer."""
    done = [r for r in records if r["status"] == "complete"]
    if not done:
        raise ValueError("plot_probe: no complete probe")
    fig = new_figure(7.0, 4.8)
    ax = fig.subplots()
    _lines(ax, done, lambda r: ([int(k) for k in r["result"]["layers"]],
                                [v["test_acc"] for v in r["result"]["layers"].values()]))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("probe accuracy, held-out entities")
    ax.set_title(f"Latent probe on {task_label(done[0]['task'])}: is the answer readable per layer?", fontsize=10)
    return save_png(fig, path)


def plot_in_context(records: list[dict[str, Any]], path: str | Path) -> Path:
    """In-context records -> accuracy against k."""
    done = [r for r in records if r["result"].get("points")]
    if not done:
        raise ValueError("plot_in_context: no in-context point")
    fig = new_figure(7.0, 4.8)
    ax = fig.subplots()
    _lines(ax, done, lambda r: ([p["k"] for p in r["result"]["points"]], [p["acc"] for p in r["result"]["points"]]))
    ax.set_xlabel("demonstrations about other entities (k)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"In-context relearning on {task_label(done[0]['task'])}", fontsize=10)
    return save_png(fig, path)


def plot_grid(grid: dict[str, Any], path: str | Path, *, title: str | None = None) -> Path:
    """The grid (:func:`unlearning.attacks.grid.attack_grid`) as grouped bars: per attack, one bar per model."""
    columns = ["no attack", *grid["columns"]]
    rows = grid["rows"]
    if not rows:
        raise ValueError("plot_grid: no rows")
    fig = new_figure(max(7.0, 0.45 * len(columns) * max(2, len(rows))), 5.2)
    ax = fig.subplots()
    width = 0.8 / len(rows)
    colors = iter(CURVE_COLORS * 8)
    for i, row in enumerate(rows):
        values = [row["no_attack"], *(row["values"].get(c) for c in grid["columns"])]
        xs = [j + (i - (len(rows) - 1) / 2) * width for j, v in enumerate(values) if v is not None]
        color = {"filtered": "tab:green", "base": "black"}.get(row["role"]) or next(colors)
        ax.bar(xs, [v for v in values if v is not None], width, color=color,
               label=short_model_name(row["model"]) + ROLE_SUFFIX[row["role"]])
    ax.axhline(CHANCE, color="gray", linestyle="-.", linewidth=1, label=f"chance ({CHANCE:g})")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel(f"{task_label(grid['task'])} accuracy (fine-tuning: highest after step 0)")
    ax.set_title(title or "Methods x attacks: accuracy after each attack", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)
