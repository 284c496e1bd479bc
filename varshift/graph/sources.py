"""Where a regularizer or norm lives in the user's source code.

Two questions, two answers:

* **call site**: the file and line whose code runs the op, innermost frame outside torch
  (``x = self.drop(x)`` in a ``forward``, ``F.dropout(...)`` in a helper it calls). Both
  tracers read the Python stack at call time (:func:`caller_location`): fx as it creates each
  node, the dynamic tracer in its hooks.
* **definition site** of a module: the line in an ``__init__`` that created it
  (``self.drop = nn.Dropout(0.5)``), found by reading the parent class's ``__init__`` source
  (:func:`definition_site`). Knowable only when that source is there and names the attribute
  literally; otherwise None (a pickle whose source is gone, ``setattr`` in a loop, a module
  attached from outside).

Paths are relative to the current directory when the file is inside it.
"""

from __future__ import annotations

import ast
import functools
import inspect
import os
import sys
import textwrap
from types import FrameType
from typing import TYPE_CHECKING, Any

from .._types import SourceLocation

if TYPE_CHECKING:
    import torch.nn as nn

_VARSHIFT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


@functools.lru_cache(maxsize=1)
def _torch_dir() -> str:
    import torch

    return os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _is_internal(filename: str) -> bool:
    """Frames that are never the user's: torch itself and varshift's own tracers."""
    path = os.path.abspath(filename)
    return path.startswith(_torch_dir()) or path.startswith(_VARSHIFT_DIR) or filename.startswith("<")


def display_path(filename: str) -> str:
    """``filename`` relative to the current directory when inside it, else absolute."""
    path = os.path.abspath(filename)
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return path
    return path if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


def location(filename: str, line: int, function: str | None) -> SourceLocation:
    return SourceLocation(display_path(filename), int(line), function)


def caller_location(stop_code: Any = None) -> SourceLocation | None:
    """The innermost frame outside torch and varshift on the current Python stack.

    The walk stops at the frame running ``stop_code`` (the tracer's entry point), so frames of
    whoever called varshift are never taken for the model's.
    """
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_code is not stop_code:
        code = frame.f_code
        if not _is_internal(code.co_filename):
            return location(code.co_filename, frame.f_lineno, code.co_name)
        frame = frame.f_back
    return None


# --------------------------------------------------------------------------- definition sites


def definition_site(root: "nn.Module", qualname: str) -> SourceLocation | None:
    """Where the submodule ``qualname`` of ``root`` was created, when the source says so.

    Looks for ``self.<name> = ...`` (or ``self.add_module("<name>", ...)``) in the ``__init__``
    of the parent's class and its bases; for an element of an ``nn.Sequential`` or
    ``nn.ModuleList`` written out literally (``nn.Sequential(a, b, c)``,
    ``nn.ModuleList([a, b])``), the line of that element. Returns None when unknowable.
    """
    if not qualname:
        return None
    try:
        return _definition_site(root, qualname)
    except Exception:  # a best-effort reading of other people's source: never fail a scan
        return None


def _definition_site(root: "nn.Module", qualname: str) -> SourceLocation | None:
    import torch.nn as nn

    parent_name, _, attr = qualname.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and attr.isdigit():
        if not parent_name:
            return None
        container = _find_assignment(root, parent_name)
        if container is None:
            return None
        filename, value = container
        element = _literal_element(value, int(attr))
        if element is None:
            return None
        return location(filename, element.lineno, None)
    found = _find_assignment(root, qualname)
    if found is None:
        return None
    filename, value = found
    return location(filename, value.lineno, None)


def _find_assignment(root: "nn.Module", qualname: str) -> tuple[str, ast.expr] | None:
    """The expression assigned to ``self.<attr>`` in the parent's ``__init__``: (file, node
    with absolute line numbers)."""
    parent_name, _, attr = qualname.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    for cls in type(parent).__mro__:
        if "__init__" not in vars(cls) or cls.__module__.startswith("torch."):
            continue
        parsed = _init_ast(cls)
        if parsed is None:
            continue
        filename, assignments = parsed
        values = assignments.get(attr)
        if not values:
            continue
        if len(values) == 1:
            return filename, values[0]
        # Several branches assign it (`if p: self.drop = Dropout(p) else: nn.Identity()`):
        # the one that builds this module's class, when exactly one does.
        type_name = type(root.get_submodule(qualname)).__name__
        named = [v for v in values if type_name in ast.unparse(v)]
        return (filename, named[0]) if len(named) == 1 else None
    return None


@functools.lru_cache(maxsize=256)
def _init_ast(cls: type) -> tuple[str, dict[str, list[ast.expr]]] | None:
    """``cls.__init__``'s assignments to ``self.<attr>``: (file, attr -> value expressions)."""
    init = vars(cls)["__init__"]
    try:
        filename = inspect.getsourcefile(init)
        lines, start = inspect.getsourcelines(init)
    except (OSError, TypeError):
        return None
    if not filename:
        return None
    tree = ast.parse(textwrap.dedent("".join(lines)))
    func = tree.body[0]
    if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)) or not func.args.args:
        return None
    self_name = func.args.args[0].arg
    out: dict[str, list[ast.expr]] = {}

    def add(attr: str, value: ast.expr) -> None:
        ast.increment_lineno(value, start - 1)
        out.setdefault(attr, []).append(value)

    for node in ast.walk(func):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if (isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                        and t.value.id == self_name):
                    add(t.attr, node.value)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("add_module", "register_module")
              and isinstance(node.func.value, ast.Name) and node.func.value.id == self_name
              and len(node.args) == 2 and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            add(node.args[0].value, node.args[1])
    return filename, out


def _literal_element(value: ast.expr, index: int) -> ast.expr | None:
    """Element ``index`` of ``nn.Sequential(a, b, ...)`` / ``nn.ModuleList([a, b])`` written out
    literally (no ``*args`` before it), else None."""
    if not isinstance(value, ast.Call):
        return None
    name = value.func.attr if isinstance(value.func, ast.Attribute) else getattr(value.func, "id", "")
    if name == "Sequential":
        items = value.args
    elif name == "ModuleList" and len(value.args) == 1 and isinstance(value.args[0], (ast.List, ast.Tuple)):
        items = value.args[0].elts
    else:
        return None
    for i, item in enumerate(items):
        if isinstance(item, ast.Starred):
            return None
        if i == index:
            return item
    return None
