"""The methods x attacks grid: every cell's ``attack.json`` headline in one structure.

Rows are models (the models under test first, then the filtered twin attacked the same way, then
the base model), columns are attacks, a value is the attack's headline number (see
:mod:`unlearning.attacks.record`); ``no_attack`` is each model's plain accuracy on the task. The
structure is what ``results.json``'s ``grid`` holds (and a results store can read)::

    {"task", "columns": [column label, ...],
     "rows": [{"model", "role", "no_attack", "values": {column: value}, "cells": {column: cell name},
               "notes": {column: note}}]}

A fine-tuning column is "<full|loraR> <data> lr <lr>" (plus what else varies between the grid's
fine-tuning attacks: seed, schedule, optimizer, dtype, steps); a probe's is "probe (best layer)";
an in-context attack has one column per k ("in-context k=4"). A note marks an in-context point
whose prompts exceed the organism's pretraining length.
"""

from __future__ import annotations

from typing import Any

from unlearning.attacks.curves import data_label

ROLE_ORDER = {"model": 0, "filtered": 1, "base": 2}
PROBE_COLUMN = "probe (best layer)"
# (name in a label, value of a fine-tuning config) for the settings that get a label part when they vary
EXTRA_FIELDS = (("seed", lambda c: str(c["seed"])), ("sched", lambda c: c["optimizer"]["schedule"]),
                ("opt", lambda c: c["optimizer"]["name"]), ("dtype", lambda c: c["dtype"]),
                ("steps", lambda c: str(c["steps"])))


def finetune_kind(config: dict[str, Any]) -> str:
    return f"lora{config['lora_rank']}" if config["lora_rank"] else "full"


def _finetune_labels(records: list[dict[str, Any]]) -> list[str]:
    configs = [r["config"] for r in records]
    varying = [(k, f) for k, f in EXTRA_FIELDS if len({f(c) for c in configs}) > 1]
    return [" ".join([finetune_kind(c), data_label(c["data"]["source"]), f"lr {c['optimizer']['lr']:g}"]
                     + [f"{k} {f(c)}" for k, f in varying]) for c in configs]


def _columns_of(record: dict[str, Any], finetune_label: str | None) -> list[tuple[str, Any, str | None]]:
    """(column, value, note) of one record."""
    kind = record["kind"]
    if kind == "finetune":
        return [(finetune_label or "", record["headline"]["value"], None)]
    seed = record["seed"]
    suffix = "" if seed == 0 else f" seed {seed}"
    if kind == "probe":
        best = record["result"].get("best_layer")
        return [(PROBE_COLUMN + suffix, record["headline"]["value"], None if best is None else f"layer {best}")]
    trained = record["result"].get("pretrain_seq_len")
    return [(f"in-context k={p['k']}{suffix}", p["acc"],
             "longer than pretraining" if trained and p.get("max_prompt_tokens", 0) > trained else None)
            for p in record["result"].get("points", [])]


def attack_grid(records: list[dict[str, Any]], models: dict[str, dict[str, Any]], task: str) -> dict[str, Any]:
    """The grid of ``records`` (attack.json contents); ``models``: model -> {"role", "no_attack"} for
    every row (a model evaluated but not attacked, such as the base under fine-tuning, has a row too)."""
    finetune = [r for r in records if r["kind"] == "finetune"]
    labels = dict(zip(map(id, finetune), _finetune_labels(finetune)))
    columns: list[str] = []
    rows = {m: {"model": m, "role": info["role"], "no_attack": info.get("no_attack"), "values": {}, "cells": {},
                "notes": {}} for m, info in models.items()}
    for r in records:
        row = rows.setdefault(r["model"], {"model": r["model"], "role": r["role"], "no_attack": None, "values": {},
                                           "cells": {}, "notes": {}})
        for column, value, note in _columns_of(r, labels.get(id(r))):
            if column not in columns:
                columns.append(column)
            # a fine-tuning curve that failed keeps the points it reached; other attacks have no number then
            row["values"][column] = value if r["status"] == "complete" or r["kind"] == "finetune" else None
            row["cells"][column] = r["name"]
            if note:
                row["notes"][column] = note
    order = sorted(rows.values(), key=lambda row: ROLE_ORDER[row["role"]])  # stable: first appearance within a role
    return {"task": task, "columns": columns, "rows": order}
