"""The package's import graph, read from the source with ``ast``: layers point down, and no module
reaches itself again through other modules, counting imports inside functions (deferred imports
hold a circle together just as well; they only move the break to whoever moves one to the top).

Imports under ``if TYPE_CHECKING:`` never run and are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Where each installed package's source is (training/ and export/ install as bpo_plugins.training and .export).
PACKAGES = {"bpo_plugins": ROOT / "bpo_plugins", "bpo_plugins.training": ROOT / "training", "bpo_plugins.export": ROOT / "export"}


def _module_name(path: Path) -> str:
    for name, folder in sorted(PACKAGES.items(), key=lambda item: -len(item[0])):
        if path.is_relative_to(folder):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            return ".".join([name, *parts[:-1]] if parts[-1] == "__init__" else [name, *parts])
    raise AssertionError(path)


def _imports(path: Path) -> set[str]:
    """Every name ``path`` imports, at any depth, relative imports resolved; ``from a import b`` gives
    ``a.b`` (b may be a module, or a name in module a)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    unreached = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                 for statement in node.body for n in ast.walk(statement)}
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in unreached:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the module's package
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            names |= {f"{base}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            names |= {arg.value for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str)}
    return names


def _graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (a name that is not a module counts as its package)."""
    paths = {_module_name(path): path for folder in PACKAGES.values() for path in folder.rglob("*.py")}
    graph = {}
    for module, path in paths.items():
        targets = set()
        for name in _imports(path):
            while name and name not in paths:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, targets = work[-1]
            target = next(targets, None)
            if target is not None:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph[target]))))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return groups


def test_no_import_circles_deferred_imports_included():
    graph = _graph()
    assert len(graph) > 40
    assert _circles(graph) == []


def test_the_circle_finder_finds_a_deferred_circle():
    """The check can fail: two modules importing each other, one of them inside a function, are one circle."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(graph) == [["a", "b", "c"]]
    graph = _graph()
    assert "bpo_plugins.outcome" in graph["bpo_plugins.telemetry"]  # a module-level import is read
    assert "bpo_plugins.drpo.presets" in graph["bpo_plugins.drpo.search"]  # and one inside a function


def test_only_the_cli_reaches_training_and_export():
    """The core (bpo_plugins/ but cli.py) imports neither training/ nor export/; the builder does not import the registry back."""
    package = ROOT / "bpo_plugins"
    modules = {path: _imports(path) for path in package.rglob("*.py")}
    assert len(modules) > 30
    reaching = {str(path.relative_to(package)): sorted(n for n in names if n.startswith(("bpo_plugins.training", "bpo_plugins.export")))
                for path, names in modules.items()}
    assert {path: names for path, names in reaching.items() if names} == {"cli.py": reaching["cli.py"]}
    assert reaching["cli.py"]  # the one place that wires them in
    assert not any(n.startswith("bpo_plugins.registry") for n in modules[package / "onnx_export.py"])
