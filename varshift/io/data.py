"""Calibration data: files and callables -> a re-iterable sequence of ``(inputs, labels)`` batches.

Formats (docs/cli.md, DATA): ``.pt`` (a tensor, a tuple/list ``(inputs, labels)``, a dict with
``inputs``/``x`` and optional ``labels``/``y``, or a TensorDataset; read with
``weights_only=True``), ``.npy``, ``.npz`` (arrays ``inputs``/``x`` and ``labels``/``y``, or a
single array), and ``pkg.module:callable`` / ``file.py:callable`` returning an iterable of
batches (tensors, ``(inputs, labels)`` pairs or dicts).

The structure of a batch (:class:`~varshift.batches.Batch`, its size, its first ``k`` samples,
the dict keys of inputs and labels) is :mod:`varshift.batches`, shared with the calling
convention; those names are importable from here too.

Under torchrun, a data callable that takes ``rank`` and ``world_size`` shards itself: this
module only records that it can (:meth:`Calibration.for_rank`); the caller that knows the
ranks (:func:`varshift.measure.distributed.shard_data`) asks for a rank's share.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sized

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .._usercode import resolve_callable
from ..batches import INPUT_KEYS, LABEL_KEYS, Batch, cut, input_key, label_key, take, tensors, unwrap
from ..batches import batch_size as samples_in
from ..errors import DataError, VarshiftError, one_line
from .loading import check_readable, memory_bound, safe_globals

__all__ = [
    "INPUT_KEYS", "LABEL_KEYS", "SUPPORTED", "Batch", "Calibration", "as_batches", "check_batch",
    "check_dtype", "check_max_samples", "from_tensors", "load_data", "peek", "split_batch",
]

SUPPORTED = (
    "DATA must be a .pt file (a tensor, (inputs, labels), a dict with 'inputs'/'x' and "
    "'labels'/'y', or a TensorDataset), a .npy or .npz file, or pkg.module:callable returning "
    "an iterable of batches"
)

def split_batch(batch: Any, where: str = "batch") -> Batch:
    """Normalize one batch to ``(inputs, labels or None)``, keeping the whole batch in ``raw``.

    A tensor, an ``(inputs, labels)`` pair or a dict with an inputs key splits as before; any
    other tuple, list or dict holding tensors (several model inputs, keyword arguments) is
    kept whole as the inputs, for the calling convention to split with the model in hand.
    """
    raw = _numpy_to_torch(unwrap(batch))
    if isinstance(raw, torch.Tensor):
        return Batch(raw, None, raw)
    if isinstance(raw, dict):
        x_key, y_key = input_key(raw), label_key(raw)
        x = None if x_key is None else raw[x_key]
        y = None if y_key is None else raw[y_key]
        if x is None or not _is_array(x):
            if tensors(raw):
                return Batch(raw, None, raw)
            raise DataError(
                f"{where} is a dict with keys {sorted(map(str, raw))[:8]}; expected one of "
                f"{INPUT_KEYS} or tensors under the names of the model's arguments"
            )
        return Batch(_as_tensor(x, where), None if y is None or not _is_array(y)
                     else _as_tensor(y, where), raw)
    if isinstance(raw, (tuple, list)) and raw and _is_array(raw[0]) and len(raw) <= 2:
        y = raw[1] if len(raw) > 1 and _is_array(raw[1]) else None
        if y is None and len(raw) > 1 and raw[1] is not None:
            return Batch(raw, None, raw)  # (tensor, something else): several inputs
        return Batch(raw[0], y, raw)
    if isinstance(raw, (tuple, list)) and tensors(raw):
        return Batch(raw, None, raw)
    raise DataError(
        f"{where} is a {type(batch).__name__}; a batch must be a tensor, an (inputs, labels) "
        "pair, a dict with 'inputs', or a tuple/list/dict of tensors"
    )


def _numpy_to_torch(obj: Any) -> Any:
    """``obj`` with numpy arrays (also inside tuples, lists and dicts) made tensors."""
    if isinstance(obj, np.ndarray):
        return _as_tensor(obj, "batch")
    if isinstance(obj, dict) and any(isinstance(v, np.ndarray) for v in obj.values()):
        return {k: _numpy_to_torch(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)) and not hasattr(obj, "_fields") \
            and any(isinstance(v, (np.ndarray, tuple, list, dict)) for v in obj):
        return type(obj)(_numpy_to_torch(v) for v in obj)
    return obj


def _is_array(x: Any) -> bool:
    return isinstance(x, (torch.Tensor, np.ndarray))


#: The tensor dtypes varshift computes statistics on: real floats (float16 up to float64)
#: and integers/bools (integer images are cast to the model's dtype, as every command does).
#: float8/float4 have no arithmetic on CPU, complex values have no variance in the paper's sense.
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool,
               *(getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n)))
_NUMERIC = "real floats (float16/bfloat16/float32/float64), integers or bools"


def check_dtype(x: torch.Tensor, where: str) -> torch.Tensor:
    """Refuse tensors varshift cannot compute statistics on; return ``x`` unchanged.

    Accepted: dense (strided) tensors of real floating dtypes up to float64, integers and
    bools. Refused with a one-line DataError naming the dtype or layout: complex, float8 /
    float4, quantized, sparse or other non-strided layouts, meta tensors.
    """
    if x.layout is not torch.strided:
        raise DataError(f"{where} is a {str(x.layout).replace('torch.', '')} tensor; varshift "
                        "needs dense tensors (call .to_dense() before saving)")
    if x.is_meta:
        raise DataError(f"{where} is a meta tensor (shapes only, no values)")
    if x.dtype not in _FLOAT_DTYPES and x.dtype not in _INT_DTYPES:
        name = str(x.dtype).replace("torch.", "")
        hint = "; keep the real part or the magnitude" if x.is_complex() else ""
        raise DataError(f"{where} has dtype {name}; varshift needs {_NUMERIC}{hint}")
    return x


def _as_tensor(x: Any, where: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return check_dtype(x, where)
    if isinstance(x, np.ndarray):
        kind = x.dtype.kind
        # numpy kinds: f float, i/u ints, b bool; long double has no torch dtype (and float16
        # to float64 cover every real float torch has).
        if kind not in "fiub" or (kind == "f" and x.dtype.itemsize > 8):
            what = {"O": "object", "U": "str", "S": "bytes", "V": "structured (record)",
                    "c": "complex", "M": "datetime", "m": "timedelta"}.get(kind, "")
            name = f"{what} dtype {x.dtype}" if what else f"dtype {x.dtype}"
            raise DataError(f"{where} holds a numpy array of {name}; varshift needs {_NUMERIC}")
        try:
            return check_dtype(torch.from_numpy(np.ascontiguousarray(x)), where)
        except TypeError as exc:  # a numpy dtype torch has no counterpart for
            raise DataError(f"{where} holds a numpy array of dtype {x.dtype}, which torch "
                            f"cannot read ({str(exc).splitlines()[0][:120]})") from None
    raise DataError(f"{where}: expected a tensor or array, got {type(x).__name__}")


@dataclass
class Calibration:
    """Re-iterable calibration batches with their provenance.

    Iterating yields :class:`Batch` pairs ``(inputs, labels or None)``; each iteration yields
    the same batches. ``samples`` is known after the first iteration (or at once for
    in-memory data). With ``max_samples``, iteration stops after that many samples: the last
    batch is cut, and no batch past the budget is pulled from the source (a DataLoader does
    not load it).
    """

    source: str
    make_iter: Callable[[], Iterator[Any]]
    max_batches: int | None = None
    samples: int | None = None
    n_batches: int | None = None  # known up front for in-memory data
    notes: list[str] = field(default_factory=list)
    #: One rank's own share, from a source that shards itself (see :meth:`for_rank`).
    rank_aware: bool = False
    max_samples: int | None = None
    #: ``(rank, world_size) -> iterator`` over one rank's share, for a source that shards
    #: itself (a data callable that takes ``rank`` and ``world_size``); None for the others.
    make_shard: Callable[[int, int], Iterator[Any]] | None = field(default=None, repr=False)

    def for_rank(self, rank: int, world_size: int) -> "Calibration | None":
        """The share of ``rank`` (of ``world_size`` ranks) of a source that shards itself, with
        the same budgets (each rank's own); None for a source that does not (split it by batch
        index instead)."""
        make = self.make_shard
        if make is None:
            return None
        return dataclasses.replace(self, make_iter=lambda: make(rank, world_size), rank_aware=True,
                                   make_shard=None, samples=None, n_batches=None,
                                   notes=list(self.notes))

    def __iter__(self) -> Iterator[Batch]:
        count = 0
        budget = self.max_samples
        # islice: stop before pulling a batch past max_batches (a DataLoader would load it)
        for i, raw in enumerate(itertools.islice(self.make_iter(), self.max_batches)):
            batch = split_batch(raw, f"batch {i} of {self.source}")
            x, y = batch
            n = _checked_size(batch, i, self.source)
            if budget is not None and count + n > budget:
                batch = split_batch(cut(batch.raw, budget - count), f"batch {i} of {self.source}")
                n = budget - count
            count += n
            yield batch
            del batch, x, y, raw
            if budget is not None and count >= budget:
                break  # before pulling another batch from the source
        if count == 0:
            raise DataError(f"{self.source} yielded no batches")
        self.samples = count


def _checked_size(batch: Batch, index: int, source: str) -> int:
    """Check one batch (see :func:`check_batch`) and return its number of samples."""
    x, y = batch
    if isinstance(x, torch.Tensor):
        check_batch(x, y, index, source)
        return int(x.shape[0])
    for t in tensors(batch.raw):  # several inputs: each one must be clean
        if t.is_floating_point() or t.is_complex():
            bad = (~torch.isfinite(t)).sum().item()
            if bad:
                raise DataError(f"batch {index} of {source} has {bad} NaN/Inf value(s) in its "
                                "inputs; clean the data (varshift does not average over them)")
    n = samples_in(batch.raw)
    if not n:
        raise DataError(f"batch {index} of {source} is empty ({type(batch.raw).__name__} with no "
                        "batch dimension)")
    return n


def check_batch(x: torch.Tensor, y: torch.Tensor | None, index: int, source: str) -> None:
    """Reject empty batches, NaN/Inf and labels that do not match the inputs."""
    check_dtype(x, f"batch {index} of {source}")
    if y is not None:
        check_dtype(y, f"the labels of batch {index} of {source}")
    if x.ndim == 0 or x.shape[0] == 0:
        raise DataError(f"batch {index} of {source} is empty (shape {tuple(x.shape)})")
    if x.is_floating_point():
        bad = (~torch.isfinite(x)).sum().item()
        if bad:
            raise DataError(
                f"batch {index} of {source} has {bad} NaN/Inf value(s) in its inputs; "
                "clean the data (varshift does not average over them)"
            )
    if y is not None and y.shape[:1] != x.shape[:1]:
        raise DataError(
            f"batch {index} of {source}: {x.shape[0]} inputs but {y.shape[0] if y.ndim else 0} labels"
        )


def _bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Consecutive slices; a trailing batch of one sample joins the previous one (a train-mode
    BatchNorm needs more than one value per channel)."""
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return list(zip(starts, starts[1:] + [n]))


