"""Result tables across run directories, in the notebooks' layout.

Two ways in:

* :func:`store_tables` (``unlearn report``): tables from the results store
  (:mod:`unlearning.core.store`): one per method family (the base model first, one row per run,
  the filtered twin last; columns for the varied keys, the final loss terms, hazard / benign /
  general accuracy, ``correct_prob``, mean ranks and the tamper summary when present, the Pareto
  mark and notes), then one for evaluation-only folders, one for tamper attacks and one for rank
  reports. :func:`compare_tables` puts two runs side by side. :func:`render` writes any of them
  as Markdown, CSV or JSON with the same values (the store's, unrounded, in CSV and JSON).
* :func:`report_table` (``unlearn report --columns``): one table of explicit columns read from the
  folders' files: config keys (dotted, from config.yaml), evaluation metrics (``task:metric``
  from results.json's ``after``) and training metrics at a step (``train:<metric>@<step>`` from
  metrics.jsonl; the notebook reports step 32).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from unlearning.attacks.curves import read_curve
from unlearning.core.errors import UserError
from unlearning.core.io import dumps_json, read_json, read_jsonl
from unlearning.core.rundir import flatten
from unlearning.core.store import Store
from unlearning.reporting.pareto import pareto_front
from unlearning.reporting.plots import plot_curves, plot_hazard_vs_general, plot_training_curves
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


# ------------------------------------------------------------------------------ tables from the store

# Which task stands for each role, first present wins: the organism's question format (its
# headline), its letter format, then the real benchmarks.
ROLE_TASKS = {
    "hazard": ("organism_hazard_cloze", "organism_hazard", "wmdp_bio_robust", "wmdp_bio", "wmdp_bio_cloze",
               "wmdp_bio_cloze_verified"),
    "benign": ("organism_benign_bio_cloze", "organism_benign_bio"),
    "general": ("organism_general_cloze", "organism_general", "mmlu", "mmlu_stem"),
}
# Configuration keys that differ between any two runs and say nothing about the method.
INCIDENTAL_KEYS = ("name", "output_dir", "device", "logging.", "eval.batch_size", "save.")
TERM_COLUMNS = ("forget_loss", "retain_loss")  # the keys every method family logs
TAMPER_COLUMNS = (("tamper gap", "gap"), ("half-gap step", "half_gap_step"), ("recovery AUC", "recovery_auc"))
BENIGN_DATA = "organism:benign_tamper"


@dataclass
class Table:
    """A titled table: ``rows`` hold the store's values (unrounded); ``roles`` names the task behind
    each role column; ``notes`` are lines printed under it."""
    title: str
    columns: list[str]
    rows: list[list[Any]]
    notes: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)  # family tables: base | run | filtered, per row

    def column(self, name: str) -> list[Any]:
        i = self.columns.index(name)
        return [r[i] for r in self.rows]


def role_tasks(records: Iterable[dict[str, Any]], sections: Sequence[str]) -> dict[str, str]:
    """role -> the task that stands for it in these records' ``sections``."""
    present = {t for r in records for s in sections for t in r["metrics"].get(s, {})}
    return {role: next(t for t in tasks if t in present) for role, tasks in ROLE_TASKS.items()
            if any(t in present for t in tasks)}


def _metric(record: dict[str, Any], section: str, task: str | None, metric: str) -> Any:
    return record["metrics"].get(section, {}).get(task, {}).get(metric) if task else None


def varied_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    """The keys the records vary: those their sweep or study recorded; else the config keys whose
    values differ between them (incidental keys such as names and paths left out)."""
    recorded = [k for r in records for k in r["varied"]]
    if recorded:
        return list(dict.fromkeys(recorded))
    if len(records) < 2:
        return []
    flat = [flatten(r["config"]) for r in records]
    keys = dict.fromkeys(k for f in flat for k in f)
    return [k for k in keys if not k.startswith(INCIDENTAL_KEYS)
            and len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flat}) > 1]


def _varied_value(record: dict[str, Any], key: str) -> Any:
    if key in record["varied"]:
        return record["varied"][key]
    value = flatten(record["config"]).get(key)
    return value if isinstance(value, (int, float, str, bool)) or value is None else json.dumps(value)


