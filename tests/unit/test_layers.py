"""The layering rule: the engine (qe_factory.engine) never imports FireWorks, jobflow or their stores, nor the
workflow layer or the CLI; the workflow layer never imports the CLI. Checked on the sources (function-level imports
included) and on a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "qe_factory"
WORKFLOW_LIBRARIES = ("fireworks", "jobflow", "maggma", "montydb", "mongomock", "mongomock_persistence")
FORBIDDEN = {
    "engine": (*WORKFLOW_LIBRARIES, "qe_factory.workflow", "qe_factory.cli"),
    "workflow": ("qe_factory.cli",),
}


def imported_modules(source: str) -> set[str]:
    """Every module an `import` or `from ... import` statement names, wherever it stands in the file."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "qe_factory uses absolute imports only"
            names.add(node.module or "")
    return names


def violations(source: str, forbidden: tuple[str, ...]) -> set[str]:
    return {name for name in imported_modules(source) if any(name == f or name.startswith(f + ".") for f in forbidden)}


def test_the_checker_sees_imports_inside_functions():
    source = "import numpy\ndef f():\n    from jobflow import job\n    import fireworks.core.launchpad\n"
    assert violations(source, FORBIDDEN["engine"]) == {"jobflow", "fireworks.core.launchpad"}


@pytest.mark.parametrize(
    "path", sorted(p for layer in FORBIDDEN for p in (PACKAGE / layer).rglob("*.py")),
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_no_layer_imports_what_is_above_it(path):
    layer = path.relative_to(PACKAGE).parts[0]
    assert violations(path.read_text(), FORBIDDEN[layer]) == set()


def test_importing_the_engine_loads_no_workflow_library():
    modules = [f"qe_factory.engine.{p.stem}" for p in (PACKAGE / "engine").glob("*.py") if p.stem != "__init__"]
    code = (
        f"import sys, qe_factory, {', '.join(modules)}; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({WORKFLOW_LIBRARIES!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def module_imports(path: Path) -> set[str]:
    """The qe_factory modules a source file imports (`from package import module` resolved to the module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.update(f"{node.module}.{alias.name}" if is_module(f"{node.module}.{alias.name}") else node.module
                         for alias in node.names)
    return {name for name in names if is_module(name)}


def is_module(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "qe_factory" and (PACKAGE.parent.joinpath(*parts).with_suffix(".py").is_file())


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the import graph (module → modules it imports), or None."""
    done, path = set(), []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            if cycle := visit(imported):
                return cycle
        path.pop()
        done.add(module)
        return None

    return next((cycle for module in sorted(graph) if (cycle := visit(module))), None)


def test_the_cycle_finder_finds_a_cycle():
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_inside_the_package():
    """Function-level imports count: a lazy import hides a cycle from Python, not from a reader."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        graph[module.removesuffix(".__init__")] = module_imports(path) - {module}
    assert import_cycle(graph) is None
