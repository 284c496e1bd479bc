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
from typing import Any

from ._version import __version__

_LAZY = {
    "scan": "varshift.rules",
    "ScanReport": "varshift.reports",
    "probe": "varshift.probing",
    "ProbeReport": "varshift.reports",
    "Uout": "varshift.uout",
    "recalibrate": "varshift.recalib",
    "RecalibrationReport": "varshift.reports",
    "swap": "varshift.swapping",
    "SwapReport": "varshift.reports",
    "export_onnx": "varshift.export",
    "ParityResult": "varshift.reports",
    "scan_file": "varshift.files",
    "probe_file": "varshift.files",
    "recalibrate_file": "varshift.files",
    "swap_file": "varshift.files",
    "export_file": "varshift.files",
    "load_model": "varshift.loading",
    "VarshiftError": "varshift.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'varshift' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
