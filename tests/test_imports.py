"""hf_gauge's import graph (module-level and function-local imports, read with ``ast``) has no cycle, and no module
imports another hf_gauge module's ``_private`` name."""
from __future__ import annotations

import ast
from pathlib import Path

import hf_gauge

ROOT = Path(hf_gauge.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _resolve(mod: str, is_pkg: bool, level: int, name: str | None) -> str:
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """``({module: imported hf_gauge modules}, [(module, source module, private name)])``."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    private: list[tuple[str, str, str]] = []
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("hf_gauge"):
                        graph[mod].add(a.name)
            elif isinstance(node, ast.ImportFrom):
                src = _resolve(mod, is_pkg, node.level, node.module) if node.level else (node.module or "")
                if not src.startswith("hf_gauge"):
                    continue
                for a in node.names:
                    sub = f"{src}.{a.name}"
                    if sub in mods:                       # ``from . import module``
                        graph[mod].add(sub)
                        continue
                    graph[mod].add(src)
                    if a.name.startswith("_") and not a.name.startswith("__") and src != mod:
                        private.append((mod, src, a.name))
    # importing a.b.c also runs a and a.b: an edge to a package's __init__ only when named explicitly
    return {m: {t for t in ts if t in mods and t != m} for m, ts in graph.items()}, private


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for t in sorted(graph[n]):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_graph_sees_function_local_imports():
    graph, _ = import_graph()
    assert "hf_gauge.engine" in graph["hf_gauge.models"]
    assert len(graph) > 20


def test_no_import_cycles():
    graph, _ = import_graph()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_detector_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_private_names_across_modules():
    _, private = import_graph()
    assert private == []

