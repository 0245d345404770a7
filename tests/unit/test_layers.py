"""The architecture the README draws, checked against the code's imports (including the ones
inside functions), so the floors stay true without anyone remembering them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "flexlab"

# A package may import its own modules and packages on lower floors, never sideways or upward.
FLOORS = {
    "errors": 0,
    "files": 0,
    "devices": 0,  # errors, OS helpers, the default device
    "hugepages": 0,
    "timeline": 1,
    "compress": 1,
    "models": 1,  # plain data; the maths
    "viz": 2,
    "engine": 2,  # plots of plain data (never the runtime); the runtime
    "cost": 3,
    "eval": 3,
    "distributed": 4,  # pipeline ranks: engines over a share of the layers, on torch.distributed
    "notebook": 4,
    "chat": 4,
    "cli_checks": 4,
    "demo": 5,  # the README's main job
    "cli_args": 5,
    "cli_cost": 6,  # search and calibrate
    "cli": 7,
    "__main__": 8,
    "__init__": 8,
}
FAMILY_MODULES = {f"flexlab.models.{m}" for m in ("opt", "llama", "bloom", "codegen", "glm")}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every flexlab module ``path`` imports, wherever in the file the import is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flexlab"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("flexlab"))
    return {m for m in found if m in modules}


def _room(module: str) -> str:
    """The floor-table key of a module: its package or file under flexlab (the root: ``__init__``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return {m: _imports(p, modules) for m, p in modules.items()}, modules


def test_every_room_has_a_floor(graph):
    _, modules = graph
    assert {_room(m) for m in modules} <= set(FLOORS), "add the new room to FLOORS"


def test_imports_only_go_down(graph):
    edges, _ = graph
    # ``import flexlab`` is allowed anywhere: the package root loads its names lazily
    wrong = [
        f"{a} imports {b}"
        for a, deps in edges.items()
        for b in deps - {"flexlab"}
        if _room(a) != _room(b) and FLOORS[_room(b)] >= FLOORS[_room(a)]
    ]
    assert not wrong, wrong


def test_only_the_registry_knows_the_families(graph):
    edges, _ = graph
    knowing = {a for a, deps in edges.items() if deps & FAMILY_MODULES} - FAMILY_MODULES
    assert knowing <= {"flexlab.models.registry"}, knowing


def test_no_import_cycles(graph):
    """Between modules (a package's ``__init__`` re-exporting its modules is not a cycle)."""
    edges, modules = graph
    packages = {m for m, p in modules.items() if p.name == "__init__.py"}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in edges[m] - packages:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d) :] + [m, d]))
            if d not in state:
                visit(d, stack + [m])
        state[m] = 2

    for m in edges:
        if m not in state:
            visit(m, [])


@pytest.mark.parametrize("code", ["import flexlab.viz", "from flexlab.cli import main; main(['--help'])"])
def test_light_rooms_do_not_load_torch(code):
    probe = f"import sys\ntry:\n    {code}\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


def test_the_cost_model_counts_by_rules_not_runtime_stores(graph):
    edges, _ = graph
    runtime = {f"flexlab.engine.{m}" for m in ("store", "cache", "tiers", "block", "executor", "engine")}
    for module in ("flexlab.cost.model", "flexlab.cost.search"):
        assert not edges[module] & runtime, (module, edges[module] & runtime)
