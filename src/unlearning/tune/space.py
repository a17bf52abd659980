"""What a study searches and what it optimises, read from ``--over`` and ``--objective``.

``--over`` is a comma-separated list of ``KEY=SPEC``, one per run-config key:

* ``KEY=LOW:HIGH`` a uniform range, ``KEY=LOW:HIGH:log`` a log-uniform one: an integer key
  (``sequential.steps_per_layer``) draws integers, a number key floats; the key's type decides, so
  ``sequential.remove_coef=1:100:log`` is a float range though its bounds are written as integers;
* ``KEY=A|B|C`` one of the values (read as YAML: ``5|.inf``, ``adamw|muon``, ``true|false``).

Every key must be a key of the run config (the selected method's section for method keys) and
every bound a value the key accepts; :func:`check_space` builds the configs at the corners of the
space so a bad bound fails here, before any trial runs.

Objectives are ``TASK:METRIC:min|max`` on the run's ``after`` results. By default they are read off
the config's evaluation tasks: minimise the hazard task's accuracy, maximise the general task's
and the benign one's (:func:`task_role` names the role of a result key, organism or WMDP/MMLU).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from unlearning.core.cli import Key, walk
from unlearning.core.config import from_dict, merge, nested
from unlearning.core.errors import ConfigError
from unlearning.evaluation.tasks import TASKS, split_task_names
from unlearning.methods import METHODS, method_module
from unlearning.runner import RunConfig

Role = Literal["hazard", "general", "benign"]
OVER_FORM = "KEY=LOW:HIGH[:log] or KEY=A|B|C, comma-separated"


@dataclass(frozen=True)
class SearchParam:
    """One searched key: a range (``kind`` int or float) or a list of ``choices``."""
    key: str
    kind: Literal["int", "float", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """The trial's value (an enqueued or retried trial gets its fixed value back)."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)

    def distribution(self) -> Any:
        import optuna  # the tune command's dependency; this module's parsing needs no optuna
        if self.kind == "categorical":
            return optuna.distributions.CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log)
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log)

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return value in self.choices
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high

    def describe(self) -> str:
        if self.kind == "categorical":
            return "|".join(map(str, self.choices))
        return f"{self.low:g}:{self.high:g}{':log' if self.log else ''} ({self.kind})"

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class Objective:
    """``task:metric`` of the run's ``after`` results, minimised or maximised."""
    task: str
    metric: str
    direction: Literal["minimize", "maximize"]
    role: str = ""  # hazard / general / benign when known (for the plot's axes)

    @property
    def label(self) -> str:
        return f"{self.task}:{self.metric}"

    def value(self, results: dict[str, Any]) -> float:
        after = results.get("after") or {}
        if self.task not in after:
            raise ConfigError(f"objective: the run's results have no task {self.task!r}; they have "
                              f"{', '.join(after) or 'none'}; pass --objective TASK:METRIC:min|max with one of them")
        if self.metric not in after[self.task]:
            metrics = [m for m, v in after[self.task].items() if isinstance(v, (int, float))]
            raise ConfigError(f"objective: task {self.task!r} has no metric {self.metric!r}; it has "
                              f"{', '.join(metrics)}")
        value = float(after[self.task][self.metric])
        if not math.isfinite(value):
            raise ConfigError(f"objective: {self.label} is {value} (the evaluation gave no finite number)")
        return value


# -------------------------------------------------------------------------------------------- --over

def method_keys() -> dict[str, Key]:
    """Every leaf key of the run config, method sections spelled out (``sequential.remove_coef``)."""
    keys = {k.path: k for k in walk(RunConfig, "config") if k.path not in METHODS}
    for name in METHODS:
        keys.update({k.path: k for k in walk(method_module(name).Config, "config", f"{name}.")})
    return keys