def strongest_attack(attacks: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The hazard-data attack that brought back the most (benign fine-tuning is a control)."""
    scored = [a for a in attacks if a["data"] != BENIGN_DATA and a["max_acc"] is not None]
    return max(scored, key=lambda a: a["max_acc"]) if scored else None


def _notes(record: dict[str, Any]) -> str:
    parts = []
    if record["status"] != "complete":
        parts.append(record["status"] + (f": {record['error']}" if record["error"] else ""))
    if record["study"] is not None:
        parts.append(f"trial {record['trial']} {record['trial_state'] or ''}".strip())
    return "; ".join(parts)


def family_table(method: str, records: list[dict[str, Any]], attacks: dict[str, list[dict[str, Any]]]) -> Table:
    """One method family: base model row(s), one row per run, filtered-twin row(s); Pareto marked."""
    roles = role_tasks(records, ("after", "before", "reference"))
    keys = varied_keys(records)
    terms = [t for t in TERM_COLUMNS if any(t in r["terms"].get("final", {}) for r in records)]
    ranks = [k for k in ("mean_erank", "mean_srank") if any(r[k] is not None for r in records)]
    tamper = any(strongest_attack(attacks.get(r["run_dir"], [])) for r in records)
    role_cols = [f"{role} acc" for role in roles]
    prob = ["correct_prob"] if "hazard" in roles else []
    columns = (["run", *keys, *terms, *role_cols, *prob, *ranks, *([c for c, _ in TAMPER_COLUMNS] if tamper else []),
                "pareto", "notes"])

    def accuracies(record: dict[str, Any], section: str) -> list[Any]:
        return ([_metric(record, section, roles[role], "acc") for role in roles] +
                ([_metric(record, section, roles["hazard"], "correct_prob")] if prob else []))

    def reference_row(label: str, record: dict[str, Any], section: str) -> list[Any]:
        blank = [None] * (len(keys) + len(terms))
        return [label, *blank, *accuracies(record, section), *[None] * (len(ranks) + (3 if tamper else 0)), False, ""]

    rows: list[list[Any]] = []
    seen: set[str] = set()
    for r in records:  # the base model: one row per model the runs started from
        if r["metrics"].get("before") and r["model"] not in seen:
            seen.add(r["model"])
            rows.append(reference_row(f"base (before): {r['model']}", r, "before"))
    kinds = ["base"] * len(rows) + ["run"] * len(records)
    runs = []
    for r in records:
        strongest = strongest_attack(attacks.get(r["run_dir"], []))
        runs.append([r["run_dir"], *[_varied_value(r, k) for k in keys],
                     *[r["terms"].get("final", {}).get(t) for t in terms], *accuracies(r, "after"),
                     *[r[k] for k in ranks],
                     *([strongest[k] if strongest else None for _, k in TAMPER_COLUMNS] if tamper else []),
                     False, _notes(r)])
    if "hazard" in roles and "general" in roles:
        h, g = columns.index("hazard acc"), columns.index("general acc")
        complete = [r["status"] == "complete" for r in records]
        front = pareto_front([(row[h], row[g]) if ok else (None, None) for row, ok in zip(runs, complete)],
                             ["minimize", "maximize"])  # hazard down, general up
        for row, on in zip(runs, front):
            row[-2] = on
    rows += runs
    seen = set()
    for r in records:  # the filtered twin: "never knew it", last
        if r["metrics"].get("reference") and r["reference_model"] not in seen:
            seen.add(r["reference_model"])
            rows.append(reference_row(f"filtered twin: {r['reference_model']}", r, "reference"))
            kinds.append("filtered")
    notes = [", ".join(f"{role} = {short_task(task)}" for role, task in roles.items()) +
             ("; correct_prob of the hazard task" if prob else "") +
             ("; pareto: lowest hazard for its general accuracy" if "general" in roles and "hazard" in roles else "")]
    if tamper:
        notes.append("tamper: the strongest attack on each run (highest recovered accuracy)")
    return Table(method, columns, rows, [n for n in notes if n], kinds)


def eval_only_table(records: list[dict[str, Any]]) -> Table:
    """Evaluation folders: one row per model evaluated, one column per task's accuracy."""
    tasks = list(dict.fromkeys(t for r in records for t in r["metrics"].get("eval", {})))
    roles = role_tasks(records, ("eval",))
    prob = [roles["hazard"]] if "hazard" in roles else []
    columns = ["run", "model", *[f"{short_task(t)} acc" for t in tasks], *[f"{short_task(t)} correct_prob" for t in prob],
               "notes"]
    rows = [[r["run_dir"], r["model"], *[_metric(r, "eval", t, "acc") for t in tasks],
             *[_metric(r, "eval", t, "correct_prob") for t in prob], _notes(r)] for r in records]
    return Table("evaluations", columns, rows)


ATTACK_TABLE = (("attack", "attack"), ("kind", "kind"), ("model", "model"), ("role", "role"), ("data", "data"),
                ("status", "status"), ("headline", "metric"), ("headline value", "value"), ("step-0 acc", "step0_acc"), ("max acc", "max_acc"), ("at step", "max_acc_step"),
                ("final acc", "final_acc"), ("gap", "gap"), ("half-gap step", "half_gap_step"),
                ("recovery AUC", "recovery_auc"), ("mean acc", "mean_acc"), ("notes", "error"))


def tamper_only_table(records: list[dict[str, Any]]) -> Table:
    """Tamper folders: one row per attack cell (fine-tuning, probe, in-context) with its headline number
    (attack.json's); a fine-tuning attack's recovery summary too (see attacks/curves.py)."""
    rows = [[r["run_dir"], *[a[k] for _, k in ATTACK_TABLE]] for r in records for a in r["attacks"]]
    return Table("tamper attacks", ["run", *[c for c, _ in ATTACK_TABLE]], rows)


def ranks_only_table(records: list[dict[str, Any]]) -> Table:
    return Table("ranks", ["run", "model", "mean_erank", "mean_srank"],
                 [[r["run_dir"], r["model"], r["mean_erank"], r["mean_srank"]] for r in records])


def store_tables(store: Store, records: list[dict[str, Any]]) -> list[Table]:
    """The report of ``records`` (from :meth:`Store.records`): a table per method family (in the
    order they first appear), then evaluations, tamper attacks and rank reports."""
    runs = [r for r in records if r["kind"] == "run"]
    attacks = {r["run_dir"]: store.attacks_on(r["run_dir"]) for r in runs}
    tables = [family_table(m, [r for r in runs if r["method"] == m], attacks)
              for m in dict.fromkeys(r["method"] for r in runs)]
    for kind, make in (("eval", eval_only_table), ("tamper", tamper_only_table), ("ranks", ranks_only_table)):
        chosen = [r for r in records if r["kind"] == kind]
        if chosen:
            tables.append(make(chosen))
    return tables


def compare_tables(a: dict[str, Any], b: dict[str, Any]) -> list[Table]:
    """Two runs side by side: the config keys that differ, then every result either has."""
    fa, fb = flatten(a["config"]), flatten(b["config"])
    differ = [k for k in dict.fromkeys([*fa, *fb]) if k not in ("name", "output_dir") and
              json.dumps(fa.get(k), default=str) != json.dumps(fb.get(k), default=str)]
    def cell(v: Any) -> Any:
        return v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v, default=str)
    config = Table("config differences", ["key", a["run_dir"], b["run_dir"]],
                   [[k, cell(fa.get(k)), cell(fb.get(k))] for k in differ])
    rows: list[list[Any]] = [["status", a["status"], b["status"]]]
    for section in ("before", "after", "reference", "eval"):
        tasks = dict.fromkeys([*a["metrics"].get(section, {}), *b["metrics"].get(section, {})])
        for task in tasks:
            for metric in ("acc", "correct_prob"):
                va, vb = _metric(a, section, task, metric), _metric(b, section, task, metric)
                if va is not None or vb is not None:
                    rows.append([f"{section} {short_task(task)} {metric}", va, vb])
    for key in dict.fromkeys([*a["terms"].get("final", {}), *b["terms"].get("final", {})]):
        rows.append([f"final {key}", a["terms"].get("final", {}).get(key), b["terms"].get("final", {}).get(key)])
    for key in ("mean_erank", "mean_srank"):
        if a[key] is not None or b[key] is not None:
            rows.append([key, a[key], b[key]])
    return [config, Table("results", ["result", a["run_dir"], b["run_dir"]], rows)]