def from_tensors(
    inputs: Any, labels: Any = None, batch_size: int = 64,
    source: str = "tensors", max_batches: int | None = None, max_samples: int | None = None,
) -> Calibration:
    """Calibration batches from in-memory tensors or arrays, in order (no shuffling).

    ``inputs`` may also be a tuple or dict of tensors that share the first dimension (several
    model inputs, keyword arguments); each batch is then the same structure, sliced.
    """
    if not isinstance(inputs, (torch.Tensor, np.ndarray)) and labels is None:
        return _from_structure(inputs, batch_size, source, max_batches, max_samples)
    x = _as_tensor(inputs, source)
    y = None if labels is None else _as_tensor(labels, source)
    if x.ndim == 0 or x.shape[0] == 0:
        raise DataError(f"{source} holds no samples (inputs of shape {tuple(x.shape)})")
    if y is not None and y.shape[:1] != x.shape[:1]:
        raise DataError(f"{source}: {x.shape[0]} inputs but {y.shape[0]} labels")
    n = x.shape[0] if max_samples is None else min(x.shape[0], max_samples)
    bounds = _bounds(n, batch_size)[:max_batches]

    def make() -> Iterator[Any]:
        for a, b in bounds:
            yield x[a:b], None if y is None else y[a:b]

    return Calibration(source, make, max_batches, samples=bounds[-1][1], n_batches=len(bounds))