def _number(text: str, key: str, what: str) -> float:
    try:  # float(), not YAML: PyYAML reads 1e-5 (no dot) as a string
        value = float(text.strip())
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ConfigError(f"over: {key}: {what} {text!r} is not a number; write {key}=LOW:HIGH[:log] with numbers")
    return value


def _choice(text: str, numeric: bool) -> Any:
    """One ``A|B|C`` value as YAML reads it; for a number key, ``1e-5`` is the number too."""
    value = yaml.safe_load(text) if text.strip() else ""
    if numeric and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _base_type(tp: Any) -> Any:
    """``X | None`` -> ``X``; other types unchanged."""
    args = [a for a in get_args(tp) if a is not type(None)] if get_origin(tp) in (typing.Union, types.UnionType) else []
    return args[0] if len(args) == 1 else tp


def parse_param(item: str, keys: dict[str, Key], method: str) -> SearchParam:
    """One ``KEY=SPEC`` of ``--over``; the error names the key and how to write it."""
    key, eq, spec = item.partition("=")
    key = key.strip().replace("-", "_")
    if not eq or not spec.strip():
        raise ConfigError(f"over: {item!r} has no range; write {OVER_FORM}")
    if key not in keys:
        close = difflib.get_close_matches(key, list(keys), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"over: {key}: not a key of the run config{hint}; see unlearn run --help")
    head = key.split(".", 1)[0]
    if head in METHODS and head != method:
        raise ConfigError(f"over: {key}: the config's method is {method}, so {head}.* keys do nothing; "
                          f"search {method}.* keys (or set method: {head})")
    field_type, meta = _base_type(keys[key].tp), keys[key].meta
    numeric = field_type in (int, float) or (get_origin(field_type) is not None and
                                             all(a in (int, float) for a in get_args(field_type)))
    if "|" in spec:
        choices = tuple(_choice(c, numeric) for c in spec.split("|"))
        bad = [c for c in choices if c is not None and not isinstance(c, (bool, int, float, str))]
        if bad:
            raise ConfigError(f"over: {key}: {bad[0]!r} cannot be a choice (Optuna's choices are numbers, strings, "
                              f"booleans or null); search a key that holds one value")
        if len(set(map(repr, choices))) < len(choices):
            raise ConfigError(f"over: {key}: a choice is listed twice in {spec!r}; list each value once")
        return SearchParam(key, "categorical", choices=choices)
    if not numeric:
        raise ConfigError(f"over: {key}: a range needs a number key; {key} is "
                          f"{getattr(field_type, '__name__', str(field_type))}: give its values as {key}=A|B")
    parts = spec.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2].strip() != "log"):
        raise ConfigError(f"over: {key}: {spec!r} is not LOW:HIGH or LOW:HIGH:log (the third part may only be log)")
    low, high = _number(parts[0], key, "low"), _number(parts[1], key, "high")
    log = len(parts) == 3
    kind: Literal["int", "float"] = "int" if field_type is int else "float"
    if kind == "int" and (low != int(low) or high != int(high)):
        raise ConfigError(f"over: {key}: an integer key needs integer bounds, got {spec!r}")
    if not low < high:
        raise ConfigError(f"over: {key}: low {low:g} must be below high {high:g}; write {key}=LOW:HIGH")
    if log and low <= 0:
        raise ConfigError(f"over: {key}: a log range needs low > 0, got {low:g}; raise low or drop :log")
    for bound, name in ((low, "low"), (high, "high")):
        if meta.get("min") is not None and bound < meta["min"]:
            raise ConfigError(f"over: {key}: {name} {bound:g} is below the key's minimum {meta['min']}")
        if meta.get("max") is not None and bound > meta["max"]:
            raise ConfigError(f"over: {key}: {name} {bound:g} is above the key's maximum {meta['max']}")
    return SearchParam(key, kind, low, high, log)


def parse_over(items: list[str], method: str) -> list[SearchParam]:
    if not items:
        raise ConfigError(f"over: no key to search; give --over {OVER_FORM}")
    keys = method_keys()
    params = [parse_param(item, keys, method) for item in items]
    seen: set[str] = set()
    for p in params:
        if p.key in seen:
            raise ConfigError(f"over: {p.key} is given twice; give each key once")
        seen.add(p.key)
    return params


