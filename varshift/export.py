"""Export a model to ONNX (eval mode, dynamic batch) and check it against PyTorch in onnxruntime.

``export_onnx`` is the library half of ``varshift export``: it returns a :class:`ParityResult`
(``bool()`` = parity passed) and never prints. ``check_onnx_parity`` re-runs the parity check
on a file that already exists.

Which exporter (measured with torch 2.13 / 2.14): ``torch.onnx.export``'s default,
torch.export-based exporter (``dynamo=True``, needs onnxscript) with the batch dimension of
every input marked dynamic through ``dynamic_shapes={0: torch.export.Dim("batch")}``. It
traces without running Python control flow on real values, folds eval-mode BatchNorm into the
preceding convolution and drops eval-mode dropout and Uout. When it cannot export a model
(data-dependent control flow, an op it has no translation for), the legacy TorchScript
exporter (``dynamo=False`` with ``dynamic_axes``) is tried next, and the result says so in
``exporter`` and ``notes`` (with any ``TracerWarning``: a trace may have baked in one branch
of the model's Python control flow, which the parity runs at several batch sizes are there to
catch). If neither can export the model, :class:`ExportError` is raised.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import math
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from .errors import ExportError, OutputError, VarshiftError, one_line
from .io.atomic import atomic_path, check_output_path, is_write_failure
from .report.results import ParityCheck, ParityResult

if TYPE_CHECKING:  # torch, onnx and onnxruntime are imported lazily (so that `varshift --help` stays instant)
    import numpy as np
    import torch
    import torch.nn as nn

#: Batch sizes checked on top of the example / calibration batches, so that one file is
#: known to run both with a single sample and with an odd batch larger than the example.
PARITY_BATCH_SIZES = (1, 7)
#: Calibration batches used for the parity check (the rest of the iterable is not read).
MAX_PARITY_BATCHES = 3
#: Relative differences are taken against max(|reference|, REL_FLOOR * max|reference|).
REL_FLOOR = 1e-6

EXPORTER_DYNAMO = "torch.export"
EXPORTER_TORCHSCRIPT = "torchscript"


# --------------------------------------------------------------------------- public API


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: Any = None,
    *,
    batches: Iterable[Any] | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    opset: int | None = None,
    labels: str = "auto",
) -> ParityResult:
    """Export ``model`` in eval mode to ONNX at ``path`` and check it in onnxruntime.

    The caller's model is not touched: a deep copy is moved to the CPU, put in eval mode
    (dropout, Uout and other regularizers become the identity and export to nothing) and
    exported with a dynamic batch dimension (first dimension of every input), so the one
    file runs with any batch size. The file is written atomically: the export goes to a
    temporary file beside ``path``, is checked with ``onnx.checker.check_model`` and run in
    onnxruntime, and only then renamed onto ``path``. On an error nothing is left at
    ``path`` and a file that was there before is kept.

    Parity: the file runs in onnxruntime (CPUExecutionProvider) on up to
    ``MAX_PARITY_BATCHES`` calibration ``batches`` (or on ``example_input`` when there are
    none) and on batches of size 1 and 7 cut from (or repeated out of) the example, and its
    outputs are compared with the eval-mode PyTorch outputs. A parity failure is not an
    exception: the file is kept and the result has ``passed=False``.

    Args:
        model: the module to export (any mode, any device).
        path: the ``.onnx`` file to write (weights inline; files over protobuf's 2 GB limit
            are not supported).
        example_input: a tensor, or a tuple of tensors for a model with several inputs,
            with the batch as the first dimension. ``None``: the inputs of the first of
            ``batches``.
        batches: calibration data, an iterable of batches split by the calling convention
            of :mod:`varshift.calling` (tensors, ``(inputs, labels)`` pairs, tuples of
            positional inputs, dicts of keyword arguments; only the first few are read).
            Every tensor input becomes an ONNX input with a dynamic batch dimension and
            every tensor in the output (tuples, dicts, ``ModelOutput``) an ONNX output.
        atol, rtol: the tolerance, ``numpy.allclose`` style: every output element must have
            ``|onnx - torch| <= atol + rtol * |torch|`` (defaults 1e-4 and 1e-3).
        opset: the ONNX opset to export to (default: the exporter's).
        labels: how tuple batches split (``"auto"``, ``"none"``, ``"last"``).

    Returns:
        A :class:`ParityResult`; ``bool(result)`` is True when every check passed.

    Raises:
        ExportError: neither exporter could export the model, or the file is not valid ONNX.
        OutputError: ``path`` cannot be written (a directory, a missing folder, ...).
        DataError: no example input, or inputs that are not tensors.
    """
    import torch

    out = check_output_path(path, "ONNX output")
    work, example, batch_list = _prepare(model, example_input, batches, atol, rtol, labels)
    name = type(model).__name__

    # fork_rng: neither tracing nor the parity runs may move the caller's global RNG
    with torch.random.fork_rng(devices=[]), atomic_path(out) as tmp:
        exporter, notes = _export(work, example, tmp, opset, name)
        _check_model(tmp, name)
        result = _parity(work, tmp, example, batch_list, atol, rtol)
    result.output = str(out)
    result.model = name
    result.exporter = exporter
    result.notes = notes + result.notes
    return result


def check_onnx_parity(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: Any = None,
    *,
    batches: Iterable[Any] | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> ParityResult:
    """Compare an existing ONNX file with ``model`` in eval mode; the parity half of
    :func:`export_onnx`, with the same arguments and checks. ``exporter`` is None.

    Raises:
        ExportError: ``path`` is missing or is not a valid ONNX file.
    """
    p = Path(path)
    if not p.is_file():
        raise ExportError(f"ONNX file {p} does not exist")
    work, example, batch_list = _prepare(model, example_input, batches, atol, rtol)
    _check_model(p, type(model).__name__)
    result = _parity(work, p, example, batch_list, atol, rtol)
    result.output = str(p)
    result.model = type(model).__name__
    return result


# --------------------------------------------------------------------------- inputs


def _prepare(model: nn.Module, example_input: Any, batches: Iterable[Any] | None,
             atol: float, rtol: float, labels: str = "auto") -> tuple[nn.Module, tuple, list]:
    """An eval-mode CPU copy of ``model`` taking flat tensor inputs, the example inputs and
    the parity batches (CPU). Batches go through the same calling convention as probe and
    recalibrate (integer images take the model's dtype; token ids stay integers)."""
    import torch

    for label, tol in (("atol", atol), ("rtol", rtol)):
        if not tol >= 0:
            raise VarshiftError(f"{label} must be a number >= 0, got {tol}")
    try:
        work = copy.deepcopy(model)
    except Exception as exc:  # e.g. a module holding an open file or a lock
        raise ExportError(f"cannot copy {type(model).__name__} for export (the original is "
                          f"never changed): {one_line(exc, root=True, typed=True)}") from exc
    work = work.to("cpu").eval()
    work, batch_list = _flat_batches(work, batches, labels)
    example = _example_inputs(example_input, batch_list)
    example = tuple(t.to("cpu") for t in example)
    batch_list = [tuple(t.to("cpu") for t in b) for b in batch_list]
    # Inputs that do not fit are a data problem; say so before an exporter buries it.

    with torch.no_grad(), _captured_output():
        try:
            work(*example)
        except Exception as exc:
            from .errors import DataError

            what = "the example input" if example_input is not None else "calibration batch 1"
            raise DataError(f"{what} (shape {_shapes(example)}) does not fit "
                            f"{type(model).__name__}: {one_line(exc, root=True, typed=True)}") from exc
    return work, example, batch_list



def _as_inputs(value: Any, what: str) -> tuple[torch.Tensor, ...]:
    import torch

    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (tuple, list)) and value and all(
            isinstance(v, torch.Tensor) for v in value):
        return tuple(value)
    from .errors import DataError

    raise DataError(f"{what} must be a tensor or a tuple of tensors, got {type(value).__name__}")


def _flat_batches(work: nn.Module, batches: Iterable[Any] | None,
                  labels: str) -> tuple[nn.Module, list[tuple[torch.Tensor, ...]]]:
    """The parity batches as flat tuples of tensors, and the module to export.

    A batch that is one tensor or several positional tensors goes in as it is. Any other
    structure (keyword arguments, nested inputs, non-tensor arguments) is flattened: the
    module exported is :class:`_FlatInputs` around ``work``, which rebuilds the structure
    from the flat tensors, so that each tensor is one ONNX input.
    """
    from .calling import Caller

    if batches is None:
        return work, []
    from .io.data import LABEL_KEYS

    caller = Caller(work, labels=labels, device="cpu")
    invocations = []
    for i, b in enumerate(itertools.islice(batches, MAX_PARITY_BATCHES)):
        inv = caller.prepare(b, i)
        # the inference signature: labels a forward takes (Hugging Face) would add a loss
        inv.kwargs = {k: v for k, v in inv.kwargs.items() if k not in LABEL_KEYS}
        invocations.append(inv)
    if not invocations:
        return work, []
    plain = all(not inv.kwargs and inv.args and all(isinstance(a, torch_tensor()) for a in inv.args)
                for inv in invocations)
    if plain:
        return work, [tuple(inv.args) for inv in invocations]
    flat = _FlatInputs(work, invocations[0].args, invocations[0].kwargs).eval()
    return flat, [flat.flatten(inv.args, inv.kwargs, f"calibration batch {i + 1}")
                  for i, inv in enumerate(invocations)]


def torch_tensor():
    import torch

    return torch.Tensor


def _flat_module_class():
    import torch.nn as nn
    from torch.utils import _pytree as pytree

    class FlatInputs(nn.Module):
        """``model`` called with flat tensors: rebuilds ``(args, kwargs)`` of the template
        structure (non-tensor leaves kept as constants) and returns the output's tensors as
        a flat tuple."""

        def __init__(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
            super().__init__()
            self.model = model
            leaves, self.spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
            self.slots = [i for i, v in enumerate(leaves) if isinstance(v, torch_tensor())]
            self.constants = [None if i in self.slots else v for i, v in enumerate(leaves)]
            names = _leaf_names(args, kwargs, model)
            self.names = [names[i] if i < len(names) else f"input_{k}"
                          for k, i in enumerate(self.slots)]

        def flatten(self, args: tuple, kwargs: dict, what: str) -> tuple:
            leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
            if spec != self.spec:
                from .errors import DataError

                raise DataError(f"{what} has another structure than the first batch; export "
                                "needs batches of one structure")
            return tuple(leaves[i] for i in self.slots)

        def forward(self, *flat):
            leaves = list(self.constants)
            for i, t in zip(self.slots, flat):
                leaves[i] = t
            args, kwargs = pytree.tree_unflatten(leaves, self.spec)
            from .calling import tensors

            return tuple(tensors(self.model(*args, **kwargs)))

    return FlatInputs


def _leaf_names(args: tuple, kwargs: dict, model) -> list[str]:
    """A name for every leaf of ``(args, kwargs)``: forward's parameter names, dict keys."""
    import inspect

    try:
        params = [p for p in inspect.signature(model.forward).parameters]
    except (TypeError, ValueError):
        params = []
    names: list[str] = []

    def walk(obj, prefix):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(obj, (tuple, list)):
            for i, v in enumerate(obj):
                walk(v, f"{prefix}.{i}")
        else:
            names.append(prefix)

    for i, a in enumerate(args):
        walk(a, params[i] if i < len(params) else f"input_{i}")
    walk(dict(kwargs), "")
    return [re.sub(r"[^A-Za-z0-9_.]", "_", n) for n in names]


def _FlatInputs(model, args, kwargs):
    return _flat_module_class()(model, args, kwargs)


def _example_inputs(example_input: Any, batch_list: list) -> tuple[torch.Tensor, ...]:
    from .errors import DataError

    if example_input is None:
        if not batch_list:
            raise DataError("export needs an example input or calibration batches; "
                            "give `example_input`")
        example = batch_list[0]
    else:
        example = _as_inputs(example_input, "the example input")
    if any(t.dim() == 0 or t.shape[0] == 0 for t in example):
        raise DataError("the example input needs a non-empty batch dimension first, got shape "
                        + ", ".join(str(tuple(t.shape)) for t in example))
    return example


def _resize_batch(inputs: tuple[torch.Tensor, ...], size: int) -> tuple[torch.Tensor, ...]:
    """The first ``size`` samples of ``inputs``, repeated cyclically when there are fewer."""
    out = []
    for t in inputs:
        n = t.shape[0]
        if n < size:
            t = t.repeat(math.ceil(size / n), *([1] * (t.dim() - 1)))
        out.append(t[:size].contiguous())
    return tuple(out)


# --------------------------------------------------------------------------- export


def _export(model: nn.Module, example: tuple, tmp: Path, opset: int | None,
            name: str) -> tuple[str, list[str]]:
    """Export to ``tmp``; return the exporter used and notes. Raise ExportError if none can."""
    # A batch of 1 invites the tracer to specialize the batch dimension to 1 (0/1
    # specialization); trace with 2 so the dynamic dimension stays symbolic.
    trace_input = _resize_batch(example, 2) if example[0].shape[0] == 1 else example
    errors: list[tuple[str, BaseException]] = []
    logs: list[str] = []
    for exporter in (EXPORTER_DYNAMO, EXPORTER_TORCHSCRIPT):
        failed: Exception | None
        with contextlib.suppress(OSError):
            tmp.unlink()  # a failed attempt may leave a partial file
        with _captured_output() as log:
            try:
                _run_exporter(exporter, model, trace_input, tmp, opset)
            except Exception as exc:  # any exporter failure: try the next, then report
                if is_write_failure(exc):  # a full disk is not the model's fault
                    raise OutputError(f"cannot write the ONNX file ({one_line(exc)}); "
                                      "nothing was written") from exc
                failed = exc
            else:
                failed = None
        logs.append(f"--- {exporter} exporter\n{log.text}")
        if failed is None and tmp.is_file() and tmp.stat().st_size > 0:
            notes = [f"the {e} exporter failed ({one_line(x, root=True, typed=True)}); used the {exporter} exporter"
                     for e, x in errors]
            notes += _tracer_notes(log.warnings)
            return exporter, notes
        errors.append((exporter, failed or RuntimeError("the exporter wrote no file")))
    reasons = "; ".join(f"{e} exporter: {one_line(x, root=True, typed=True)}" for e, x in errors)
    raise ExportError(f"cannot export {name} to ONNX: {reasons}",
                      log="\n".join(logs)) from errors[0][1]


def _run_exporter(exporter: str, model: nn.Module, inputs: tuple, tmp: Path,
                  opset: int | None) -> None:
    import torch

    n = len(inputs)
    input_names = ["input"] if n == 1 else [f"input_{i}" for i in range(n)]
    if type(model).__name__ == "FlatInputs" and len(set(model.names)) == n:
        input_names = list(model.names)  # a structured batch: forward's names, dict keys
    with torch.no_grad():
        if exporter == EXPORTER_DYNAMO:
            batch = torch.export.Dim("batch")
            torch.onnx.export(
                model, inputs, str(tmp), dynamo=True, external_data=False, verbose=False,
                opset_version=opset, input_names=input_names,
                dynamic_shapes=_dynamic_shapes(model, inputs, batch),
            )
        else:
            # Output names are unknown before tracing; the exporter names them itself, and
            # a dynamic input batch propagates to the outputs through shape inference.
            torch.onnx.export(
                model, inputs, str(tmp), dynamo=False, external_data=False, verbose=False,
                opset_version=opset, input_names=input_names,
                dynamic_axes={k: {0: "batch"} for k in input_names},
            )


def _dynamic_shapes(model: nn.Module, inputs: tuple, batch: Any) -> tuple:
    """Dim 0 of every input is the batch; a FlatInputs wrapper takes them as one ``*flat``."""
    shapes = tuple({0: batch} for _ in inputs)
    return (shapes,) if type(model).__name__ == "FlatInputs" else shapes


def _check_model(path: Path, name: str) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ExportError(f"the ONNX file exported from {name} is not valid ONNX: "
                          f"{one_line(exc, root=True, typed=True)}") from exc


def _tracer_notes(caught: list[warnings.WarningMessage]) -> list[str]:
    notes, seen = [], set()
    for w in caught:
        if w.category.__name__ == "TracerWarning":
            msg = one_line(w.message, limit=200, root=True, typed=True)
            if msg not in seen:
                seen.add(msg)
                notes.append(f"tracer warning: {msg}")
    return notes


@dataclass
class _Log:
    text: str = ""
    warnings: list = field(default_factory=list)


@contextlib.contextmanager
def _captured_output() -> Iterator[_Log]:
    """Swallow what the exporters print: Python- and C-level stdout / stderr and warnings.

    Process-wide while it lasts (file descriptors 1 and 2 point at a temporary file), so
    that neither progress lines nor C++ logging reach the CLI's stdout.
    """
    log = _Log()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    buf = io.StringIO()
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved: list[tuple[int, int]] = []
        try:
            for fd in (1, 2):
                with contextlib.suppress(OSError):
                    saved.append((fd, os.dup(fd)))
                    os.dup2(sink.fileno(), fd)
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf), \
                    warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    yield log
                finally:
                    log.warnings = list(caught)
        finally:
            for fd, dup in saved:
                os.dup2(dup, fd)
                os.close(dup)
            sink.seek(0)
            log.text = buf.getvalue() + sink.read().decode("utf-8", "replace")
            log.text += "".join(
                warnings.formatwarning(w.message, w.category, w.filename, w.lineno)
                for w in log.warnings)


# --------------------------------------------------------------------------- parity


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only; the rest would go to stderr
    # Idle worker threads would otherwise spin and slow down whatever PyTorch runs next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options,
                                providers=["CPUExecutionProvider"])


