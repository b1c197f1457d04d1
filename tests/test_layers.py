"""The package's layers point down only, and no modules import each other in a cycle.

Every `import` in moe_lab/ (also the lazy ones inside functions) is read with `ast`: a module may
import from its own layer or a lower one, never a higher one, and following imports never leads
back to where it started. A new module must be placed in LAYERS; the README's package table
describes the same order.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "moe_lab"

#: Lowest first. A module belongs to the layer of the longest prefix that names it.
LAYERS = (
    ("foundation", ("moe_lab._triton_setup", "moe_lab.errors", "moe_lab.compile_marks", "moe_lab.devices",
                    "moe_lab.config", "moe_lab.presets", "moe_lab.notebook_values", "moe_lab.parameters")),
    ("routing", ("moe_lab.routing",)),
    ("backends", ("moe_lab.backends", "moe_lab.reference")),
    ("modules", ("moe_lab.modules", "moe_lab.model", "moe_lab.cuda_graph", "moe_lab.capabilities")),
    ("parallel", ("moe_lab.parallel",)),
    ("hf", ("moe_lab.hf", "moe_lab.liger")),  # other libraries' code: transformers, Liger
    ("bench", ("moe_lab.bench", "moe_lab.recorded_tables")),
    ("plots", ("moe_lab.plots", "moe_lab.display")),
    ("widgets", ("moe_lab.widgets",)),
    ("lessons", ("moe_lab.lessons", "moe_lab.exercises", "moe_lab.notebook_runner")),
    ("cli", ("moe_lab.cli",)),
)
#: `import moe_lab` (the facade) re-exports from the layers up to `modules`; importing it counts as that.
ROOT_LAYER = "modules"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    if module == "moe_lab":
        return [name for name, _ in LAYERS].index(ROOT_LAYER)
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), index)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")
    return best[1]


def imports_of(module: str) -> set[str]:
    """The moe_lab modules `module` imports (`from .x import y` names module .x, or .x.y if that is a module)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "moe_lab"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "moe_lab":
                continue
            for alias in node.names:  # `from . import registry` imports the module moe_lab.backends.registry
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in MODULES else target)
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: imports_of(module) for module in MODULES}


def upward_imports(graph, module) -> list[str]:
    mine = layer_of(module)
    return sorted(f"{other} ({LAYERS[layer_of(other)][0]})" for other in graph[module] if layer_of(other) > mine)


def find_cycle(graph) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None. A package's own __init__ (the facade, or the
    package a submodule belongs to) is not followed: importing a submodule always runs it."""
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(module):
        state[module] = 1
        stack.append(module)
        for other in sorted(graph[module]):
            if other == "moe_lab" or (module.startswith(other + ".") and MODULES[other].name == "__init__.py"):
                continue
            if state.get(other) == 1:
                return stack[stack.index(other):] + [other]
            if other not in state:
                cycle = visit(other)
                if cycle:
                    return cycle
        stack.pop()
        state[module] = 2
        return None

    for module in graph:
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


@pytest.mark.parametrize("module", [m for m in MODULES if m != "moe_lab"])
def test_imports_point_down(module):
    upward = upward_imports(GRAPH, module)
    assert not upward, f"{module} ({LAYERS[layer_of(module)][0]}) imports from higher layers: {upward}"


def test_no_import_cycles():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_see_a_planted_upward_import_and_a_planted_cycle():
    # The walk must see lazy imports inside functions, relative and absolute, or it checks nothing.
    assert "moe_lab.backends.registry" in GRAPH["moe_lab.backends.auto"]
    assert "moe_lab.bench.measure" in GRAPH["moe_lab.bench.calibrate"]
    upward = {**GRAPH, "moe_lab.backends.auto": GRAPH["moe_lab.backends.auto"] | {"moe_lab.bench.measure"}}
    assert upward_imports(upward, "moe_lab.backends.auto") == ["moe_lab.bench.measure (bench)"]
    cycle = {**GRAPH, "moe_lab.backends.registry": GRAPH["moe_lab.backends.registry"] | {"moe_lab.backends.auto"}}
    found = find_cycle(cycle)
    assert found is not None and {"moe_lab.backends.auto", "moe_lab.backends.registry"} <= set(found)
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("moe_lab.somewhere_new")