# ----------------------------------------------------------------------------------------- rendering

def _md_cell(v: Any) -> Any:
    return ("*" if v else "") if isinstance(v, bool) else v


def render(tables: Sequence[Table], fmt: str) -> str:
    """Markdown (floats to 4 places, Pareto rows marked ``*``), CSV (one file: a ``table`` column
    then the union of the tables' columns; numbers unrounded) or JSON (``{"tables": [{"title",
    "columns", "rows": [{column: value}], "notes"}]}``)."""
    if fmt == "md":
        parts = []
        for t in tables:
            body = format_table(t.columns, [[_md_cell(v) for v in row] for row in t.rows]) if t.rows else "(no rows)"
            parts.append("\n".join([f"## {t.title}", "", body, *([""] + t.notes if t.notes else [])]))
        return "\n\n".join(parts) + "\n"
    if fmt == "csv":
        columns = list(dict.fromkeys(c for t in tables for c in t.columns))
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["table", *columns])
        for t in tables:
            for row in t.rows:
                values = dict(zip(t.columns, row))
                writer.writerow([t.title, *["" if values.get(c) is None else values[c] for c in columns]])
        return buf.getvalue()
    if fmt == "json":
        return dumps_json({"tables": [{"title": t.title, "columns": t.columns, "notes": t.notes,
                                       "rows": [dict(zip(t.columns, row)) for row in t.rows]} for t in tables]}) + "\n"
    raise UserError(f"format: {fmt!r} is not known; choose md, csv or json")


