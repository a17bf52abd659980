"""Typed configs: dataclasses loaded from YAML and overridden from the command line.

Every config in the project is a plain dataclass. Fields carry their constraints in
``metadata`` (see :func:`param`), and :func:`from_dict` checks keys, types and ranges,
raising :class:`ConfigError` with a one-line message naming the key and what it accepts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from unlearning.core.errors import ConfigError
from unlearning.core.io import missing_path_fix

T = TypeVar("T")


def param(default: Any = dataclasses.MISSING, *, help: str = "", min: float | None = None,
          max: float | None = None, choices: typing.Sequence[Any] | None = None,
          default_factory: Any = dataclasses.MISSING, positional: bool = False, many: bool = False,
          comma: bool = True, config_file: bool = False) -> Any:
    """A dataclass field with a help text and optional range or choice constraints.

    The command line (:mod:`unlearning.core.cli`) reads the rest: ``positional`` fields take the
    bare words of the command line, in order; a ``many`` list takes several words (``--model A B``);
    ``comma=False`` keeps commas inside a list's values (regular expressions); a ``config_file``
    field names a YAML file of the command's keys.
    """
    meta = {"help": help, "min": min, "max": max, "choices": tuple(choices) if choices else None,
            "positional": positional, "many": many, "comma": comma, "config_file": config_file}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming ``key``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        allowed = " or ".join(_type_name(a) for a in args)
        raise ConfigError(f"{key}: expected {allowed}, got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (list, tuple):
        (item_tp, *_) = get_args(tp) or (Any,)
        if isinstance(value, str) and "," in value and item_tp in (int, float):
            # "2e-5,1e-4" from the command line under a section read as a mapping (a method's
            # section, typed only once the method is known): the CLI's comma convention
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and origin is list:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if isinstance(value, dict):
        _check_flow_mapping(value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if as_float != int(as_float):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _check_flow_mapping(value: dict[Any, Any], key: str) -> None:
    """YAML reads ``{l2:1}`` (no space after the colon) as the key "l2:1" with no value: say so."""
    for k, v in value.items():
        if v is None and isinstance(k, str) and ":" in k:
            raise ConfigError(f"{key}: {k!r} reads as one key with no value; YAML needs a space after each "
                              f"colon ({{{k.replace(':', ': ', 1)}}})")


def _check_range(value: Any, meta: typing.Mapping[str, Any], key: str) -> None:
    if value is None:
        return
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if meta.get("choices") and v not in meta["choices"]:
            raise ConfigError(f"{key}: {v!r} is not allowed; choose one of {', '.join(map(repr, meta['choices']))}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if meta.get("min") is not None and v < meta["min"]:
                raise ConfigError(f"{key}: {v!r} is below the minimum {meta['min']}")
            if meta.get("max") is not None and v > meta["max"]:
                raise ConfigError(f"{key}: {v!r} is above the maximum {meta['max']}")


def from_dict(cls: type[T], data: typing.Mapping[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, checking every key, type and range."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key; allowed keys are {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name in data:
            value = _coerce(data[name], hints[name], key)
        elif f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            continue
        else:
            raise ConfigError(f"{key}: required key is missing")
        _check_range(value, f.metadata, key)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-safe dict of a config dataclass (tuples become lists)."""
    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v
    return clean(dataclasses.asdict(cfg))


def parse_overrides(args: typing.Sequence[str]) -> dict[str, Any]:
    """Turn ``['--train.lr', '2e-4', '--layers=[5,10]']`` into a nested dict.

    Values are parsed as YAML, so numbers, booleans and lists read naturally.
    """
    out: dict[str, Any] = {}
    i = 0
    args = list(args)
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"{arg}: overrides are written --dotted.key value (or --dotted.key=value)")
        body = arg[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args) or (args[i + 1].startswith("--") and not _is_number(args[i + 1])):
                raw, i = "true", i + 1  # a bare flag means true
            else:
                raw, i = args[i + 1], i + 2
            key = body
        key = key.replace("-", "_")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node, leaf = section_for(out, key)
        node[leaf] = value
    return out


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def flatten(data: typing.Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (empty mappings kept as values)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, typing.Mapping) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def section_for(tree: dict[str, Any], key: str) -> tuple[dict[str, Any], str]:
    """The section of ``tree`` that holds dotted ``key`` (made where missing) and the leaf's name:
    ``section_for(t, "a.b.c")`` is ``(t["a"]["b"], "c")``."""
    node = tree
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is set both as a value and as a section")
    return node, leaf


def nested(dotted: typing.Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1, "a.c": 2}`` -> ``{"a": {"b": 1, "c": 2}}``."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        node, leaf = section_for(out, key)
        node[leaf] = value
    return out


def merge(base: dict[str, Any], update: typing.Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base``."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found; {missing_path_fix(path)}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:  # one line: where, and what the parser expected
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where} ({what}); fix the file's syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of keys")
    return data


def load_config(cls: type[T], path: str | Path | None = None,
                overrides: typing.Sequence[str] | typing.Mapping[str, Any] = (),
                base: typing.Mapping[str, Any] | None = None) -> T:
    """Defaults of ``cls`` <- ``base`` <- YAML file <- command-line overrides.

    ``overrides``: ``--dotted.key value`` words, or the nested mapping the command line parsed
    (:func:`unlearning.core.cli.parse_command`).
    """
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = merge(data, read_yaml(path))
    data = merge(data, overrides if isinstance(overrides, typing.Mapping) else parse_overrides(overrides))
    return from_dict(cls, data)
