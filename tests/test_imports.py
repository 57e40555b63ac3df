"""The starfish package's import graph has no cycle, function-level imports included.

An edge is an import that runs: at module level or inside a function (a deferred import still
runs, only later, so a cycle through one is still a cycle). An import under `if TYPE_CHECKING:`
is not an edge of the running graph: it never runs, it only names a type for annotations; the
layered graph counts it too, since a module that names another's types depends on it. Importing `a.b.c` runs the
`__init__` of each package on the way, so `a.b` counts too, except the importer's own packages,
which are already being imported when it runs; a name imported from one of those
(`from a.b import f` inside `a.b.c`) is still an edge, since it needs that `__init__` to have run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import starfish

ROOT = Path(starfish.__file__).resolve().parent


def module_names() -> dict[str, Path]:
    """`{dotted module name: file}` of every module in the starfish package."""
    names = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ("starfish", *path.relative_to(ROOT).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported(tree: ast.Module, module: str, is_package: bool, known: set[str], annotations: bool = False) -> set[str]:
    """The starfish modules `module`'s code imports when it runs (see the module docstring), and
    with `annotations` those it imports for type annotations too."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test) and not annotations:
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    running = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
    edges = {target for target in found if target in known}
    for target in found:
        parts = target.split(".")
        edges.update(prefix for prefix in (".".join(parts[:i]) for i in range(1, len(parts)))
                     if prefix in known and prefix not in running)
    return edges


def import_graph(annotations: bool = False) -> dict[str, set[str]]:
    modules = module_names()
    return {name: imported(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py", set(modules),
                           annotations) for name, path in modules.items()}


def reach(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for target in graph.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per back edge of a depth-first walk, each as `[a, b, ..., a]`; none if the graph is acyclic."""
    cycles, state, path = [], {}, []

    def walk(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                walk(target)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node)
    return cycles


def test_find_cycles_on_hand_made_graphs() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"a"}}) == [["a", "a"]]


def test_edges_count_deferred_imports_and_package_inits_but_not_type_checking_ones() -> None:
    known = {"starfish", "starfish.p", "starfish.p.m", "starfish.q", "starfish.r"}
    tree = ast.parse("from typing import TYPE_CHECKING\n"
                     "import torch\n"
                     "from starfish.p import m\n"
                     "if TYPE_CHECKING:\n    from starfish.r import R\n"
                     "def f():\n    from starfish.q import g\n")
    assert imported(tree, "starfish.x", False, known) == {"starfish.p", "starfish.p.m", "starfish.q"}
    assert imported(tree, "starfish.x", False, known, annotations=True) == \
        {"starfish.p", "starfish.p.m", "starfish.q", "starfish.r"}
    assert imported(ast.parse("from . import m\nfrom .m import k\n"), "starfish.p", True, known) == {"starfish.p.m"}
    assert imported(ast.parse("from starfish.p import f\n"), "starfish.p.m", False, known) == {"starfish.p"}


def test_the_starfish_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert "starfish.steps" in graph["starfish.cli"]  # deferred imports are walked
    assert "starfish.config" not in graph["starfish.healing"]  # annotations only
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_layers_have_no_cycle_counting_annotations_and_config_imports_no_implementation() -> None:
    """Counting the imports made for type annotations, the graph is still acyclic: every module
    sits on a layer and points down. `config` sits low: it checks names against the catalog and
    imports no pruner, healer, model or quantizer, which all read it."""
    graph = import_graph(annotations=True)
    assert "starfish.config" in graph["starfish.healing"]
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)
    implementations = ("starfish.pruning", "starfish.healing", "starfish.models", "starfish.quant", "starfish.formats")
    assert not {name for name in reach(graph, "starfish.config") if name.startswith(implementations)}


def test_the_library_never_imports_the_benchmarks() -> None:
    """The benchmarks are tools over the library: only the command line, the top layer, reaches
    them; a library module that imported one would pull a harness into every pipeline step."""
    graph = import_graph()
    benchmarks = {name for name in graph if name.startswith("starfish.benchmarks")}
    assert {"starfish.benchmarks.bench", "starfish.benchmarks.frontier"} <= benchmarks
    importers = {name for name, targets in graph.items() if targets & benchmarks and name not in benchmarks}
    assert importers == {"starfish.cli"}
