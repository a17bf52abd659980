"""One command-line convention for every ``unlearn`` command, read off a typed dataclass.

A command is described by one dataclass of its keys (fields made with
:func:`unlearning.core.config.param`). A command that runs a saved config (``unlearn run``,
``unlearn sweep``) also accepts that config's keys as overrides: ``config=RunConfig``.
:func:`parse_command` reads ``argv``:

* ``--key value`` or ``--key=value``; dots reach nested sections (``--train.optimizer.lr 1e-3``);
  dashes and underscores are the same (``--eval.batch-size 8``); a bool alone (``--resume``) is
  true, ``--no-baseline`` is false;
* a list takes comma-separated values (``--lr 1e-5,2e-5``) or a YAML list (``--layers [1,2]``); a
  ``many`` list also takes several words (``--model A B``);
* ``positional`` fields take the bare words, in order; a ``config_file`` field names a YAML file
  of the dataclass's keys, which the command line overrides;
* an unknown key is a :class:`ConfigError` naming it and the allowed keys (one line, exit 2);
* ``--help`` prints every key with its type, default and help, grouped by section.

Values are read as the field's type wants them: a string stays as written (``--name 1e3``, a
model ``organism:tiny``), other values are YAML (numbers, booleans, ``null``, mappings), checked
and converted by :func:`unlearning.core.config.from_dict`, whose errors name the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from unlearning.core.config import from_dict, merge, read_yaml, section_for
from unlearning.core.errors import ConfigError

T = TypeVar("T")
HELP_FLAGS = ("-h", "--help")
BOOL_WORDS = ("true", "false", "yes", "no", "1", "0")


@dataclass(frozen=True)
class Key:
    """One leaf key of a command: its dotted path, annotated type and field (help, default, flags)."""
    path: str
    tp: Any
    field: dataclasses.Field
    owner: str  # "options" (the command's dataclass) or "config" (the config it overrides)
    default: Any = dataclasses.MISSING  # from the enclosing section's default (data.retain.source)

    @property
    def meta(self) -> Mapping[str, Any]:
        return self.field.metadata

    @property
    def flag(self) -> str:
        return "--" + self.path.replace("_", "-")


def _optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; other types unchanged."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(get_args(tp))
    return tp, False


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(_optional(tp)[0])


def _is_bool(tp: Any) -> bool:
    return _optional(tp)[0] is bool


def _is_list(tp: Any) -> bool:
    return get_origin(_optional(tp)[0]) in (list, tuple)


def _is_mapping(tp: Any) -> bool:
    base = _optional(tp)[0]
    return base is Any or base is dict or get_origin(base) is dict


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def walk(cls: type, owner: str = "options", prefix: str = "", defaults: Any = None) -> list[Key]:
    """Every leaf key of ``cls``, nested dataclass sections as dotted paths.

    ``defaults``: the section's default object, whose values are the keys' defaults: a section's
    factory may differ from its class's defaults (``data.retain`` is ``TextSource("organism:retain")``).
    """
    hints = typing.get_type_hints(cls)
    out: list[Key] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = getattr(defaults, f.name) if defaults is not None else field_default(f)
        if _is_section(hints[f.name]):
            section = default if dataclasses.is_dataclass(default) else None
            out += walk(_optional(hints[f.name])[0], owner, f"{prefix}{f.name}.", section)
        else:
            out.append(Key(prefix + f.name, hints[f.name], f, owner, default))
    return out


def type_name(tp: Any) -> str:
    base, optional = _optional(tp)
    if get_origin(base) is Literal:
        name = "|".join(str(a) for a in get_args(base))
    elif get_origin(base) in (list, tuple, dict):
        name = f"{base.__name__}[{', '.join(type_name(a) for a in get_args(base))}]"
    elif get_origin(base) in (typing.Union, types.UnionType):
        name = " | ".join(type_name(a) for a in get_args(base))
    else:
        name = "any" if base is Any else getattr(base, "__name__", str(base))
    return f"{name} | null" if optional else name


def default_text(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "required"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) if value else "[]"
    if isinstance(value, dict):
        return yaml.safe_dump(value, default_flow_style=True).strip() if value else "{}"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return '""' if value == "" else str(value)


class Spec:
    """The keys of a command: its own dataclass, the config it overrides (if any) and aliases."""

    def __init__(self, cls: type, config: type | None = None, aliases: Mapping[str, str] | None = None):
        self.cls, self.config = cls, config
        self.aliases = dict(aliases if aliases is not None else getattr(cls, "ALIASES", {}))
        own = walk(cls, "options")
        names = {k.path for k in own}
        # the command's own keys win over the config's (sweep's output_dir is the config's too)
        self.keys = own + [k for k in (walk(config, "config") if config else []) if k.path not in names]
        self.by_path = {k.path: k for k in self.keys}
        self.sections = {k.path.rsplit(".", 1)[0] for k in self.keys if "." in k.path}
        self.sections |= {s.rsplit(".", i)[0] for s in list(self.sections) for i in range(s.count(".") + 1)}
        self.positional = [k for k in own if k.meta.get("positional")]
        bad = [f"{a} -> {p}" for a, p in self.aliases.items() if p not in self.by_path]
        if bad:
            raise TypeError(f"{cls.__name__}.ALIASES name unknown keys: {', '.join(bad)}")

    def owner_of(self, path: str) -> str:
        head = path.split(".", 1)[0]
        return next(k.owner for k in self.keys if k.path == head or k.path.startswith(head + "."))

    def resolve(self, name: str) -> tuple[str, Key | None, Any]:
        """``(path, key, value)``; ``key`` None for a whole section or a key inside a mapping field
        (``sequential.layers``); ``value`` is set only for ``--no-flag``."""
        name = name.replace("-", "_")
        name = self.aliases.get(name, name)
        if name in self.by_path:
            return name, self.by_path[name], None
        parts = name.split(".")
        for i in range(1, len(parts)):
            head = ".".join(parts[:i])
            if head in self.by_path and _is_mapping(self.by_path[head].tp):
                return name, None, None
        if name in self.sections:
            return name, None, None
        if name.startswith("no_") and name[3:] in self.by_path and _is_bool(self.by_path[name[3:]].tp):
            return name[3:], self.by_path[name[3:]], False
        raise self.unknown(name)

    def unknown(self, name: str) -> ConfigError:
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        while parent and parent not in self.sections:
            parent = parent.rsplit(".", 1)[0] if "." in parent else ""
        depth = parent.count(".") + 1 if parent else 0
        level = sorted({".".join(k.path.split(".")[:depth + 1]) for k in self.keys
                        if not parent or k.path.startswith(parent + ".")} | set(self.aliases if not parent else ()))
        close = difflib.get_close_matches(name, level + list(self.by_path), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return ConfigError(f"{name}: unknown key{hint}; allowed keys are "
                           f"{', '.join(k.replace('_', '-') for k in level)}; see --help")

    def usage(self, prog: str) -> str:
        words = [k.path.upper() + ("..." if k.meta.get("many") else "") if k.default is dataclasses.MISSING
                 else f"[{k.path.upper()}]" for k in self.positional]
        return " ".join([f"usage: {prog}", *words, "[--key value ...]"])

    def help(self, prog: str, description: str) -> str:
        lines = [self.usage(prog), ""]
        if description.strip():
            lines += [description.strip().replace("``", ""), ""]
        lines += ["Keys are --key value or --key=value; dashes and underscores are the same; lists are "
                  "comma-separated; a bool alone is true (--no-KEY: false).", ""]
        alias_of: dict[str, list[str]] = {}
        for alias, path in self.aliases.items():
            alias_of.setdefault(path, []).append("--" + alias.replace("_", "-"))
        groups: dict[tuple[str, str], list[Key]] = {}
        for k in self.keys:
            groups.setdefault((k.owner, k.path.rsplit(".", 1)[0] if "." in k.path else ""), []).append(k)
        rows: list[tuple[str, str, str, str] | str] = []
        for (owner, section), keys in groups.items():
            title = section or ("options" if owner == "options" else f"{self.config.__name__} keys")
            if owner == "config" and section:
                title += f" ({self.config.__name__})"
            rows.append(f"{title}:")
            for k in keys:
                flag = k.path.upper() if k.meta.get("positional") else k.flag
                if _is_mapping(k.tp):
                    flag += ".KEY"
                flag += "".join(f", {a}" for a in alias_of.get(k.path, []))
                limits = [f"{n} {k.meta[n]}" for n in ("min", "max") if k.meta.get(n) is not None]
                help_text = k.meta.get("help", "") + (f" [{', '.join(limits)}]" if limits else "")
                tname = "|".join(map(str, k.meta["choices"])) if k.meta.get("choices") else type_name(k.tp)
                rows.append((flag, tname, default_text(k.default), help_text))
        width = min(36, max(len(r[0]) for r in rows if isinstance(r, tuple)))
        tw = min(22, max(len(r[1]) for r in rows if isinstance(r, tuple)))
        for r in rows:
            if isinstance(r, str):
                lines += ["", r] if lines[-1] else [r]
                continue
            flag, tname, default, text = r
            pad = f"\n  {'':<{width}}" if len(flag) > width else ""
            lines.append(f"  {flag:<{width}}{pad}  {tname:<{tw}}  default {default}{'  ' + text if text else ''}")
        return "\n".join(lines)


def _yaml(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def convert(raw: str | list[str], key: Key | None) -> Any:
    """A command-line word (or a ``many`` field's words) as the value ``from_dict`` will check."""
    if key is None:
        return _yaml(raw) if isinstance(raw, str) else [_yaml(r) for r in raw]
    base, optional = _optional(key.tp)
    words = [raw] if isinstance(raw, str) else raw
    if optional and isinstance(raw, str) and raw in ("null", "~"):
        return None
    if _is_list(base):
        if isinstance(raw, str) and raw.lstrip().startswith("["):
            return _yaml(raw)
        item = (get_args(base) or (Any,))[0]
        parts = [p.strip() for w in words for p in (w.split(",") if key.meta.get("comma", True) else [w])]
        return [p if item is str else _yaml(p) for p in parts if p]
    return raw if base is str else _yaml(raw)


def _is_option(word: str) -> bool:
    if not word.startswith("--") or word == "--":
        return False
    try:
        float(word)
        return False
    except ValueError:
        return True


def _put(tree: dict[str, Any], path: str, value: Any, extend: bool) -> None:
    node, leaf = section_for(tree, path)
    if extend and isinstance(node.get(leaf), list) and isinstance(value, list):
        node[leaf] = node[leaf] + value
    else:
        node[leaf] = value


def parse_words(spec: Spec, argv: Sequence[str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """``{"options": nested, "config": nested}`` of the keys given, and the bare words."""
    given: dict[str, dict[str, Any]] = {"options": {}, "config": {}}
    bare: list[str] = []
    argv, i = list(argv), 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if word == "--":
            bare += argv[i:]
            break
        if not _is_option(word):
            bare.append(word)
            continue
        body, raw = (word[2:].split("=", 1) + [None])[:2] if "=" in word else (word[2:], None)
        path, key, fixed = spec.resolve(body)
        many = key is not None and key.meta.get("many")
        if fixed is not None:
            if raw is not None:
                raise ConfigError(f"{path}: --no-{body[3:]} takes no value")
            value: Any = fixed
        elif raw is not None:
            value = convert(raw, key)
        elif key is not None and _is_bool(key.tp):
            take = i < len(argv) and argv[i].lower() in BOOL_WORDS
            value = convert(argv[i] if take else "true", key)
            i += take
        elif many:
            words = []
            while i < len(argv) and not _is_option(argv[i]) and argv[i] != "--":
                words.append(argv[i])
                i += 1
            if not words:
                raise ConfigError(f"{path}: needs at least one value ({key.flag} A B or {key.flag} A,B)")
            value = convert(words, key)
        else:
            if i >= len(argv) or _is_option(argv[i]):
                raise ConfigError(f"{path}: needs a value (--{body} VALUE or --{body}=VALUE)")
            value = convert(argv[i], key)
            i += 1
        _put(given[key.owner if key else spec.owner_of(path)], path, value, extend=bool(many))
    return given, bare


def parse_command(cls: type[T], argv: Sequence[str], *, prog: str, description: str = "",
                  config: type | None = None) -> tuple[T, dict[str, Any]] | None:
    """``(options, config overrides)`` from ``argv``, or None after printing ``--help``.

    ``options`` is ``cls`` built from its defaults <- its ``config_file`` field's YAML <- the
    command line; the overrides of ``config``'s keys come back as a nested mapping (the command
    merges them into the config file it loads, e.g. ``load_run_config(path, overrides)``).
    """
    spec = Spec(cls, config)
    if any(a in HELP_FLAGS for a in argv):
        print(spec.help(prog, description))
        return None
    given, bare = parse_words(spec, argv)
    options = given["options"]
    for key in spec.positional:
        if not bare:
            break
        take = bare if key.meta.get("many") else bare[:1]
        bare = bare[len(take):]
        _put(options, key.path, convert(take if key.meta.get("many") else take[0], key), extend=True)
    missing = [k for k in spec.positional if k.default is dataclasses.MISSING and k.path not in options]
    if missing:
        raise ConfigError(f"{missing[0].path}: required; {spec.usage(prog).removeprefix('usage: ')} (see --help)")
    if bare:
        takes = ", ".join(k.path.upper() for k in spec.positional) or "no bare arguments"
        raise ConfigError(f"{bare[0]}: unexpected argument; {prog} takes {takes} and --key value options")
    file_keys = [k for k in spec.keys if k.owner == "options" and k.meta.get("config_file")]
    for k in file_keys:
        path = options.get(k.path, None if k.default is dataclasses.MISSING else k.default)
        if path:  # from_dict names a bad key of the file as it names one of the command line
            options = merge(read_yaml(path), options)
    return from_dict(cls, options), given["config"]
