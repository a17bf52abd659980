"""Result tables across run directories, in the notebooks' layout: a baseline row, then one row per run.

Columns are config keys (dotted, read from each run's config.yaml), evaluation metrics
(``task:metric`` from results.json's ``after``), and training metrics at a step
(``train:<metric>@<step>`` from metrics.jsonl; the notebook reports step 32).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from unlearning.core.errors import UserError
from unlearning.core.io import read_json, read_jsonl
from unlearning.reporting.tables import format_table, short_task


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def train_metric(run_dir: Path, metric: str, step: int | None) -> float | None:
    """A metric from metrics.jsonl at ``step`` (the last record at or before it), or the last value."""
    records = [r for r in read_jsonl(run_dir / "metrics.jsonl") if metric in r]
    if step is not None:
        records = [r for r in records if r.get("step", 0) <= step]
    return records[-1][metric] if records else None


def _value(run_dir: Path, results: dict[str, Any], config: dict[str, Any], column: str, section: str) -> Any:
    if column.startswith("train:"):
        name, _, step = column[6:].partition("@")
        return train_metric(run_dir, name, int(step) if step else None)
    if ":" in column:
        task, metric = column.split(":", 1)
        return _get(results.get(section, {}), f"{task}.{metric}") if section in results else None
    return _get(config, column)


def collect(run_dirs: list[str | Path]) -> list[tuple[Path, dict[str, Any], dict[str, Any]]]:
    out = []
    for d in run_dirs:
        d = Path(d)
        if not (d / "results.json").exists():
            raise UserError(f"{d}: no results.json (the run has not finished, or this is not a run directory)")
        config = yaml.safe_load((d / "config.yaml").read_text()) if (d / "config.yaml").exists() else {}
        out.append((d, read_json(d / "results.json"), config or {}))
    return out


def report_table(run_dirs: list[str | Path], columns: list[str], *, baseline: bool = True,
                 reference: bool = True) -> str:
    """One table: baseline (the first run's `before`), each run's `after`, the reference row."""
    runs = collect(run_dirs)
    header = ["run"] + [short_task(c) for c in columns]
    rows: list[list[Any]] = []
    if baseline and runs and "before" in runs[0][1]:
        d, res, cfg = runs[0]
        rows.append(["baseline"] + [None if (":" not in c or c.startswith("train:")) else
                                    _value(d, res, cfg, c, "before") for c in columns])
    for d, res, cfg in runs:
        rows.append([d.name] + [_value(d, res, cfg, c, "after") for c in columns])
    if reference and runs and "reference" in runs[0][1]:
        d, res, cfg = runs[0]
        rows.append([f"reference ({res.get('reference_model', '')})"] +
                    [None if (":" not in c or c.startswith("train:")) else _value(d, res, cfg, c, "reference")
                     for c in columns])
    return format_table(header, rows)