def _parity(model: nn.Module, path: Path, example: tuple, batch_list: list,
            atol: float, rtol: float) -> ParityResult:
    import onnx
    import torch

    from .calling import tensors

    runs: list[tuple[str, tuple]] = []
    if batch_list:
        runs += [(f"calibration batch {i + 1}", b) for i, b in enumerate(batch_list)]
    else:
        runs.append(("example input", example))
    for size in PARITY_BATCH_SIZES:
        sliced = _resize_batch(example, size)
        if not any(_same(sliced, r) for _, r in runs):
            runs.append((f"batch size {size}", sliced))

    proto = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    del proto
    # All PyTorch references first: onnxruntime's worker threads spin for a while after
    # each run and would starve PyTorch's threads if the two alternated.
    checks = [ParityCheck(label, int(inputs[0].shape[0]), math.inf, math.inf, False)
              for label, inputs in runs]
    references: list[list[torch.Tensor] | None] = []
    with torch.no_grad(), _captured_output():
        for check, (label, inputs) in zip(checks, runs):
            try:
                references.append([t.detach().cpu() for t in tensors(model(*inputs))])
            except Exception as exc:
                if label.startswith("calibration"):
                    from .errors import DataError

                    raise DataError(f"{label} (shape {_shapes(inputs)}) does not fit "
                                    f"{type(model).__name__}: {one_line(exc, root=True, typed=True)}") from exc
                # a model that cannot run this batch size at all cannot have a file that does
                check.error = f"the PyTorch model fails at this batch size: {one_line(exc, root=True, typed=True)}"
                references.append(None)
    n_outputs = next((len(r) for r in references if r is not None), 0)
    notes: list[str] = []
    with _captured_output():
        try:
            session = _session(path)
        except Exception as exc:
            session = None
            notes.append(f"onnxruntime cannot load the file: {one_line(exc, root=True, typed=True)}")
        for check, (_, inputs), reference in zip(checks, runs, references):
            if reference is None:
                continue
            if session is None:
                check.error = "onnxruntime cannot load the file"
                continue
            try:
                got = _run_session(session, inputs)
            except Exception as exc:
                check.error = f"onnxruntime failed: {one_line(exc, root=True, typed=True)}"
                continue
            _compare(check, got, reference, atol, rtol)
        del session  # free its threads and memory now
    return ParityResult(
        output=str(path), model=type(model).__name__,
        max_abs_diff=max((c.max_abs_diff for c in checks), default=math.inf),
        max_rel_diff=max((c.max_rel_diff for c in checks), default=math.inf),
        passed=bool(checks) and all(c.passed for c in checks),
        atol=atol, rtol=rtol, batch_sizes=sorted({c.batch_size for c in checks}),
        outputs=n_outputs, opset=opset, exporter=None, file_size=path.stat().st_size,
        checks=checks, notes=notes,
    )


