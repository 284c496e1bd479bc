"""The structure of a batch: its tensors, its number of samples, its first ``k`` samples, and
where a dict batch keeps its inputs and labels.

One convention for the data readers (:mod:`varshift.io.data`) and the calling convention
(:mod:`varshift.calling`), which both split batches by it. A leaf module: it imports torch and
nothing else of varshift.

Sizes: the number of samples in a batch is the first dimension of its first tensor, or the
length of its first list found inside a tuple or dict (a list of per-sample images, as
torchvision's detection models take).
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from typing import Any, Callable

import torch

#: Dict keys that hold a batch's inputs, in the order they are looked for.
INPUT_KEYS = ("inputs", "input", "x", "data", "images", "features")
#: Dict keys that hold a batch's labels, in the order they are looked for.
LABEL_KEYS = ("labels", "label", "y", "targets", "target")


class Batch(tuple):
    """One batch as ``(inputs, labels or None)``, with the batch as the source produced it in
    ``raw`` (numpy arrays made tensors). ``raw`` is what the calling convention
    (:mod:`varshift.calling`) reads: a tuple of several model inputs, a dict of keyword
    arguments, nested structures. For such batches ``inputs`` is ``raw`` itself."""

    raw: Any

    def __new__(cls, inputs: Any, labels: Any, raw: Any) -> "Batch":
        self = super().__new__(cls, (inputs, labels))
        self.raw = raw
        return self


def unwrap(batch: Any) -> Any:
    """The batch as the data source produced it (a :class:`Batch` keeps it in ``raw``)."""
    return getattr(batch, "raw", batch)


def input_key(keys: Container[Any]) -> str | None:
    """The first of :data:`INPUT_KEYS` in ``keys`` (a dict batch, or its keys): where its
    inputs are; None when none is there."""
    return next((k for k in INPUT_KEYS if k in keys), None)


def label_key(keys: Container[Any]) -> str | None:
    """The first of :data:`LABEL_KEYS` in ``keys`` (a dict batch, or its keys): where its
    labels are; None when none is there."""
    return next((k for k in LABEL_KEYS if k in keys), None)


def tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) structure of tuples, lists and dicts, in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in tensors(v)]
    return []


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``obj`` with ``fn`` applied to every tensor; containers keep their types."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        items = {k: map_tensors(v, fn) for k, v in obj.items()}
        try:
            cls: Any = type(obj)
            return cls(**items) if _is_model_output(obj) else cls(items)
        except Exception:
            return items
    if isinstance(obj, tuple):
        mapped = [map_tensors(v, fn) for v in obj]
        return type(obj)(*mapped) if hasattr(obj, "_fields") else tuple(mapped)
    if isinstance(obj, list):
        return [map_tensors(v, fn) for v in obj]
    return obj


def _is_model_output(obj: Any) -> bool:
    return any(c.__name__ == "ModelOutput" for c in type(obj).__mro__)


def batch_size(obj: Any) -> int | None:
    """Samples in a batch (see the module docstring); None when it holds no tensor."""
    return _size(obj, top=True)


def _size(obj: Any, top: bool) -> int | None:
    if isinstance(obj, torch.Tensor):
        return int(obj.shape[0]) if obj.ndim else None
    if isinstance(obj, list) and not top:
        return len(obj)  # a list inside a batch holds one item per sample
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        for v in obj:
            n = _size(v, top=False)
            if n is not None:
                return n
    return None


def cut(obj: Any, k: int) -> Any:
    """The first ``k`` samples of a batch: every tensor whose first dimension is the batch
    size, and every per-sample list, is cut to ``k``; everything else is kept."""
    n = batch_size(obj)
    if n is None or k >= n:
        return obj
    return take(obj, 0, k)


def take(obj: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of a batch (see :func:`cut`)."""
    n = batch_size(obj)
    if n is None:
        return obj
    return _take(obj, slice(start, stop), n, top=True)


def _take(obj: Any, s: slice, n: int, top: bool) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj[s] if obj.ndim and obj.shape[0] == n else obj
    if isinstance(obj, list) and not top and len(obj) == n:
        return obj[s]
    if isinstance(obj, Mapping):
        items = {key: _take(v, s, n, top=False) for key, v in obj.items()}
        try:
            cls: Any = type(obj)
            return cls(items)
        except Exception:
            return items
    if isinstance(obj, tuple):
        mapped = [_take(v, s, n, top=False) for v in obj]
        return type(obj)(*mapped) if hasattr(obj, "_fields") else tuple(mapped)
    if isinstance(obj, list):
        return [_take(v, s, n, top=False) for v in obj]
    return obj