# --------------------------------------------------------------------------------------------- plots

def hazard_general_points(table: Table) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A family table's runs and references as points for :func:`plot_hazard_vs_general`."""
    h, g, p = table.columns.index("hazard acc"), table.columns.index("general acc"), table.columns.index("pareto")
    runs, refs = [], []
    for kind, row in zip(table.kinds, table.rows):
        if kind == "run":
            runs.append({"label": Path(row[0]).name, "hazard": row[h], "general": row[g], "pareto": row[p]})
        else:
            refs.append({"kind": kind, "label": row[0].split(": ", 1)[-1], "hazard": row[h], "general": row[g]})
    return runs, refs


def write_plots(store: Store, tables: Sequence[Table], records: Sequence[dict[str, Any]], folder: Path,
                *, title: str | None = None) -> list[Path]:
    """Beside the table: hazard against general per method family, and the tamper curves of the
    chosen runs (every attack on them, and every attack a chosen tamper folder ran) on one figure."""
    written = []
    families = [t for t in tables if t.kinds and {"hazard acc", "general acc"} <= set(t.columns)]
    for t in families:
        runs, refs = hazard_general_points(t)
        if any(r["hazard"] is not None and r["general"] is not None for r in runs):
            name = "hazard_vs_general.png" if len(families) == 1 else f"hazard_vs_general_{t.title}.png"
            tasks = role_tasks(records, ("after",))
            written.append(plot_hazard_vs_general(runs, folder / name, references=refs, hazard_task=tasks["hazard"],
                                                  general_task=tasks["general"],
                                                  title=f"{title or 'report'}: {t.title}"))
    attacks = [a for r in records if r["kind"] == "run" for a in store.attacks_on(r["run_dir"])]
    attacks += [a for r in records if r["kind"] == "tamper" for a in r["attacks"]]
    curve_files = list(dict.fromkeys(store.root / a["run_dir"] / "attacks" / a["attack"] / "tamper.json"
                                     for a in attacks))
    curves = [read_curve(f) for f in curve_files if f.is_file()]
    if curves:
        written.append(plot_curves(curves, folder / "tamper.png"))
    return written


def write_training_curves(run_dir: str | Path) -> Path:
    """``training.png`` in a run directory, from its metrics.jsonl."""
    run_dir = Path(run_dir)
    return plot_training_curves(read_jsonl(run_dir / "metrics.jsonl"), run_dir / "training.png",
                                title=f"training curves: {run_dir.name}")
