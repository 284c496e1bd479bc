"""varshift: find, measure and fix the variance shift that dropout causes in BatchNorm.

The public API (docs/api.md)::

    report = varshift.scan(model, example_input=None)           # -> ScanReport
    probe = varshift.probe(model, batches, seed=0)               # -> ProbeReport
    fixed, rep = varshift.recalibrate(model, batches, exact=False, all_norms=False)
    swapped, rep = varshift.swap(model, to="uout", beta=0.1)
    varshift.export_onnx(model, path, example_input)             # -> ParityResult
    varshift.Uout(beta=0.1)

and one function per command that works on files (load, run, save in the input's own form,
return the report): ``scan_file``, ``probe_file``, ``recalibrate_file``, ``swap_file``,
``export_file`` (:mod:`varshift.files`).

Names are imported lazily so that ``import varshift`` (and ``varshift --help``) stays fast and
does not import torch.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

from ._version import __version__

_LAZY = {
    "scan": "varshift.rules",
    "ScanReport": "varshift.report.results",
    "probe": "varshift.measure.probing",
    "ProbeReport": "varshift.report.results",
    "Uout": "varshift.uout",
    "recalibrate": "varshift.fix.recalibration",
    "RecalibrationReport": "varshift.report.results",
    "swap": "varshift.fix.swapping",
    "SwapReport": "varshift.report.results",
    "export_onnx": "varshift.export",
    "ParityResult": "varshift.report.results",
    "scan_file": "varshift.files",
    "probe_file": "varshift.files",
    "recalibrate_file": "varshift.files",
    "swap_file": "varshift.files",
    "export_file": "varshift.files",
    "load_model": "varshift.io.loading",
    "VarshiftError": "varshift.errors",
}

# Where each module of the flat layout (varshift <= 0.3) lives now. ``import varshift.recalib``
# and ``from varshift.reports import ScanReport`` keep working: the old name is bound to the very
# same module object (so ``monkeypatch`` and ``isinstance`` see one module), loaded on first use.
MOVED = {
    "varshift._io": "varshift.io.atomic",
    "varshift.loading": "varshift.io.loading",
    "varshift.data": "varshift.io.data",
    "varshift.inputs": "varshift.io.inputs",
    "varshift.saving": "varshift.io.saving",
    "varshift.kinds": "varshift.graph.kinds",
    "varshift.sources": "varshift.graph.sources",
    "varshift.stats": "varshift.measure.stats",
    "varshift.norms": "varshift.measure.norms",
    "varshift.probing": "varshift.measure.probing",
    "varshift.distributed": "varshift.measure.distributed",
    "varshift.recalib": "varshift.fix.recalibration",
    "varshift.frontier": "varshift.fix.frontier",
    "varshift.swapping": "varshift.fix.swapping",
    "varshift.reports": "varshift.report.results",
    "varshift.render": "varshift.report.render",
    "varshift.html": "varshift.report.html",
    "varshift.sarif": "varshift.report.sarif",
    "varshift.schema": "varshift.report.schema",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolve an old flat module name to the module that now holds its code."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return ModuleSpec(fullname, self)

    def __init__(self) -> None:
        self._specs: dict[str, ModuleSpec | None] = {}

    def create_module(self, spec: ModuleSpec) -> ModuleType:
        module = importlib.import_module(MOVED[spec.name])
        self._specs[module.__name__] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # the import system stamped the old name's spec on the module: give it back its own
        module.__spec__ = self._specs[module.__name__]


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'varshift' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