def corners(params: list[SearchParam]) -> list[dict[str, Any]]:
    """Every key at its low, at its high, and each choice once (others at their first value)."""
    first = {p.key: (p.choices[0] if p.kind == "categorical" else p.low) for p in params}
    out = [first, {p.key: (p.choices[-1] if p.kind == "categorical" else p.high) for p in params}]
    for p in params:
        out += [{**first, p.key: c} for c in p.choices[1:-1]]
    return [{k: (int(v) if p.kind == "int" else v) for p, (k, v) in zip(params, c.items())} for c in out]


def check_space(base: dict[str, Any], params: list[SearchParam]) -> None:
    """Build the configs at the corners of the space: a bound the config refuses fails now."""
    for values in corners(params):
        data = merge(base, nested(values))
        try:
            cfg = from_dict(RunConfig, data)
            cfg.method_config()
        except ConfigError as e:
            raise ConfigError(f"over: {', '.join(f'{k}={v}' for k, v in values.items())}: {e}") from None


# --------------------------------------------------------------------------------------- objectives

def task_role(name: str) -> Role | None:
    """The role of an eval result key: the organism's ``organism_hazard*`` / ``organism_general*`` /
    ``organism_benign_bio*``, or WMDP (hazard) and MMLU (general); a ``NAME=PATH`` task by its name."""
    n = Path(name.split("=", 1)[0]).name.lower()
    if "hazard" in n or n.startswith("wmdp"):
        return "hazard"
    if "benign" in n:
        return "benign"
    if "general" in n or n.startswith("mmlu"):
        return "general"
    return None


def result_names(tasks: list[str]) -> list[str]:
    """The keys the run's results will have for ``eval.tasks``: a registered task's name (also for
    ``NAME=PATH``), a local file's own spec."""
    import unlearning.tasks  # noqa: F401  (registers the organism and benchmark tasks in TASKS)
    out = []
    for spec in split_task_names(tasks):
        registered = spec.split("=", 1)[0]
        out.append(registered if registered in TASKS else spec)
    return out


def parse_objectives(items: list[str] | None, tasks: list[str]) -> list[Objective]:
    """``--objective TASK:METRIC:min|max,...``, or (none given) hazard down, general and benign up."""
    names = result_names(tasks)
    if not items:
        chosen = {}
        for n in names:
            role = task_role(n)
            if role and role not in chosen:
                chosen[role] = n
        if "hazard" not in chosen or "general" not in chosen:
            missing = "hazard" if "hazard" not in chosen else "general"
            raise ConfigError(f"objective: no {missing} task among eval.tasks ({', '.join(names)}); pass "
                              f"--objective TASK:acc:min (or :max), comma-separated for several")
        return [Objective(chosen["hazard"], "acc", "minimize", "hazard"),
                Objective(chosen["general"], "acc", "maximize", "general")] + (
               [Objective(chosen["benign"], "acc", "maximize", "benign")] if "benign" in chosen else [])
    out = []
    for item in items:
        parts = item.rsplit(":", 2)
        if len(parts) != 3 or parts[2] not in ("min", "max") or not parts[0] or not parts[1]:
            raise ConfigError(f"objective: {item!r} is not TASK:METRIC:min|max (e.g. organism_hazard_cloze:acc:min)")
        task, metric, way = parts
        if task not in names:
            raise ConfigError(f"objective: {task!r} is not one of the run's eval tasks ({', '.join(names)}); "
                              f"add it to eval.tasks or name one of these")
        out.append(Objective(task, metric, "minimize" if way == "min" else "maximize", task_role(task) or ""))
    if len({o.label for o in out}) < len(out):
        raise ConfigError("objective: a TASK:METRIC is given twice; give each once")
    return out
