"""The package's import graph: no cycles, and every import points down the layer order.

Layers, lowest first (a module may import its own layer and the ones below, never above)::

    core < model.layers < data files (data.files, data.hub) < evaluation < organism < tasks < model
         < data (text, corpora, real) < masking < training < methods < attacks < reporting
         < preflight < runner, sweep, tune < commands < cli

Why this order: layer access knows only torch and the model families; evaluation reads question files (data.files) and knows no organism; the organism
registers its tasks with the evaluation and uses it for its quality check; ``unlearning.tasks``
is the complete task registry (benchmarks + organism); model loading resolves ``organism:`` names;
text sources read the organism's corpora and the hub; masks, training and methods build on models
and token data; attacks train and evaluate; reports read attack curves; the runner and sweeps
drive methods; commands and the CLI sit on top.

The graph is read with ``ast`` from ``src/unlearning``: module-level and in-function imports,
``importlib.import_module("unlearning...")`` / ``find_spec`` literals, and string constants that
name a module exactly (``METHODS = {"rmu": "unlearning.methods.rmu"}``: imported by name later).
A package's ``__init__`` is a module of its own.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "unlearning"

LAYERS: list[tuple[str, ...]] = [
    ("unlearning.core",),
    # family-agnostic layer access (scoring reads the unembedding); weight-file checks (the organism
    # cache checks its models)
    ("unlearning.model.layers", "unlearning.model.integrity"),
    ("unlearning.data", "unlearning.data.files", "unlearning.data.hub"),  # the package itself is empty
    ("unlearning.evaluation",),
    ("unlearning.organism",),
    ("unlearning.tasks",),
    ("unlearning.model",),
    ("unlearning.data.text", "unlearning.data.corpora", "unlearning.data.real"),
    ("unlearning.masking",),
    ("unlearning.training",),
    ("unlearning.methods",),
    ("unlearning.attacks",),
    ("unlearning.reporting",),
    ("unlearning.preflight",),
    ("unlearning.runner", "unlearning.launch", "unlearning.sweep", "unlearning.tune"),
    ("unlearning.commands",),
    ("unlearning.cli", "unlearning"),
]
LOWER = ("unlearning.methods", "unlearning.training", "unlearning.evaluation", "unlearning.organism",
         "unlearning.attacks")
TOP = ("unlearning.runner", "unlearning.commands", "unlearning.sweep", "unlearning.cli")


def module_files(root: Path = SRC) -> dict[str, Path]:
    out = {}
    for f in root.rglob("*.py"):
        rel = f.relative_to(root.parent).with_suffix("")
        out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f
    return out


def _known(name: str, mods: dict[str, Path]) -> str | None:
    """``name`` or its nearest enclosing module (``unlearning.core.errors.DataError`` -> ``...errors``)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The project modules ``module`` imports, wherever in the file and however."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {_known(a.name, mods) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:  # ``from pkg import sub`` imports the submodule, else pkg itself
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else _known(base, mods))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            value = node.value
            if value.startswith("unlearning.") and (value in mods or _is_import_call_arg(node, path)):
                found.add(_known(value, mods))
    return {m for m in found if m and m != module and m.startswith("unlearning")}


_CALL_ARGS: dict[Path, set[int]] = {}


def _is_import_call_arg(node: ast.Constant, path: Path) -> bool:
    """Whether the literal is an argument of ``import_module(...)`` / ``find_spec(...)``."""
    if path not in _CALL_ARGS:
        ids = set()
        for call in ast.walk(ast.parse(path.read_text())):
            if isinstance(call, ast.Call) and getattr(call.func, "attr", getattr(call.func, "id", "")) in (
                    "import_module", "find_spec"):
                ids |= {(a.lineno, a.col_offset) for a in call.args if isinstance(a, ast.Constant)}
        _CALL_ARGS[path] = ids
    return (node.lineno, node.col_offset) in _CALL_ARGS[path]


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    mods = module_files(root)
    return {m: imports_of(m, f, mods) for m, f in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def layer_of(module: str) -> int:
    """The layer whose most specific prefix matches ``module``."""
    best, best_len = None, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    if best is None:
        raise AssertionError(f"{module} is in no layer; add it to LAYERS in {__file__}")
    return best


def upward_edges(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(m, d) for m, deps in graph.items() for d in deps if layer_of(d) > layer_of(m)}


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_every_module_is_in_a_layer(graph):
    for module in graph:
        layer_of(module)


def test_imports_point_down_the_layers(graph):
    up = sorted(upward_edges(graph))
    assert up == [], "upward imports (module -> imported, against the layer order in this file's docstring)"


def test_evaluation_knows_no_organism(graph):
    edges = sorted((m, d) for m, deps in graph.items() if _under(m, ("unlearning.evaluation",))
                   for d in deps if _under(d, ("unlearning.organism", "unlearning.tasks")))
    assert edges == []


def test_lower_layers_never_import_runner_commands_sweep_cli(graph):
    edges = {(m, d) for m, deps in graph.items() if _under(m, LOWER) for d in deps if _under(d, TOP)}
    assert sorted(edges) == []


# ------------------------------------------------------------------------ the checker itself can fail


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "unlearning"
    for name, text in {"__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    for folder in {p.parent for p in root.rglob("*.py")}:
        (folder / "__init__.py").touch()
    return root


def test_the_walker_sees_every_kind_of_import(tmp_path):
    root = _tree(tmp_path, {
        "core/a.py": "import unlearning.core.b\n",
        "core/b.py": "def f():\n    from unlearning.evaluation import tasks\n",  # in a function
        "evaluation/tasks.py": "import importlib\nimportlib.import_module('unlearning.organism.x')\n",
        "organism/x.py": "from ..core import a\n",  # relative
        "methods/__init__.py": "M = {'s': 'unlearning.methods.s'}\n",  # imported by name later
        "methods/s.py": "from unlearning.methods import M\n",
    })
    g = import_graph(root)
    assert g["unlearning.core.a"] == {"unlearning.core.b"}
    assert g["unlearning.core.b"] == {"unlearning.evaluation.tasks"}
    assert g["unlearning.evaluation.tasks"] == {"unlearning.organism.x"}
    assert g["unlearning.organism.x"] == {"unlearning.core.a"}
    assert sorted(map(tuple, cycles(g))) == [
        ("unlearning.core.a", "unlearning.core.b", "unlearning.evaluation.tasks", "unlearning.organism.x"),
        ("unlearning.methods", "unlearning.methods.s")]
    assert ("unlearning.core.b", "unlearning.evaluation.tasks") in upward_edges(g)
    assert ("unlearning.organism.x", "unlearning.core.a") not in upward_edges(g)
