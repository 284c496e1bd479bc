"""The user's code named by a spec: ``pkg.module:callable`` or ``path/to/file.py:callable``.

One resolver for every option that names a callable (``arch``, ``call``, ``data``): the
module is imported (or the file loaded under its own name), the attribute looked up and
checked to be callable. Failures raise one line that names the library parameter in
backticks (the command line writes it as its flag). A leaf module: no torch import.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable

from .errors import ArchError, VarshiftError, one_line


def resolve_callable(spec: str, param: str, error: type[VarshiftError] = ArchError) -> Callable:
    """Import ``pkg.module:callable`` or ``path/to/file.py:callable``.

    Args:
        spec: the spec.
        param: the parameter that names it (``"arch"``, ``"call"``, ``"data"``), for messages.
        error: the error class raised.

    Raises:
        error: the spec is malformed, its module does not import, or it names no callable.
    """
    who = f"`{param}` {spec!r}"
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise error(f"{who} must be pkg.module:callable or path/to/file.py:callable")
    if target.endswith(".py") or os.sep in target or "/" in target:
        module = import_file(Path(target), who, error)
    else:
        try:
            module = importlib.import_module(target)
        except (Exception, SystemExit) as exc:  # user code that calls sys.exit() too
            raise error(f"{who}: cannot import {target!r} from the current directory or "
                        f"sys.path ({type(exc).__name__}: {one_line(exc)})")
    fn = getattr(module, attr, None)
    if fn is None:
        options = sorted(
            n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
        )
        raise error(f"{who}: {target} has no attribute {attr!r}; callables there: "
                    f"{', '.join(options[:12]) or 'none'}")
    if not callable(fn):
        raise error(f"{who}: {attr} is a {type(fn).__name__}, not callable")
    return fn


def import_file(path: Path, who: str, error: type[VarshiftError] = ArchError) -> ModuleType:
    """Import the Python file ``path`` (once: a second spec naming it gets the same module);
    ``who`` starts every message."""
    if not path.is_file():
        raise error(f"{who}: no such file {path}")
    # Import it under its own file name when that is free, as `python file.py`'s neighbours
    # would: then whole-module pickles of its classes name `<stem>.<Class>`, importable again
    # with the folder on sys.path (or with the same `arch`, which is imported before unpickling).
    resolved = path.resolve()
    name = path.stem if path.stem.isidentifier() else f"varshift_arch_{path.stem}"
    existing = sys.modules.get(name)
    if existing is not None:
        if Path(getattr(existing, "__file__", "") or "").resolve() == resolved:
            return existing
        digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:8]
        name = f"varshift_arch_{digest}_{path.stem}"
        if name in sys.modules:
            return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise error(f"{who}: {path} is not an importable Python file")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        loader_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # user code that calls sys.exit() too
        del sys.modules[name]
        raise error(f"{who}: importing {path} failed ({type(exc).__name__}: {one_line(exc)})")
    finally:
        sys.path.remove(folder)
    return module
