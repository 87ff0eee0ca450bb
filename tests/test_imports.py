"""Imports point one way: CLI -> library -> kernels, with no import circle anywhere.

The graph is read from the source (every `import` / `from ... import`, also the lazy ones inside functions,
except `if TYPE_CHECKING:` blocks): a lazy import still ties two modules together, and the old CLI's circle
(cli -> cli_generate -> cli, cli -> demo -> cli_generate, ...) was made of lazy imports. `from pkg import name`
is an edge to `pkg.name` when that is a module, else to `pkg`. Read statically, so it costs no imports (a
fresh interpreter per module would cost ~40 torch imports).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Modules outside the layer rule, and why:
LAUNCHERS = {"flythinker.training.train"}  # `-m flythinker.training.train`: a launcher alias that forwards to the CLI
KERNEL_ROOTS = {"flythinker", "flythinker._C"}  # the kernels locate csrc/ via flythinker.__file__ and load the
# ahead-of-time compiled ops; `import flythinker` runs only its lazy __init__ (no library module)


def _modules() -> dict[str, Path]:
    out = {"flythinker._C": None}  # the optional compiled extension (setup.py), a leaf
    for root, pkg in ((REPO / "flythinker", "flythinker"), (REPO / "kernels", "flythinker.kernels")):
        for f in sorted(root.rglob("*.py")):
            parts = [pkg, *f.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return getattr(t, "id", None) == "TYPE_CHECKING" or getattr(t, "attr", None) == "TYPE_CHECKING"


def _known(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imported(name: str, path: Path, type_only: bool = False) -> set[str]:
    """The modules `name` imports; `type_only`: also those inside `if TYPE_CHECKING:` blocks."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in (child.body + child.orelse) if type_only else child.orelse:
                    visit_one(stmt)
            else:
                visit_one(child)

    def visit_one(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(_known(a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            for a in node.names:
                found.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else _known(mod))
        visit(node)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m and m != name}


GRAPH = {name: _imported(name, path) for name, path in MODULES.items() if path is not None}
GRAPH_WITH_TYPES = {name: _imported(name, path, type_only=True) for name, path in MODULES.items() if path is not None}


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for w in graph.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that reach each other through imports (strongly connected, more than one)."""
    reach = {v: _reach(graph, v) for v in graph}
    groups = {frozenset({v} | {w for w in reach[v] if v in reach.get(w, ())}) for v in graph if v in reach[v]}
    return sorted(sorted(g) for g in groups)


def _layer(name: str) -> int:
    if name.startswith("flythinker.kernels") or name == "flythinker._C":
        return 0
    return 2 if name.startswith("flythinker.cli") else 1


def test_graph_sees_the_modules_and_their_lazy_imports():
    assert {"flythinker.cli", "flythinker.cli.common", "flythinker.modeling", "flythinker.kernels"} <= set(GRAPH)
    assert "flythinker.cli.common" in GRAPH["flythinker.cli.generate"]  # module level
    assert "flythinker.checkpoint" in GRAPH["flythinker.cli.common"]  # inside a function


def test_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle():
    assert _cycles(GRAPH) == []


def test_imports_point_one_way():
    wrong = sorted((a, b) for a, deps in GRAPH.items() for b in deps
                   if _layer(b) > _layer(a) and a not in LAUNCHERS and not (_layer(a) == 0 and b in KERNEL_ROOTS))
    assert wrong == [], "a lower layer imports a higher one (kernels=0 < library=1 < cli=2)"


def test_type_only_imports_are_edges_too():
    assert "flythinker.modeling" in GRAPH_WITH_TYPES["flythinker"]  # inside `if TYPE_CHECKING:`
    assert "flythinker.modeling" not in GRAPH["flythinker"]


def test_the_model_imports_none_of_its_consumers():
    assert not {"flythinker.decode", "flythinker.pretrained.loading"} & _reach(GRAPH_WITH_TYPES, "flythinker.modeling")


def test_no_import_circle_counting_type_only_imports():
    # the model knows none of its consumers: the decode loop and the shipped pairs' factory register with it
    # the package root is a lazy facade (its TYPE_CHECKING block re-exports the model for annotations)
    graph = {a: deps - KERNEL_ROOTS for a, deps in GRAPH_WITH_TYPES.items() if a not in KERNEL_ROOTS}
    assert _cycles(graph) == []
