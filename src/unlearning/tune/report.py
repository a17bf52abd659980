"""A study's Pareto set as Markdown (``pareto.md``) and a figure (``pareto.png``) in its folder.

The front is Optuna's (``study.best_trials``: the trials no other complete trial dominates). The
base model and the filtered twin are read from the trial that evaluated them (``results.json``'s
``before`` and ``reference``); a trial enqueued from the config's own values (``--enqueue-base``) is
marked, and the report says whether it is on the front and which trials dominate it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unlearning.attacks.curves import CHANCE
from unlearning.core.io import atomic_write_text, read_json
from unlearning.reporting.pareto import Point, dominates, tradeoff_plot
from unlearning.reporting.tables import format_table, short_task


def trial_source(t: Any) -> str:
    if t.user_attrs.get("seeded_from"):
        return f"sweep row {Path(t.user_attrs['seeded_from']).name}"
    if t.user_attrs.get("base_config"):
        return "base config"
    run_dir = t.user_attrs.get("run_dir")
    return Path(run_dir).name if run_dir else ""


def _fmt(value: Any) -> Any:
    """A searched value to 4 significant digits (a learning rate of 1.9e-4 stays readable)."""
    return f"{value:.4g}" if isinstance(value, float) else value


def references(trials: list[Any], objectives: list[Any]) -> dict[str, list[float]]:
    """The base model's and the filtered twin's objective values, from the first trial that has them."""
    out: dict[str, list[float]] = {}
    for t in trials:
        path = Path(t.user_attrs.get("run_dir", "")) / "results.json"
        if not path.is_file():
            continue
        results = read_json(path)
        for section, name in (("before", "base model"), ("reference", results.get("reference_model") or "reference")):
            section_results = results.get(section) or {}
            if name in out or not all(o.task in section_results for o in objectives):
                continue
            out[name] = [float(section_results[o.task][o.metric]) for o in objectives]
        if len(out) == 2:
            break
    return out


def write_report(study: Any, ref: Any) -> dict[str, Path]:
    """Write ``pareto.md`` (and ``pareto.png`` when a trial is complete) in the study folder."""
    objectives, params = ref.objectives, ref.params
    directions = [o.direction for o in objectives]
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    front = sorted(study.best_trials, key=lambda t: t.values[0]) if complete else []
    on_front = {t.number for t in front}
    labels = [f"{short_task(o.task)} {o.metric} ({'min' if o.direction == 'minimize' else 'max'})"
              for o in objectives]
    header = ["trial", "source", *[p.key for p in params], *labels]

    def row(t: Any) -> list[Any]:
        return [t.number, trial_source(t), *[_fmt(t.params.get(p.key)) for p in params], *t.values]

    lines = [f"# Study {ref.study}", "",
             f"{len(complete)} complete trials of {len(trials)}; searched: "
             + ", ".join(f"`{p.key}` {p.describe()}" for p in params) + "; objectives: "
             + ", ".join(f"{o.label} {o.direction}" for o in objectives) + f". Storage: `{ref.storage_url}`.", "",
             "## Pareto set", "", format_table(header, [row(t) for t in front]) if front else "(no complete trial)"]
    refs = references(complete, objectives)
    if refs:
        lines += ["", format_table(["reference", *labels], [[name, *values] for name, values in refs.items()])]
    base = [t for t in complete if t.user_attrs.get("base_config")]
    if base:
        b = base[0]
        beaters = [t for t in complete if dominates(t.values, b.values, directions)]
        verdict = (f"The base config (trial {b.number}) is on the Pareto front." if b.number in on_front else
                   f"The base config (trial {b.number}) is not on the Pareto front: it is dominated by trial"
                   f"{'s' if len(beaters) > 1 else ''} {', '.join(str(t.number) for t in beaters)}.")
        lines += ["", verdict]
    rows = [[t.number, t.state.name.lower(), "yes" if t.number in on_front else "", trial_source(t),
             *[_fmt(t.params.get(p.key)) for p in params],
             *(t.values if t.values else [None] * len(objectives)), t.user_attrs.get("error", "")] for t in trials]
    lines += ["", "## All trials", "", format_table(["trial", "state", "front", "source", *[p.key for p in params],
                                                      *labels, "error"], rows)]
    out = {"table": atomic_write_text(ref.folder / "pareto.md", "\n".join(lines) + "\n")}
    if complete:
        out["plot"] = plot(complete, on_front, refs, ref)
    return out


def plot(complete: list[Any], on_front: set[int], refs: dict[str, list[float]], ref: Any) -> Path:
    """Hazard (x) against general (y) when the objectives have those roles, else the first two
    objectives; one objective: its value against the trial number."""
    objectives = ref.objectives
    roles = {o.role: i for i, o in reversed(list(enumerate(objectives))) if o.role}
    if len(objectives) == 1:
        def xy(values: list[float], number: int) -> tuple[float, float]:
            return float(number), values[0]
        xlabel, yi = "trial", 0
    else:
        # hazard across and general up, as the report's figure draws them
        xi = roles.get("hazard", 0)
        yi = roles.get("general", 1 if xi == 0 else 0)

        def xy(values: list[float], number: int) -> tuple[float, float]:
            return values[xi], values[yi]
        xlabel = f"{objectives[xi].label} ({objectives[xi].direction})"
    points = [Point(*xy(t.values, t.number), label=str(t.number), front=t.number in on_front,
                    highlight="base config" if t.user_attrs.get("base_config") else None) for t in complete]
    references_xy = {} if len(objectives) == 1 else {name: xy(v, 0) for name, v in refs.items()}
    y_obj = objectives[yi]
    return tradeoff_plot(points, ref.folder / "pareto.png", xlabel=xlabel,
                         ylabel=f"{y_obj.label} ({y_obj.direction})",
                         title=f"Study {ref.study}: {len(complete)} trials, Pareto front"
                               f"{f' (over all {len(objectives)} objectives)' if len(objectives) > 2 else ''} in red",
                         references=references_xy, chance_y=CHANCE if y_obj.metric == "acc" else None,
                         chance_x=CHANCE if len(objectives) > 1 and objectives[xi].metric == "acc" else None,
                         connect_front=len(objectives) == 2)