def _shapes(inputs: tuple) -> str:
    return ", ".join(str(list(t.shape)) for t in inputs)


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and bool((x == y).all()) for x, y in zip(a, b))


def _run_session(session, inputs: tuple) -> list[np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise ValueError(f"the file takes {len(names)} inputs, the model {len(inputs)}")
    feed = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)}
    return session.run(None, feed)


def _compare(check: ParityCheck, got: Sequence[np.ndarray], reference: list[torch.Tensor],
             atol: float, rtol: float) -> None:
    """Fill ``check`` with the largest differences over all outputs and the allclose verdict."""
    import numpy as np

    if len(got) != len(reference):
        check.error = f"the file has {len(got)} outputs, the model {len(reference)}"
        return
    max_abs = max_rel = 0.0
    ok = True
    for i, (a, ref) in enumerate(zip(got, reference)):
        b = ref.numpy()
        if a.shape != b.shape:
            check.error = (f"output {i}: shape {list(a.shape)} from onnxruntime, "
                           f"{list(b.shape)} from torch")
            return
        a64, b64 = np.atleast_1d(a.astype(np.float64)), np.atleast_1d(b.astype(np.float64))
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.abs(a64 - b64)
            both_nan = np.isnan(a64) & np.isnan(b64)
            diff[both_nan] = 0.0
            # matching infinities subtract to NaN: equal, like allclose's equal_nan
            diff[(a64 == b64)] = 0.0
            diff[np.isnan(diff)] = np.inf
            finite = np.abs(b64[np.isfinite(b64)])
            floor = max(REL_FLOOR * (float(finite.max()) if finite.size else 0.0),
                        float(np.finfo(np.float32).tiny))
            rel = diff / np.maximum(np.abs(b64), floor)
            rel[np.isnan(rel)] = np.inf
        if diff.size:
            max_abs = max(max_abs, float(diff.max()))
            max_rel = max(max_rel, float(rel.max()))
        ok = ok and bool(np.allclose(a64, b64, rtol=rtol, atol=atol, equal_nan=True))
    check.max_abs_diff, check.max_rel_diff, check.passed = max_abs, max_rel, ok
