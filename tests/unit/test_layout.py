"""The package layout is the architecture: imports flow config -> models -> engine -> serving; ops may
use all of them; nothing imports tools; no import cycles (late imports inside functions count too)."""
from __future__ import annotations

import ast
import subprocess
import sys
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


# --- runtimes: nothing outside a runtime's package asks which runtime it is --------------------------------------

RUNTIMES_DIR = PACKAGE / "engine" / "runtimes"


def runtime_names() -> set[str]:
    """Every runtime's name (registry.RUNTIMES), also spelled as its package and Python module are."""
    from workers.engine.runtimes import registry

    names = {r.name for r in registry.RUNTIMES}
    assert {"neural-speed", "qbits", "transformers"} <= names
    return names | {n.replace("-", "_") for n in names}


def _named(node: ast.AST, names: set[str]) -> set[str]:
    """The runtime names a comparison operand holds: a string, or a tuple/list/set/dict of them."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value} & names
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*(_named(e, names) for e in node.elts)) if node.elts else set()
    if isinstance(node, ast.Dict):
        return set().union(*(_named(k, names) for k in node.keys if k is not None)) if node.keys else set()
    return set()


def runtime_name_tests(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of every place `source` compares a value with a runtime name (==, !=, in, match case)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                found += [(node.lineno, n) for n in _named(operand, names)]
        elif isinstance(node, ast.MatchValue):
            found += [(node.lineno, n) for n in _named(node.value, names)]
    return found


def owner(path: Path) -> str | None:
    """The runtime whose package holds `path`, spelled as a module (None outside the runtime packages)."""
    parts = path.relative_to(RUNTIMES_DIR).parts if RUNTIMES_DIR in path.parents else ()
    return parts[0] if len(parts) > 1 else None


def test_no_runtime_name_is_tested_outside_its_own_package():
    names = runtime_names()
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        mine = owner(path)
        for line, name in runtime_name_tests(path.read_text(), names):
            if name.replace("-", "_") != mine:
                found.append(f"{path.relative_to(ROOT)}:{line} tests for runtime {name!r}")
    assert found == [], "ask the runtime (engine/runtimes/base.py) or the registry instead:\n" + "\n".join(found)


@pytest.mark.parametrize("code", [
    'if settings.runtime == "neural-speed": pass',
    'ok = backend in ("fp32", "qbits")',
    'ok = "neural_speed" in sys.modules',
    'match runtime:\n    case "transformers": pass',
])
def test_a_runtime_name_test_is_caught(code):
    assert runtime_name_tests(code, runtime_names())
    assert owner(RUNTIMES_DIR / "qbits" / "runtime.py") == "qbits" and owner(RUNTIMES_DIR / "registry.py") is None


def test_the_bundle_command_imports_no_torch():
    """`bundle stop` and `bundle status` answer in well under a second: the command's modules leave torch and
    transformers (about 2 s to import) to the steps that load a model."""
    code = "import sys, workers.ops.cli; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_finding_the_embedded_model_up_to_date_imports_no_torch(embedded_model):
    """Every `bundle start` of the default deployment checks the embedded model's folder; its converter (torch,
    transformers) is imported only when the folder must be converted."""
    code = ("import sys; from workers.models.embedded import prepare; prepare(); "
            "print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_test_modules_have_unique_names():
    """pytest imports test files by their basename (no __init__.py in tests/): two files of one name in different
    folders stop the whole run at collection ("import file mismatch")."""
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
