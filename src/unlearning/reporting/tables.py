"""Every table the project prints, as Markdown through one formatter (:func:`format_table`):
results before/after unlearning (a baseline row first, the notebooks' layout), ``unlearn eval``'s
per-task table and the organism build's quality table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from unlearning.organism.build import FORMATS, TWINS
from unlearning.organism.world import DOMAINS

EVAL_HEADER = ["task", "format", "n", "acc", "±", "acc_norm", "correct_prob"]


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 4) -> str:
    """A Markdown table; floats to ``digits`` places, missing values as '-'."""
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.{digits}f}"
        return str(v)
    header = [str(h) for h in header]
    cells = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def short_task(name: str) -> str:
    return name.removeprefix("organism_")


def results_table(results: dict[str, Any], metrics: tuple[str, ...] = ("acc", "correct_prob")) -> str:
    """Rows: before (the base model), after, reference; columns: task metrics."""
    labels = {"before": "base (before)", "after": "unlearned (after)",
              "reference": f"reference ({results.get('reference_model', 'filtered twin')})"}
    present = [k for k in ("before", "after", "reference") if k in results]
    if not present:
        return "(no results)"
    tasks = list(results[present[0]].keys())
    header, keys = ["model"], []
    for t in tasks:
        for m in metrics:
            if any(m in results[k].get(t, {}) for k in present):
                header.append(f"{short_task(t)} {m}")
                keys.append((t, m))
    rows = [[labels[k]] + [results[k].get(t, {}).get(m) for t, m in keys] for k in present]
    return format_table(header, rows)


def eval_table(results: dict[str, dict[str, Any]]) -> str:
    """``unlearn eval``'s table: one row per task (groups last): n, acc ± stderr, acc_norm, correct_prob."""
    ordered = sorted(results.items(), key=lambda kv: "subtasks" in kv[1])
    rows = [[name, r["format"], r["n"], r.get("acc"), r.get("acc_stderr"), r.get("acc_norm"), r.get("correct_prob")]
            for name, r in ordered]
    return format_table(EVAL_HEADER, rows)


def quality_table(quality: dict[str, Any]) -> str:
    """The organism build's quality: one row per model (twins, then checkpoints), held-out accuracy per
    domain and format."""
    models = [(t, quality[t]) for t in TWINS] + [(f"@{r}", q) for r, q in quality["checkpoints"].items()]
    rows = [[name, *[q["heldout"][d][f]["acc"] for d in DOMAINS for f in FORMATS]] for name, q in models]
    table = format_table(["model", *[f"{d}/{f}" for d in DOMAINS for f in FORMATS]], rows, digits=3)
    return (f"{table}\nheld-out entities; cloze = question format (headline), letter = A-D format; "
            f"early checkpoint: {quality['early_checkpoint']}")


GRID_ROLES = {"model": "under test", "filtered": "filtered twin (floor)", "base": "base (ceiling)"}


def attack_grid_table(grid: dict[str, Any], model_name: Any = str) -> str:
    """The methods x attacks table (:func:`unlearning.attacks.grid.attack_grid`): one row per model,
    its plain accuracy, then each attack's headline; a cell's note follows its value."""
    def cell(row: dict[str, Any], column: str) -> Any:
        value, note = row["values"].get(column), row["notes"].get(column)
        if value is None or note is None:
            return value
        return f"{value:.4f} ({note})"
    rows = [[model_name(r["model"]), GRID_ROLES.get(r["role"], r["role"]), r["no_attack"],
             *(cell(r, c) for c in grid["columns"])] for r in grid["rows"]]
    return format_table([f"Model ({short_task(grid['task'])} acc)", "role", "no attack", *grid["columns"]], rows)
