"""Plain-text tables of results, in the notebooks' layout (a baseline row first)."""

from __future__ import annotations

from typing import Any


def format_table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table; floats to 4 places, missing values as '-'."""
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v)
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