def _kind_of(head: bytes) -> str:
    """A few words on what a file that is not the expected binary format looks like."""
    if not head:
        return "empty"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return f"an unrecognized format (it starts with {head[:8]!r})"


def _from_structure(obj: Any, batch_size: int, source: str, max_batches: int | None,
                    max_samples: int | None) -> Calibration:
    obj = _numpy_to_torch(obj)
    n = samples_in(obj)
    found = tensors(obj)
    if not n or not found or any(t.ndim == 0 or t.shape[0] != n for t in found):
        raise DataError(f"{source}: a {type(obj).__name__} of tensors needs the same number of "
                        f"samples (first dimension) in each; got {_shapes(found)}")
    if max_samples is not None:
        n = min(n, max_samples)
    bounds = _bounds(n, batch_size)[:max_batches]

    def make() -> Iterator[Any]:
        for a, b in bounds:
            yield take(obj, a, b)

    return Calibration(source, make, max_batches, samples=bounds[-1][1], n_batches=len(bounds))


def _shapes(found: list) -> str:
    return ", ".join(str(tuple(t.shape)) for t in found[:6]) or "no tensors"


def _load_pt(path: Path) -> tuple[Any, torch.Tensor | None]:
    # torch.save writes a zip archive (PK) or, in the legacy format, a pickle (0x80 PROTO).
    # Anything else would be fed to the unpickler byte by byte, whose complaint (an unknown
    # "global" for text starting with 'c') would blame the safe list for what is not a
    # torch file at all.
    with path.open("rb") as f:
        head = f.read(64)
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):
        raise DataError(f"DATA {path} is not a torch.save file ({_kind_of(head)}); {SUPPORTED}")
    try:
        # the same bounds as for models: TensorDataset restored, never constructed; what a
        # crafted file may allocate bounded by its size
        with torch.serialization.safe_globals(safe_globals([TensorDataset])), memory_bound(path):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise DataError(f"refused to load DATA {path}: it asks for more memory than a file of its "
                        "size can hold; it is damaged or crafted") from None
    except Exception as exc:
        if "can't allocate memory" in str(exc) or "calls the constructor" in str(exc):
            raise DataError(f"refused to load DATA {path}: it asks for more memory than a file "
                            "of its size can hold, or calls a constructor torch.save never "
                            "writes; it is damaged or crafted") from None
        text = one_line(exc)
        if "Weights only load failed" in str(exc):
            raise DataError(
                f"DATA {path} needs classes outside varshift's safe list; save plain tensors "
                "(torch.save((inputs, labels), path)) or use pkg.module:callable"
            )
        raise DataError(f"DATA {path} is truncated or not a torch.save file ({text[:200]})")
    if isinstance(obj, TensorDataset):
        parts = obj.tensors
        if len(parts) > 2:  # several model inputs (and maybe labels): the calling rules decide
            return tuple(parts), None
        return parts[0], parts[1] if len(parts) > 1 else None
    try:
        batch = split_batch(obj, f"DATA {path}")
    except DataError:
        # Arrays of a refused dtype or layout keep their own message; other objects get the
        # list of supported layouts.
        arrays = obj if isinstance(obj, (tuple, list)) else [obj]
        if any(_is_array(a) for a in arrays):
            raise
        raise DataError(f"DATA {path} holds a {type(obj).__name__}; {SUPPORTED}") from None
    if isinstance(batch.raw, dict) or not isinstance(batch[0], torch.Tensor):
        # keep the names: the calling convention passes dict keys that name forward's
        # parameters as keyword arguments, and reads inputs/labels keys as before
        return batch.raw, None
    return tuple(batch)


