"""Tamper curves: the ``tamper.json`` file an attack (:mod:`unlearning.attacks.tamper`) writes, reading it
back, and the summary numbers of a curve.

The curve file ``tamper.json`` (written atomically after every evaluation)::

    {"format": "unlearning.attacks.tamper/1", "name", "model", "config": {...}, "status": running|complete|failed,
     "error": str|null, "primary_task", "references": {"base"|"filtered": {"model", "eval"|"error"}},
     "train_losses": [loss of optimizer step 1, 2, ...],
     "points": [{"step", "train_loss" (mean since the previous point; null at 0),
                 "lr" (the rate the last step used; null at 0),
                 "eval": {task: {"acc", "acc_stderr", "correct_prob", ...}} | "error": "..."}]}

Summary numbers (:func:`summarize_curve`), on the primary task's accuracy ``a(s)``:

* ``gap = base_acc - a(0)``: what unlearning removed (needs the base model's accuracy);
* ``half_gap_step``: the first *evaluated* step with ``a(s) >= a(0) + gap / 2`` (so it is exact
  only to the evaluation interval); ``None`` when never reached or when there is no gap;
* ``recovery_auc``: the area under ``r(s) = (a(s) - a(0)) / gap`` over ``[0, last step]``
  (trapezoids), divided by the last step: 0 = nothing came back, 1 = everything came back at
  once. Not clipped, so overshooting the base model gives values above 1;
* ``mean_acc``: the same area under ``a(s)`` itself (the curve's average accuracy), comparable
  across models whatever their gap;
* ``max_acc`` / ``max_acc_step``: the highest accuracy after step 0 (the recovered accuracy that
  names the strongest attack of a sweep).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unlearning.core.errors import DataError
from unlearning.core.io import read_json

CURVE_FORMAT = "unlearning.attacks.tamper/1"
CHANCE = 0.25  # four choices
KEPT_METRICS = ("acc", "acc_stderr", "acc_norm", "correct_prob", "correct_prob_stderr", "n")


def data_label(source: str) -> str:
    """An attack corpus as tables and plots name it: ``benign``, ``tamper``, or a file's name."""
    if source.startswith("organism:"):
        corpus = source.split(":", 1)[1]
        return "benign" if corpus == "benign_tamper" else corpus
    return Path(source).name or source


def compact_eval(results: dict[str, Any]) -> dict[str, Any]:
    """The per-task numbers a curve keeps (no per-attribute breakdown, no samples)."""
    return {task: {k: r[k] for k in KEPT_METRICS if k in r} for task, r in results.items()}


def point_metric(point: dict[str, Any], task: str, metric: str = "acc") -> float | None:
    value = (point.get("eval") or {}).get(task, {}).get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def read_curve(path: str | Path) -> dict[str, Any]:
    """A tamper.json file, checked for the fields plots and summaries read."""
    path = Path(path)
    if path.is_dir():
        path = path / "tamper.json"
    if not path.is_file():
        raise DataError(f"{path}: no tamper.json here; pass a tamper.json file or the attack folder holding one")
    curve = read_json(path)
    missing = [k for k in ("format", "config", "points", "primary_task", "status") if k not in curve]
    if missing or curve["format"] != CURVE_FORMAT:
        raise DataError(f"{path}: not a tamper curve file (format {curve.get('format')!r}, missing {missing})")
    curve["path"] = str(path)
    return curve


# ----------------------------------------------------------------------------- summaries

def _trapezoid_mean(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 2 or xs[-1] == xs[0]:
        return None
    area = sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1))
    return area / (xs[-1] - xs[0])


def summarize_curve(points: list[dict[str, Any]], task: str, base_acc: float | None) -> dict[str, Any]:
    """Recovery numbers of one curve (see the module docstring for the definitions)."""
    good = sorted((p for p in points if "eval" in p and point_metric(p, task) is not None), key=lambda p: p["step"])
    steps = [p["step"] for p in good]
    accs = [point_metric(p, task) for p in good]
    out: dict[str, Any] = {
        "task": task, "acc_by_step": {str(s): a for s, a in zip(steps, accs)},
        "correct_prob_by_step": {str(p["step"]): point_metric(p, task, "correct_prob") for p in good},
        "failed_steps": [p["step"] for p in points if "error" in p],
        "base_acc": base_acc, "step0_acc": None, "final_acc": None, "max_acc": None, "max_acc_step": None,
        "gap": None, "half_gap_step": None, "recovery_auc": None, "mean_acc": _trapezoid_mean(steps, accs)}
    if not good or steps[0] != 0:
        return out
    a0 = accs[0]
    out.update(step0_acc=a0, final_acc=accs[-1])
    if len(accs) > 1:  # the highest accuracy the fine-tuning reached (step 0 is before any)
        best = max(range(1, len(accs)), key=lambda i: accs[i])
        out.update(max_acc=accs[best], max_acc_step=steps[best])
    if base_acc is None:
        return out
    gap = base_acc - a0
    out["gap"] = gap
    if gap <= 0:
        return out
    out["half_gap_step"] = next((s for s, a in zip(steps, accs) if a >= a0 + gap / 2), None)
    out["recovery_auc"] = _trapezoid_mean(steps, [(a - a0) / gap for a in accs])
    return out


def reference_acc(references: dict[str, Any], kind: str, task: str, metric: str = "acc") -> float | None:
    ref = (references or {}).get(kind) or {}
    return point_metric(ref, task, metric)


def strongest(summaries: dict[str, dict[str, Any]]) -> str | None:
    """The attack with the highest recovered (maximum) accuracy."""
    scored = {k: s["max_acc"] for k, s in summaries.items() if s.get("max_acc") is not None}
    return max(scored, key=scored.get) if scored else None

