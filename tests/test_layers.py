"""The package's layers: imports only go down, and no module imports itself back.

Every import counts, deferred ones (inside functions) included: a deferred import still
makes the importing layer depend on the imported one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "imvec"

# Bottom to top; a module may import its own layer and those below it.
LAYERS = [
    ("imvec._io", "imvec._paths", "imvec._system", "imvec._version", "imvec.errors"),
    ("imvec.nets",),
    ("imvec.engines",),
    ("imvec.registry", "imvec.labels"),
    ("imvec.weights",),
    ("imvec.module",),
    ("imvec.loader", "imvec.hub", "imvec.export", "imvec.cards", "imvec.data", "imvec.demo"),
    ("imvec.extract", "imvec.finetune"),
    ("imvec.cli",),
]


def _layer(module: str) -> int | None:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None  # the package itself (the public API on top)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The imvec modules ``path`` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "imvec")
        elif (isinstance(node, ast.ImportFrom) and node.module and node.level == 0
              and node.module.split(".")[0] == "imvec"):
            found.add(node.module)
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer():
    homeless = [m for m in _graph() if m != "imvec" and _layer(m) is None]
    assert not homeless, f"add these to LAYERS (or move them): {homeless}"


def test_imports_only_go_down():
    upward = []
    for module, imports in _graph().items():
        rank = _layer(module)
        if rank is None:
            continue
        for target in imports:
            target_rank = _layer(target)
            if target_rank is None or target_rank > rank:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that go up the layers:\n" + "\n".join(sorted(upward))


def test_no_import_cycle():
    graph = _graph()
    modules = set(graph)

    def resolve(name: str) -> str | None:
        # "from imvec.extract import run" imports the package imvec.extract
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges = {m: {t for t in map(resolve, imports) if t and t != m}
             for m, imports in graph.items()}
    # a package's __init__ importing its own submodules is not a cycle of the design
    for m in edges:
        edges[m] = {t for t in edges[m] if not t.startswith(m + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_check_sees_an_upward_import(tmp_path):
    """The checker itself: an engine importing the Module is caught."""
    bad = tmp_path / "imvec" / "engines" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("def f():\n    from imvec.module import Module\n    return Module\n")
    imports = _imports(bad)
    assert imports == {"imvec.module"}
    assert _layer("imvec.module") > _layer("imvec.engines.bad")
