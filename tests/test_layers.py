"""The package's modules form one staircase (ARCHITECTURE.md): every import goes down.

Each module of ``xenstored/`` has a place in ``STAIRCASE``, bottom first; a module may import
only modules placed before it, so no two modules know each other and there is no cycle.  Every
import counts: at module level, inside functions, and under ``TYPE_CHECKING`` (a type hint that
names a higher module is still a module that knows a higher one).  The client side (``client``,
``guest``) stands apart and may use only the protocol layer.

Adding a module: put it in the lowest layer whose modules it needs, after them, and say what it
owns in ARCHITECTURE.md.  This test fails until it is placed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "xenstored"

# Bottom to top.  Within a layer, the order is the staircase too.
LAYERS: list[tuple[str, list[str]]] = [
    ("protocol", ["wire", "paths", "perms", "ring", "fxtable", "hypervisor.xen_abi"]),
    ("state", ["store", "transactions", "watches", "quota", "config"]),
    ("daemon", ["connection", "metrics", "core", "domains", "control", "ops"]),
    ("edge", ["hub", "hypervisor.base", "hypervisor.emulated", "hypervisor.xen", "hypervisor", "journal", "ringpump", "server"]),
    ("process", ["logs", "migration", "recovery", "service", "cli", "__main__"]),
]
# Apart from the daemon: libraries and commands for clients.  They may use the protocol layer.
CLIENT_SIDE = ["client", "guest"]
# The package's own __init__ (its version) is imported by everything and imports nothing.
ROOT = [""]

STAIRCASE = [m for _, mods in LAYERS for m in mods]


def module_name(path: Path, package: Path) -> str:
    rel = path.relative_to(package).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, package: Path, known: set[str]) -> set[str]:
    """The package modules ``path`` imports, wherever the import statement stands."""
    me = module_name(path, package)
    is_pkg = path.name == "__init__.py"
    here = me.split(".") if me else []
    if not is_pkg:
        here = here[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else list(here)
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and (node.module == package.name or node.module.startswith(package.name + ".")):
                target = node.module[len(package.name) + 1 :]
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                found.add(sub if sub in known else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == package.name or alias.name.startswith(package.name + "."):
                    found.add(alias.name[len(package.name) + 1 :])
    found.discard(me)
    return found


def violations(package: Path, staircase: list[str], client_side: list[str], allowed_for_clients: list[str]) -> list[str]:
    files = sorted(package.rglob("*.py"))
    known = {module_name(p, package) for p in files}
    place = {m: i for i, m in enumerate(staircase)}
    out = []
    for m in sorted(known - set(staircase) - set(client_side) - set(ROOT)):
        out.append(f"{m or '__init__'}: not placed in the staircase (tests/test_layers.py, ARCHITECTURE.md)")
    for path in files:
        me = module_name(path, package)
        for dep in sorted(imports_of(path, package, known)):
            if dep in ROOT:
                continue
            if me in client_side:
                if dep not in allowed_for_clients:
                    out.append(f"{me} (client side) imports {dep}: clients may use only the protocol layer")
            elif me in place and dep in place and place[dep] >= place[me]:
                out.append(f"{me} imports {dep}, which stands above it")
            elif me in place and dep not in place:
                out.append(f"{me} imports {dep}, which is not part of the daemon's staircase")
    return out


def cycles(package: Path) -> list[list[str]]:
    """Import cycles between package modules, found without the staircase (a second opinion)."""
    files = sorted(package.rglob("*.py"))
    known = {module_name(p, package) for p in files}
    graph = {module_name(p, package): imports_of(p, package, known) & known for p in files}
    found, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                found.append([*stack[stack.index(d) :], d])
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    return found


def test_every_import_goes_down_the_staircase() -> None:
    assert violations(PACKAGE, STAIRCASE, CLIENT_SIDE, LAYERS[0][1]) == []


def test_no_import_cycle() -> None:
    assert cycles(PACKAGE) == []


def test_the_architecture_text_names_every_module() -> None:
    text = (PACKAGE.parent / "ARCHITECTURE.md").read_text()
    missing = [m for m in STAIRCASE + CLIENT_SIDE if f"`{m.replace('.', '/')}" not in text]
    assert missing == []


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    pkg = tmp_path / "xenstored"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import X\n")
    (pkg / "sub" / "leaf.py").write_text("X = 1\n")
    (pkg / "low.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .high import Y\n")
    (pkg / "high.py").write_text("from . import low\nfrom .sub.leaf import X\n")
    (pkg / "client.py").write_text("def f():\n    from xenstored import high\n")
    return pkg


def test_the_guard_sees_typing_imports_function_imports_and_cycles(toy: Path) -> None:
    found = violations(toy, ["sub.leaf", "sub", "low", "high"], ["client"], ["sub.leaf"])
    assert "low imports high, which stands above it" in found
    assert "client (client side) imports high: clients may use only the protocol layer" in found
    assert not any(v.startswith("high imports") for v in found)
    assert ["high", "low", "high"] in cycles(toy)
