"""The package's shape, read from its source: modules per folder, the import graph and its
cycles, the largest parameter lists and the longest functions.

    python scripts/architecture.py            # a summary, as in the issue tracker's notes

tests/test_layout.py checks the rules of docs/architecture.md with the same functions. Only
the standard library: it parses, it never imports varshift.
"""

from __future__ import annotations

import ast
import collections
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "varshift"


@dataclass(frozen=True)
class Import:
    """One import statement's target module, and where it stands."""

    target: str
    line: int
    local: bool  # inside a function
    type_only: bool  # under ``if TYPE_CHECKING:``


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (``__init__`` as the
    package's own name)."""
    out: dict[str, Path] = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _targets(name: str, is_package: bool, node: ast.Import | ast.ImportFrom,
             known: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        candidates = [a.name for a in node.names]
    else:
        if node.level:
            base = name.split(".")
            if not is_package:
                base = base[:-1]
            base = base[: len(base) - (node.level - 1)]
            root = ".".join(base + ([node.module] if node.module else []))
        else:
            root = node.module or ""
        # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
        subs = [f"{root}.{a.name}" for a in node.names if f"{root}.{a.name}" in known]
        candidates = subs or [root]
    out = []
    for c in candidates:
        while c and c not in known and "." in c:  # `import a.b.c` of a non-module name
            c = c.rsplit(".", 1)[0]
        if c in known and c != name:
            out.append(c)
    return out


def imports(known: dict[str, Path] | None = None) -> dict[str, list[Import]]:
    """Module -> its imports of other varshift modules (every import statement, also
    function-local and TYPE_CHECKING ones)."""
    known = known or modules()
    graph: dict[str, list[Import]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found: list[Import] = []

        def visit(node: ast.AST, local: bool, type_only: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for t in _targets(name, path.name == "__init__.py", child, known):
                        found.append(Import(t, child.lineno, local, type_only))
                    continue
                inner_local = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                inner_type = type_only or (
                    isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
                visit(child, inner_local, inner_type)

        visit(tree, False, False)
        graph[name] = found
    return graph


def external_imports(path: Path) -> set[str]:
    """The top-level names of every package ``path`` imports that is not varshift."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out - {"varshift"}


def cycles(graph: dict[str, list[Import]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    edges = {m: sorted({i.target for i in imps}) for m, imps in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
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
                found.append(sorted(comp))

    for v in edges:
        if v not in index:
            connect(v)
    return found


@dataclass(frozen=True)
class Function:
    module: str
    name: str  # qualified within the module: Class.method
    line: int
    params: int  # self / cls not counted
    lines: int


def functions(known: dict[str, Path] | None = None) -> list[Function]:
    """Every function and method of the package."""
    known = known or modules()
    out = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))

        def visit(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.ClassDef):
                    visit(child, f"{prefix}{child.name}.")
                elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    a = child.args
                    n = (len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs)
                         + (a.vararg is not None) + (a.kwarg is not None))
                    first = (a.posonlyargs + a.args)[:1]
                    if first and first[0].arg in ("self", "cls"):
                        n -= 1
                    out.append(Function(name, prefix + child.name, child.lineno, n,
                                        (child.end_lineno or child.lineno) - child.lineno + 1))
                    visit(child, f"{prefix}{child.name}.")
                else:
                    visit(child, prefix)

        visit(tree, "")
    return out


def summary() -> str:
    known = modules()
    graph = imports(known)
    folders = collections.Counter(str(p.parent.relative_to(ROOT)) for p in known.values())
    funcs = functions(known)
    widest = sorted(funcs, key=lambda f: -f.params)[:8]
    longest = sorted(funcs, key=lambda f: -f.lines)[:6]
    local = sum(1 for imps in graph.values() for i in imps if i.local)
    lines = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in known.values())
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    out = [
        f"modules: {len(known)} ({lines} lines); per folder: "
        + ", ".join(f"{k} {v}" for k, v in sorted(folders.items())),
        "largest parameter lists: " + ", ".join(f"{f.module}.{f.name} {f.params}" for f in widest),
        f"functions over 8 parameters: {sum(1 for f in funcs if f.params > 8)}",
        "longest functions: " + ", ".join(f"{f.module}.{f.name} {f.lines}" for f in longest),
        f"function-local imports of varshift modules: {local}",
        f"import cycles: {cycles(graph) or 'none'}",
        f"README: {len(readme.splitlines())} lines, {len(readme.encode())} bytes",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    print(summary())
