"""The package's import graph: no module imports, directly or through others, a module that imports it
back, and the models know nothing of distribution.

The graph is read from the source (every `import` statement, also those inside functions, which run
later but still tie the two modules together) rather than from sys.modules, so a circle that happens
not to trigger at import time is caught too. Importing `a.b.c` runs `a/__init__` and `a/b/__init__`,
so those count as imported as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The installed layout: lvface/ is the package and the top-level kernels/ is lvface.kernels.
PACKAGE_DIRS = {"lvface": ROOT / "lvface", "lvface.kernels": ROOT / "kernels"}


def _modules() -> dict[str, Path]:
    modules = {}
    for prefix, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            if path.is_symlink() or any(part.is_symlink() for part in path.parents if part != folder.parent):
                continue  # a developer's lvface/kernels link to ../kernels: the same files under another name
            relative = path.relative_to(folder).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            modules[".".join([prefix, *parts])] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> set[str]:
    """The lvface modules that `import name` executes: the module and each package above it."""
    found = set()
    parts = name.split(".")
    for end in range(1, len(parts) + 1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            found.add(candidate)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    edges |= _resolve(alias.name, modules)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                edges |= _resolve(target, modules)
                for alias in node.names:  # `from lvface import checkpoint` imports the submodule
                    edges |= _resolve(f"{target}.{alias.name}", modules)
        edges.discard(name)
        # A package's own __init__ running is not a circle through its submodule.
        graph[name] = {edge for edge in edges if not name.startswith(edge + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, result = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


def test_graph_sees_the_package():
    graph = import_graph()
    # The reader finds the modules and their edges (a broken reader would pass the circle test vacuously).
    assert {"lvface.config", "lvface.train", "lvface.data.loader", "lvface.kernels"} <= set(graph)
    assert "lvface.config" in graph["lvface.data.augment"]
    assert {"lvface.heads", "lvface.heads.margin"} <= graph["lvface.config"]  # imports inside functions count
    assert {"lvface.checkpoint", "lvface.checkpoint.manager"} <= graph["lvface.train"]


def test_detects_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    cycles = _cycles(import_graph())
    assert cycles == [], "modules that import each other, directly or through others: " + "; ".join(
        " <-> ".join(cycle) for cycle in cycles)


def _layer(module: str) -> str:
    """lvface.data.loader -> lvface.data; top-level modules (lvface.train) stand for themselves."""
    return ".".join(module.split(".")[:2])


def test_no_circles_between_packages():
    # data must not reach into eval while eval reads data, and so on: the layers read bottom-up.
    graph = {}
    for module, edges in import_graph().items():
        graph.setdefault(_layer(module), set()).update(_layer(edge) for edge in edges if _layer(edge) != _layer(module))
    cycles = _cycles(graph)
    assert cycles == [], "packages that import each other: " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", ["lvface.models.vit", "lvface.models"])
def test_models_know_nothing_of_distribution(module):
    path = _modules()[module]
    tree = ast.parse(path.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name.startswith(("torch.distributed", "deepspeed", "lvface.")) and not name.startswith(
        "lvface.models") for name in imported), imported
