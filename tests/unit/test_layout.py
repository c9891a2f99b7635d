"""The package layout is the architecture: imports flow config -> models -> engine -> serving; ops may
use all of them; nothing imports tools; no import cycles (late imports inside functions count too)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "workers"
ORDER = ["config", "models", "engine", "serving", "ops"]  # each may import the ones before it
LAYERS = ORDER + ["tools"]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every workers.* module the file imports, at any depth of the code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("workers")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("workers"):
            found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        # `from workers.x import y` names module workers.x.y when it exists, else the object y in workers.x
        graph[name] = {m for m in imports_of(path) if m in modules and m != name}
    return graph


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for src, targets in graph.items():
        for dst in targets:
            a, b = layer(src), layer(dst)
            if a is None or b is None or a == b:
                continue
            if b == "tools":
                found.append(f"{src} imports {dst}: nothing imports tools")
            elif a != "tools" and ORDER.index(b) > ORDER.index(a):
                found.append(f"{src} imports {dst}: {a} may not import {b} (imports flow {' -> '.join(ORDER)})")
    return sorted(found)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles between modules."""
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_every_module_belongs_to_a_layer():
    loose = [m for m in import_graph() if m != "workers" and layer(m) is None]
    assert loose == [], f"modules outside config/models/engine/serving/ops/tools: {loose}"


def test_imports_follow_the_layers():
    assert violations(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_package_inits_have_no_side_effects():
    for init in PACKAGE.rglob("__init__.py"):
        body = [n for n in ast.parse(init.read_text()).body if not isinstance(n, ast.Expr)]  # docstring only
        assert body == [], f"{init.relative_to(ROOT)} does more than document"


@pytest.mark.parametrize("edge, expected", [
    (("workers.config.schema", "workers.engine.loader"), "config may not import engine"),
    (("workers.serving.worker", "workers.ops.cli"), "serving may not import ops"),
    (("workers.ops.cli", "workers.tools.compare"), "nothing imports tools"),
])
def test_a_forbidden_import_is_caught(edge, expected):
    graph = import_graph()
    graph[edge[0]] = graph[edge[0]] | {edge[1]}
    assert any(expected in v for v in violations(graph))


def test_a_cycle_is_caught():
    graph = import_graph()
    graph["workers.models.sources"] = graph["workers.models.sources"] | {"workers.models.download"}
    graph["workers.models.download"] = graph["workers.models.download"] | {"workers.models.sources"}
    assert ["workers.models.download", "workers.models.sources", "workers.models.download"] in cycles(graph) or \
        ["workers.models.sources", "workers.models.download", "workers.models.sources"] in cycles(graph)
