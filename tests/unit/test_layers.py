"""The import rule of docs/architecture.md, read from the source: app → fs → control →
runtime → core → rules/store/engine, no layer importing one above it, TYPE_CHECKING and
function-level imports included.

A new upward import (say, a rule that reaches for the store or the tree) fails here
with the module and the line, before it can grow into a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "vmtreefs"

# What each bottom layer may import from vmtreefs (prefixes of module names).
ALLOWED = {
    "vmtreefs.rules": ("vmtreefs.rules", "vmtreefs.errors"),
    "vmtreefs.store": ("vmtreefs.store", "vmtreefs.errors"),
    # Engines use the pure change-map arithmetic of the rules, and two leaf helpers.
    "vmtreefs.engine": (
        "vmtreefs.engine",
        "vmtreefs.errors",
        "vmtreefs.rules.blockmap",
        "vmtreefs.pagecache",
        "vmtreefs.mountinfo",
    ),
    # Leaf helpers any layer may use.
    "vmtreefs.errors": (),
    "vmtreefs.mountinfo": (),
    "vmtreefs.pagecache": (),
    "vmtreefs.saveimage": ("vmtreefs.errors",),
}


# The layers above the bottom three, highest first: each may import itself, the ones after
# it and the bottom (the orchestrator holds VMs only behind core.runner.Runner).
STACK = ["vmtreefs.fs", "vmtreefs.control", "vmtreefs.runtime", "vmtreefs.core"]
BOTTOM = (
    "vmtreefs.rules",
    "vmtreefs.store",
    "vmtreefs.engine",
    "vmtreefs.errors",
    "vmtreefs.saveimage",
)
for position, layer in enumerate(STACK):
    ALLOWED[layer] = (*STACK[position:], *BOTTOM)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def vmtreefs_imports(path: Path) -> list[tuple[int, str]]:
    """Every ``vmtreefs.*`` module a file imports, anywhere in it, with the line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("vmtreefs")]
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").split(".")[0] == "vmtreefs"
        ):
            # `from vmtreefs.rules import blockmap` imports the module vmtreefs.rules.blockmap
            module = node.module or ""
            found += [(node.lineno, imported(module, a.name)) for a in node.names]
    return found


def imported(module: str, name: str) -> str:
    """The module that ``from module import name`` loads: ``module.name`` if that is one."""
    candidate = PACKAGE.parent / f"{module}.{name}".replace(".", "/")
    if candidate.with_suffix(".py").exists() or (candidate / "__init__.py").exists():
        return f"{module}.{name}"
    return module


def layer_files(layer: str) -> list[Path]:
    where = PACKAGE.parent / layer.replace(".", "/")
    return (
        [where.with_suffix(".py")]
        if where.with_suffix(".py").exists()
        else sorted(where.rglob("*.py"))
    )


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_nothing_above_it(layer: str) -> None:
    files = layer_files(layer)
    assert files, f"no modules in {layer}"
    wrong = [
        f"{module_name(path)}:{line} imports {target}"
        for path in files
        for line, target in vmtreefs_imports(path)
        if not any(target == a or target.startswith(a + ".") for a in ALLOWED[layer])
    ]
    assert wrong == [], f"{layer} may import only {ALLOWED[layer]}"


def imports_of(layer: str, forbidden: set[str]) -> list[str]:
    """Where the modules of ``layer`` import a top-level package of ``forbidden``."""
    wrong = []
    for path in layer_files(layer):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            wrong += [
                f"{module_name(path)}:{node.lineno} imports {n}"
                for n in names
                if n.split(".")[0] in forbidden
            ]
    return wrong


def test_the_rules_do_no_io() -> None:
    """No trio, no files, no processes, no database: the rules run anywhere, instantly."""
    io_modules = {"trio", "os", "subprocess", "sqlite3", "socket", "pyfuse3", "libvirt", "shutil"}
    assert imports_of("vmtreefs.rules", io_modules) == []


def test_the_view_knows_no_pyfuse3() -> None:
    """fs/view is the tree as a filesystem; only fs/operations (and the files and
    invalidations it drives) speak the kernel's protocol."""
    assert imports_of("vmtreefs.fs.view", {"pyfuse3"}) == []


def test_the_rule_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: an import of the tree from a rule is found, with its line."""
    module = tmp_path / "bad.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from vmtreefs.core.tree import VmTree\n"
        "def f():\n"
        "    from vmtreefs.app import daemon\n"
    )
    assert vmtreefs_imports(module) == [(3, "vmtreefs.core.tree"), (5, "vmtreefs.app.daemon")]


def import_graph() -> dict[str, set[str]]:
    """Module -> the vmtreefs modules it imports (a package's __init__ counts as the package)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        graph[module_name(path)] = {target for _, target in vmtreefs_imports(path)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle, as the modules along it, or [] (depth-first, three colours)."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str]:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return []
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if target != module and (found := visit(target)):
                return found
        path.pop()
        done.add(module)
        return []

    for module in sorted(graph):
        if found := visit(module):
            return found
    return []


def test_no_module_imports_itself_back_through_others() -> None:
    """No import cycle anywhere in vmtreefs/, TYPE_CHECKING imports included."""
    assert find_cycle(import_graph()) == []


def test_the_cycle_finder_finds_one() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []
