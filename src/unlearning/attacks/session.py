"""Running an attack grid's cells (:mod:`unlearning.attacks.cells`) into a run directory.

Every rank runs every cell: under torchrun a fine-tuning attack trains with DDP (or sharded by
FSDP2 under ``attack.parallel: fsdp``, its evaluations then every question on every rank), and
every other evaluation (a reference, the probe's features, the in-context prompts) is scored a
shard per rank of a replicated model, so a rank that skipped one would leave the others waiting. Files are written by
rank 0 only (the attack modules and :class:`~unlearning.core.rundir.RunDir` write on the main
process); the report is assembled there too
(:func:`unlearning.reporting.attack_report.grid_report`).

Plain evaluations are shared: one per (model, evaluation settings) is a fine-tuning attack's
reference (base, filtered twin), another attack's step 0 and a grid row's no-attack accuracy.
They are kept in ``references.json``, so ``--resume`` does not redo them.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import Any

import torch

from unlearning.attacks.cells import AttackGridConfig, Cell, reference_models
from unlearning.attacks.curves import point_metric
from unlearning.attacks.in_context import run_in_context
from unlearning.attacks.probe import run_probe
from unlearning.attacks.record import read_record
from unlearning.attacks.tamper import AttackConfig, evaluation_point, run_attack
from unlearning.core.config import to_dict
from unlearning.core.io import read_json
from unlearning.core.rundir import RunDir
from unlearning.core.runtime import resolve_device
from unlearning.model.loading import load_model

log = logging.getLogger(__name__)

REFERENCES_FILE = "references.json"


@dataclass
class GridRun:
    """What running the cells gave: the fine-tuning curves (``tamper.json`` contents, each with its
    ``path``), every cell's ``attack.json`` in cell order, and every grid row as model ->
    ``{"role", "no_attack"}`` (the base model has a row although fine-tuning never attacks it)."""
    cells: list[Cell]
    curves: list[dict[str, Any]]
    records: list[dict[str, Any]]
    rows: dict[str, dict[str, Any]]

    @property
    def task(self) -> str:
        """The task every headline number is on (the grid's first)."""
        return self.cells[0].attack.tasks[0]

    @property
    def roles(self) -> dict[str, str]:
        return {c.attack.model: c.role for c in self.cells}

    @property
    def complete(self) -> bool:
        return all(r["status"] == "complete" for r in self.records)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluate_model(name: str, cfg: AttackConfig) -> dict[str, Any]:
    """One plain evaluation (fp32 weights, as an attack's step 0) of ``name`` with ``cfg``'s tasks."""
    device = resolve_device(cfg.device)
    model, tokenizer = load_model(name, dtype=torch.float32, device=str(device))
    point = evaluation_point(model, tokenizer, cfg, device)
    del model
    free_memory()
    return point


def eval_key(model: str, revision: str | None, cfg: AttackConfig) -> str:
    """One evaluation per model, revision and evaluation settings (the batch size changes no number)."""
    settings = {k: v for k, v in to_dict(cfg.eval).items() if k not in ("tasks", "batch_size") and v is not None}
    return f"{model}@{revision or ''}|{','.join(cfg.tasks)}|{cfg.eval.limit}" + "".join(
        f"|{k}={v}" for k, v in sorted(settings.items()) if k != "limit")


class PlainEvaluations:
    """The grid's plain evaluations by :func:`eval_key`, read back from ``references.json`` on resume."""

    def __init__(self, rundir: RunDir, resume: bool):
        self.rundir = rundir
        path = rundir.file(REFERENCES_FILE)
        self.evals: dict[str, Any] = read_json(path) if resume and path.exists() else {}

    def get(self, model: str, cfg: AttackConfig, what: str) -> dict[str, Any]:
        """``model``'s evaluation with ``cfg``'s settings, made (and written) when missing or failed."""
        key = eval_key(model, None, cfg)
        if key not in self.evals or "error" in self.evals[key]:
            log.info("evaluating the %s %s", what, model)
            self.evals[key] = evaluate_model(model, cfg)
            self.rundir.write_json(REFERENCES_FILE, self.evals)
        return self.evals[key]


def _finetune(cell: Cell, grid: AttackGridConfig, rundir: RunDir, evals: PlainEvaluations, *, resume: bool,
              keep_state: bool) -> dict[str, Any]:
    """One fine-tuning cell: its references evaluated first, a shared step 0 reused when there is one."""
    cfg, folder = cell.attack, rundir.file("attacks") / cell.name
    refs = {kind: {"model": model, **evals.get(model, cfg, f"{kind} reference")}
            for kind, model in reference_models(grid, cfg.model, cfg.organism).items()}
    own = eval_key(cfg.model, cfg.revision, cfg)
    step0 = evals.evals.get(own)
    curve = run_attack(cfg, folder, name=cell.name, references=refs, resume=resume, keep_state=keep_state,
                       role=cell.role, step0=step0 if step0 and "error" not in step0 else None)
    # The attack's own step 0 is this model's plain evaluation: the next attack on it starts from it
    # (kept in memory; references.json takes it with the next evaluation written).
    if curve["points"] and curve["points"][0]["step"] == 0 and own not in evals.evals:
        evals.evals[own] = {k: v for k, v in curve["points"][0].items() if k in ("eval", "error")}
    curve["path"] = str(folder / "tamper.json")
    return curve


def no_attack_rows(grid: AttackGridConfig, cells: list[Cell], evals: PlainEvaluations) -> dict[str, dict[str, Any]]:
    """Every row's plain accuracy on the grid's task (the base: the ceiling, evaluated but not fine-tuned)."""
    roles = {c.attack.model: c.role for c in cells}
    task = cells[0].attack.tasks[0]
    rows: dict[str, dict[str, Any]] = {}
    for cell in cells:
        bases = [m for k, m in reference_models(grid, cell.attack.model, cell.attack.organism).items() if k == "base"]
        for model, role in [(cell.attack.model, cell.role)] + [(m, "base") for m in bases]:
            if model not in rows:
                acc = point_metric(evals.get(model, cell.attack, "model"), task)
                rows[model] = {"role": roles.get(model, role), "no_attack": acc}
    return rows


def run_cells(grid: AttackGridConfig, cells: list[Cell], rundir: RunDir, *, resume: bool = False,
              keep_state: bool = False) -> GridRun:
    """Run every cell in order into ``rundir/attacks/<cell>/`` (on every rank), then each row's plain
    evaluation. ``resume``: cells complete with the same settings are read back, not redone."""
    evals = PlainEvaluations(rundir, resume)
    curves, records = [], []
    for cell in cells:
        folder = rundir.file("attacks") / cell.name
        if cell.kind == "probe":
            records.append(run_probe(cell.attack, grid.probe, folder, name=cell.name, role=cell.role, resume=resume))
        elif cell.kind == "in_context":
            records.append(run_in_context(cell.attack, grid.icl, folder, name=cell.name, role=cell.role,
                                          resume=resume))
        else:
            curves.append(_finetune(cell, grid, rundir, evals, resume=resume, keep_state=keep_state))
            records.append(read_record(folder))
        free_memory()
    return GridRun(cells, curves, records, no_attack_rows(grid, cells, evals))