#: What numpy says when a file holds pickled objects; its advice (load it unsafely) is
#: never passed on.
_PICKLED = "pickled"


def _numpy_error(path: Path, exc: Exception) -> DataError:
    if _PICKLED in str(exc) or "allow_pickle" in str(exc):
        return DataError(f"DATA {path} holds pickled Python objects (a numpy object array), which "
                         "varshift never unpickles from data; save a numeric array")
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return DataError(f"DATA {path} is not a readable numpy file ({type(exc).__name__}"
                     f"{': ' + text if text else ''})")


def _load_numpy(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    with path.open("rb") as f:
        head = f.read(64)
    # np.load reads either format whatever the suffix; anything else it would try to
    # unpickle (refused) and answer with advice to load it unsafely.
    if not (head.startswith(b"PK") or head.startswith(b"\x93NUMPY")):
        raise DataError(f"DATA {path} is not a numpy .npy/.npz file ({_kind_of(head)}); "
                        f"{SUPPORTED}")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise _numpy_error(path, exc) from None
    if isinstance(arr, np.ndarray):
        return _as_tensor(arr, f"DATA {path}"), None
    with arr:
        keys = list(arr.keys())
        x_key = input_key(keys) or (keys[0] if len(keys) == 1 else None)
        if x_key is None:
            raise DataError(
                f"DATA {path} has arrays {keys[:8]}; name the inputs one of {INPUT_KEYS}"
            )
        y_key = label_key(keys)
        try:  # .npz members are read lazily: an object array fails only here
            x_arr, y_arr = arr[x_key], (arr[y_key] if y_key else None)
        except Exception as exc:
            raise _numpy_error(path, exc) from None
        x = _as_tensor(x_arr, f"DATA {path}")
        y = _as_tensor(y_arr, f"DATA {path}") if y_key else None
    return x, y


def _from_callable(spec: str, max_batches: int | None) -> Calibration:
    fn = resolve_callable(spec, "data", DataError)

    def make(**shard: int) -> Iterator[Any]:
        try:
            result = fn(**shard)
        except VarshiftError:
            raise
        except (Exception, SystemExit) as exc:  # the user's code failed (or exited): bad input
            raise DataError(f"`data` {spec!r}: calling it failed ({type(exc).__name__}: "
                            f"{one_line(exc)})") from exc
        if _is_array(result):  # iterating it would yield single samples, not batches
            raise DataError(
                f"`data` {spec!r} returned a single {type(result).__name__} of shape "
                f"{tuple(result.shape)}; return an iterable of batches (a list, a generator, a "
                "DataLoader), or save the tensor to a .pt file"
            )
        try:
            batches = iter(result)
        except TypeError:
            raise DataError(
                f"`data` {spec!r} must return an iterable of batches, got {type(result).__name__}"
            ) from None
        return _guarded(batches, spec)

    def make_shard(rank: int, world_size: int) -> Iterator[Any]:
        return make(rank=rank, world_size=world_size)

    return Calibration(spec, make, max_batches, make_shard=make_shard if _shards_itself(fn) else None)


def _shards_itself(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` takes ``rank`` and ``world_size`` as keyword arguments (under torchrun it
    is called with them and returns that rank's share of the batches)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return all(name in params and params[name].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                        inspect.Parameter.KEYWORD_ONLY)
               for name in ("rank", "world_size"))


def _guarded(batches: Iterator[Any], spec: str) -> Iterator[Any]:
    """Re-raise errors from the user's iterator as DataError, naming the batch."""
    index = 0
    while True:
        try:
            raw = next(batches)
        except StopIteration:
            return
        except VarshiftError:
            raise
        except (Exception, SystemExit) as exc:
            raise DataError(f"`data` {spec!r} failed while producing batch {index} "
                            f"({type(exc).__name__}: {one_line(exc)})") from exc
        yield raw
        del raw  # hold no batch while the caller works on it
        index += 1


def load_data(
    spec: str | os.PathLike, batch_size: int = 64, max_batches: int | None = None,
    max_samples: int | None = None,
) -> Calibration:
    """Open calibration data (see the module docstring for formats).

    Args:
        spec: a file path or ``pkg.module:callable``.
        batch_size: samples per batch for file data (callables batch themselves).
        max_batches: use at most this many batches.
        max_samples: use at most this many samples (the last batch cut); a callable's
            iterator is not asked for a batch past the budget.

    Raises:
        DataError: a one-line message naming the problem and the supported formats.
    """
    if batch_size < 1:
        raise DataError(f"`batch_size` must be >= 1, got {batch_size}")
    if max_batches is not None and max_batches < 1:
        raise DataError(f"`max_batches` must be >= 1, got {max_batches}")
    check_max_samples(max_samples)
    text = str(spec)
    path = Path(text)
    if ":" in text and not path.exists() and path.suffix.lower() not in (".pt", ".npy", ".npz"):
        cal = _from_callable(text, max_batches)
        cal.max_samples = max_samples
        return cal
    try:
        check_readable(path, "DATA")
    except Exception as exc:
        raise DataError(str(exc))
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        x, y = _load_pt(path)
    elif suffix in (".npy", ".npz"):
        x, y = _load_numpy(path)
    else:
        raise DataError(f"DATA {path}: unsupported file type {suffix or '(none)'}; {SUPPORTED}")
    return from_tensors(x, y, batch_size, source=str(path), max_batches=max_batches,
                        max_samples=max_samples)


def check_max_samples(max_samples: int | None) -> None:
    """Raises DataError unless ``max_samples`` is None or a positive integer."""
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 1):
        raise DataError(f"`max_samples` must be an integer >= 1, got {max_samples!r}")


def as_batches(batches: Iterable[Any], once: bool = False,
               max_samples: int | None = None) -> Iterable[Batch]:
    """Normalize an API ``batches`` argument to a re-iterable of ``(inputs, labels)``.

    A :class:`Calibration` or a re-iterable (list, DataLoader) passes through; a one-shot
    iterator (a generator) is materialized once, so that multi-pass estimators can reuse it.
    With ``once=True`` (a caller that iterates exactly once, like probe) a one-shot iterator
    is wrapped instead, so memory stays O(one batch) whatever its length. ``max_samples``
    cuts the data after that many samples (see :class:`Calibration`).
    """
    check_max_samples(max_samples)
    if isinstance(batches, Calibration):
        if max_samples is None:
            return batches
        budget = max_samples if batches.max_samples is None else min(max_samples, batches.max_samples)
        return dataclasses.replace(batches, max_samples=budget, samples=None, n_batches=None)
    if isinstance(batches, torch.Tensor):
        return Calibration("batches", lambda: iter([batches]), max_samples=max_samples)
    if iter(batches) is batches:  # a one-shot iterator
        stream: Iterator[Any] = iter(batches)
        if once:
            return Calibration("batches", lambda: stream, max_samples=max_samples)
        batches = list(Calibration("batches", lambda: stream, max_samples=max_samples))
        max_samples = None
    n = len(batches) if isinstance(batches, Sized) and max_samples is None else None
    return Calibration("batches", lambda: iter(batches), n_batches=n, max_samples=max_samples)


def peek(batches: Iterable[Any]) -> tuple[Batch, Iterator[Batch]]:
    """The first batch, and an iterator over all the batches (that one included).

    The iterator holds no reference to the first batch once it has passed it
    (``itertools.chain`` would keep it alive to the end), so a stream stays a stream.

    Raises:
        DataError: there is no batch.
    """
    stream = iter(batches)
    first = next(stream, None)
    if first is None:
        raise DataError("the calibration data yielded no batches")
    return first, _prepended(first, stream)


def _prepended(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    del first
    yield from rest
