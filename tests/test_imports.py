"""The import graph of src/rlexport: every import runs down the house (pipeline order below), and no module
imports itself back through others. Lazy imports inside functions count too: they run up the house all the same."""
from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "rlexport"

# Lowest first; a module may import its own layer or lower ones. The folders show the pipeline: formats -> stream
# -> transforms -> output -> folder files, with checks (shared by export and verify) below export.
LAYERS = (
    ("version", "errors", "tensors", "findings"),
    ("archs", "parallel", "stream"),
    ("formats", "lora"),
    ("transforms", "heads", "quant", "folder", "checks", "model_card", "hub_layout", "moe"),
    ("output",),
    ("export", "diagnosis"),
    ("engines",),          # vLLM in a subprocess, the load-format plugin, serving: used by verify and the CLI
    ("verify",),
    ("cli", "render", "__main__", ""),   # "" is the package's own __init__ (the public API)
)
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str) -> bool:
    p = SRC.parent / dotted.replace(".", "/")
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def edges() -> list[tuple[str, str, int]]:
    out = []
    for path in SRC.rglob("*.py"):
        mod = _module_name(path)
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                elif (node.module or "").split(".")[0] == "rlexport":
                    target = node.module
                else:
                    continue
                for alias in node.names:  # `from . import archs` imports the module rlexport.archs
                    sub = f"{target}.{alias.name}"
                    out.append((mod, sub if _is_module(sub) else target, node.lineno))
            elif isinstance(node, ast.Import):
                out += [(mod, a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "rlexport"]
    return out


def _layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_top_level_module_has_a_layer():
    names = {p.stem if p.is_file() else p.name for p in SRC.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    names = {"" if n == "__init__" else n for n in names}
    assert names - set(RANK) == set(), "give each new top-level module a row in LAYERS"


def test_no_import_runs_up_the_house():
    up = [f"{a} -> {b} (line {line})" for a, b, line in edges()
          if _layer(a) != _layer(b) and RANK.get(_layer(b), 99) > RANK.get(_layer(a), -1)]
    assert up == []


def test_no_import_circle():
    graph = defaultdict(set)
    for a, b, _ in edges():
        if a != b and not b.startswith(a + "."):  # a package's __init__ re-exporting its own modules is not a circle
            graph[a].add(b)
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                circles.append(sorted(comp))
    for v in list(graph):
        if v not in index:
            visit(v)
    assert circles == []
