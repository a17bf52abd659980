"""Pareto fronts and trade-off figures: one point per run (hazard against general accuracy, say),
the Pareto front marked, reference points (the base model, the filtered twin) and chance drawn.

The one place for both: the report's tables mark their rows with :func:`pareto_front`, an Optuna
study takes its front from ``best_trials`` and says which trials beat the base config with
:func:`dominates`, and both draw with :func:`tradeoff_plot` (through :mod:`unlearning.reporting.figures`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from unlearning.reporting.figures import new_figure, save_png


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """``a`` is at least as good as ``b`` in every objective and better in one (``directions``:
    "minimize" or "maximize" per objective)."""
    better = [(x - y) if d == "maximize" else (y - x) for x, y, d in zip(a, b, directions)]
    return all(v >= 0 for v in better) and any(v > 0 for v in better)


def pareto_front(points: Sequence[Sequence[float | None]], directions: Sequence[str]) -> list[bool]:
    """Which points no other point dominates; a point missing a value is never on the front."""
    whole = [all(v is not None for v in p) for p in points]
    return [ok and not any(j != i and whole[j] and dominates(points[j], p, directions) for j in range(len(points)))
            for i, (p, ok) in enumerate(zip(points, whole))]


@dataclass
class Point:
    x: float
    y: float
    label: str
    front: bool = False
    highlight: str | None = None  # a named point (e.g. "base config"): drawn as a star, in the legend


def tradeoff_plot(points: list[Point], path: str | Path, *, xlabel: str, ylabel: str, title: str,
                  references: dict[str, tuple[float, float]] | None = None,
                  chance_x: float | None = None, chance_y: float | None = None, connect_front: bool = True,
                  unit_axes: bool = False, front_label: str = "Pareto front") -> Path:
    """Write the figure as a PNG at ``path`` (atomically). ``references``: name -> (x, y);
    ``chance_x`` / ``chance_y``: a dash-dot line at chance on that axis; ``unit_axes``: both axes
    0..1 (accuracies), so two figures compare at a glance."""
    if not points:
        raise ValueError("tradeoff_plot: no points to draw")
    fig = new_figure(7.0, 5.6)
    ax = fig.subplots()
    rest = [p for p in points if not p.front]
    front = sorted((p for p in points if p.front), key=lambda p: p.x)
    ax.scatter([p.x for p in rest], [p.y for p in rest], s=28, color="0.6", label="trial", zorder=2)
    ax.scatter([p.x for p in front], [p.y for p in front], s=48, color="tab:red", label=front_label, zorder=3)
    if connect_front and len(front) > 1:
        ax.plot([p.x for p in front], [p.y for p in front], color="tab:red", linewidth=1, alpha=0.6, zorder=2)
    for p in (points if len(points) <= 40 else front):  # beyond 40 labels hide the points
        ax.annotate(p.label, (p.x, p.y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for p in points:
        if p.highlight:
            ax.scatter([p.x], [p.y], marker="*", s=220, facecolor="none", edgecolor="black", linewidth=1.2,
                       label=f"{p.highlight} ({p.label})", zorder=4)
    markers = iter(["s", "D", "^", "v", "P"])
    for name, (x, y) in (references or {}).items():
        ax.scatter([x], [y], marker=next(markers, "o"), s=70, color="tab:blue", edgecolor="black",
                   label=f"{name}: ({x:.3f}, {y:.3f})", zorder=4)
    if chance_y is not None:
        ax.axhline(chance_y, color="gray", linestyle="-.", linewidth=1, label=f"chance ({chance_y:g})")
    if chance_x is not None:
        ax.axvline(chance_x, color="gray", linestyle="-.", linewidth=1,
                   label=None if chance_x == chance_y else f"chance ({chance_x:g})")
    if unit_axes:
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return save_png(fig, path)
