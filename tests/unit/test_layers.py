"""The import layers of DESIGN.md ("The shape broker/ is moving to"), enforced by reading every import.

Every ``import`` in broker/ counts, function-level ones included (an import inside a function still
ties the two modules together); one under ``if TYPE_CHECKING:`` does not. The test fails on

- an import cycle among broker's modules,
- an import against the layer order (a lower room importing a higher one),
- a private name (``_x``) imported from another module.

``KNOWN_DEBT`` lists the edges that break these rules today and are being reshaped: the test fails
on any edge not in it, and on an entry of it that no longer exists (delete it then).
"""

from __future__ import annotations

import ast
from pathlib import Path

import broker

BROKER = Path(broker.__file__).parent

#: Rooms from the bottom up (DESIGN.md): a module may import its own room and the rooms below it.
#: A module is in a room when it is one of its names, below one (a package), or starts with one ending in "_".
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # leaves: the standard library and each other only
    ("leaves", ("broker.errors", "broker.secret", "broker.units", "broker.events", "broker.childenv",
                "broker.hardening", "broker.unixsock", "broker.console",
                # the agent's wire, written once: the bot's client (signing/agent.py) imports only it
                "broker.agent.protocol")),
    ("vault", ("broker.vault",)),
    ("config", ("broker.config",)),
    ("sources", ("broker.sources", "broker.daemon")),
    ("audit", ("broker.audit",)),
    ("access", ("broker.access", "broker.watch")),
    ("signing", ("broker.signing", "broker.signing_policy", "broker.relay")),
    ("agent", ("broker.agent", "broker.proxy", "broker.separation", "broker.preflight")),
    ("run", ("broker.run", "broker.runner", "broker.rotation", "broker.checks", "broker.masking", "broker.cmdline",
             "broker.watchdog", "broker.sdnotify")),
    ("migrate", ("broker.migrate",)),
    ("cli", ("broker.cli", "broker.__main__")),
)
#: The package itself (``broker/__init__.py``): the public API, loaded lazily (its imports of the
#: rooms are under TYPE_CHECKING), and ``__version__`` that any room may read.
FACADE = "broker"

#: The known debt of issue 10, paid: the last cycle (access <-> signing, through ``check``) ended when
#: ``check`` moved up into ``broker.checks`` and the version watcher down into ``broker.watch``. Kept
#: (empty) so the stale-entry test keeps its meaning; never add one: a new edge against the layers, or a
#: new cycle, fails the test.
KNOWN_DEBT: frozenset[tuple[str, str]] = frozenset()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(BROKER.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports() -> tuple[dict[str, set[str]], list[str]]:
    """(module -> broker modules it imports, private imports as text)."""
    modules = {_module_name(p): p for p in BROKER.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private: list[str] = []
    for mod, path in sorted(modules.items()):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        is_pkg = path.name == "__init__.py"
        typing_only = {id(n) for top in ast.walk(tree) if isinstance(top, ast.If)
                       and isinstance(top.test, ast.Name) and top.test.id == "TYPE_CHECKING"
                       for stmt in top.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            targets: list[tuple[str, str | None]] = []
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node)
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append((sub, None) if sub in modules else (base, a.name))
            for target, name in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != mod:
                    edges[mod].add(target)
                    if name and name.startswith("_") and not name.startswith("__"):
                        private.append(f"{mod} imports {target}.{name}")
    return edges, private


def _room(mod: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(mod == p or mod.startswith(p + ".") or (p.endswith("_") and mod.startswith(p)) for p in prefixes):
            return rank
    raise AssertionError(f"{mod} has no room in LAYERS: add it where DESIGN.md puts it")


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative enough for this size)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _bad_edges() -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """(edges against the layer order, edges inside an import cycle)."""
    edges, _ = _imports()
    against = {(a, b) for a, bs in edges.items() for b in bs
               if a != FACADE and b != FACADE and _room(b) > _room(a)}
    in_cycle = set()
    for comp in _cycles(edges):
        members = set(comp)
        in_cycle |= {(a, b) for a in comp for b in edges[a] if b in members}
    return against, in_cycle


def test_every_module_has_a_room() -> None:
    edges, _ = _imports()
    for mod in edges:
        if mod != FACADE:
            _room(mod)


def test_leaves_import_only_the_standard_library_and_each_other() -> None:
    edges, _ = _imports()
    leaves = LAYERS[0][1]
    wrong = sorted((a, b) for a, bs in edges.items() for b in bs if a in leaves and b not in leaves and b != FACADE)
    assert wrong == []


def test_no_private_name_is_imported_across_modules() -> None:
    _, private = _imports()
    assert private == []


def test_no_new_cycle_or_edge_against_the_layers() -> None:
    against, in_cycle = _bad_edges()
    new = sorted((against | in_cycle) - KNOWN_DEBT)
    assert new == [], "imports against DESIGN.md's layers or in a cycle (import downward only):\n" + "\n".join(
        f"  {a} -> {b}" for a, b in new)


def test_the_known_debt_is_exact() -> None:
    """An entry whose edge is gone is deleted from KNOWN_DEBT, so the list only ever shrinks."""
    against, in_cycle = _bad_edges()
    assert sorted(KNOWN_DEBT - (against | in_cycle)) == []


def test_the_checker_sees_function_level_imports_and_cycles() -> None:
    """The rules themselves can fail: a function-level import is an edge; a two-module loop is a cycle."""
    edges, _ = _imports()
    assert "broker.daemon" in edges["broker.sources"]  # `from .. import daemon` inside fetch()
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
