"""File-level functions: one per command. Each takes paths and options, loads, runs, saves
the result in the input's own form, and returns the report.

These are what the command line runs (``varshift <command>`` is parse -> one of these ->
render), and what a Python user calls to fix a *file* rather than a module in memory::

    rep = varshift.recalibrate_file("model.pt", "calib.pt", "fixed.pt", exact=True)
    rep = varshift.swap_file("ckpt.pt", "swapped.pt", arch="net.py:build", data="calib.pt")

Nothing here prints. Bad input raises a :class:`~varshift.errors.VarshiftError` before any
output is written; every output path is checked up front and written atomically through
:mod:`varshift.io.atomic` (one place), and never replaces an input file.

Each function builds option objects from its keyword arguments (:mod:`varshift.options`:
:class:`~varshift.options.ModelSpec`, :class:`~varshift.options.DataSpec`,
:class:`~varshift.options.CallSpec`, :class:`~varshift.options.RunSpec`) and hands them to
its ``run_*`` twin, which is what the command line calls with the objects its option groups
build.

Shared arguments (all keyword-only):

* model options: ``arch`` (``pkg.module:fn`` or ``file.py:fn``, builds the module for a
  state dict), ``arch_args`` (a dict, or its JSON text), ``trust`` (full unpickling; trusted
  files only). Defaults: None, None, False.
* data options: ``batch_size`` (64, for file data), ``max_batches`` (None: all),
  ``max_samples`` (None: all; the last batch cut), ``labels`` (``"auto"``; how tuple batches
  split), ``device`` (``"auto"``: CUDA when available, else CPU; or ``"cpu"``, ``"cuda"``,
  ``"cuda:K"``, a ``torch.device``).
* ``progress``: ``progress(batches_done, total_or_None)``, called while data streams.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ._types import Progress
from .errors import VarshiftError
from .options import CallSpec, DataSpec, ModelSpec, PathLike, RecalibrateOptions, RunSpec, check_threshold

if TYPE_CHECKING:
    import torch

    from .io.loading import LoadedModel
    from .measure.distributed import Dist
    from .report.results import ParityResult, ProbeReport, RecalibrationReport, ScanReport, SwapReport

__all__ = ["scan_file", "probe_file", "recalibrate_file", "swap_file", "export_file",
           "run_scan", "run_probe", "run_recalibrate", "run_swap", "run_export", "Outputs",
           "Example", "SwapOptions", "parse_shape", "resolve_device", "check_threshold",
           "DEFAULT_THRESHOLD", "PathLike"]

#: The shift at or above which a layer counts as shifted (probe's and recalibrate's default
#: ``fail_above``): the same line the reports' verdicts draw.
DEFAULT_THRESHOLD = 1.1


# --------------------------------------------------------------------------- parsing helpers


def parse_shape(shape: str | tuple[int, ...] | list[int] | None) -> tuple[int, ...] | None:
    """``"1,3,224,224"`` (or a tuple) -> ``(1, 3, 224, 224)``; None stays None.

    Raises:
        VarshiftError: not a list of positive integers.
    """
    if shape is None:
        return None
    if isinstance(shape, str):
        try:
            dims = tuple(int(s) for s in shape.split(",") if s.strip() != "")
        except ValueError:
            dims = ()
    else:
        dims = tuple(int(d) for d in shape)
    if not dims or any(d <= 0 for d in dims):
        raise VarshiftError(
            f"`input_shape` {shape!r} must be comma-separated positive integers, e.g. 1,3,224,224"
        )
    return dims


def resolve_device(device: "str | torch.device | None" = "auto") -> "torch.device":
    """``"auto"`` (or None) -> CUDA when available, else CPU; ``"cuda"`` must be available."""
    import torch

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise VarshiftError(f"`device` {device!r} is not a device; use cpu, cuda or auto") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VarshiftError("`device='cuda'`: CUDA is not available here; use `device='cpu'` "
                            "or auto")
    return dev


def _check_outputs(inputs: tuple, *outputs: tuple[str, PathLike | None]) -> None:
    """Before any work: every output path is writable (a file is created and removed next
    to it), is none of the files the run reads (``inputs``: paths and ``file.py:fn`` /
    ``pkg.module:fn`` specs, through symlinks and hard links), and no two outputs are the same
    file. See :func:`varshift._io.check_outputs`. Under torchrun only rank 0 checks: it alone
    writes (its node may be the only one that has the output folder)."""
    from .io.atomic import check_outputs
    from .measure.distributed import env_rank

    if env_rank() == 0:
        check_outputs(inputs, *outputs)


def _outputs_together(fn: Callable) -> Callable:
    """Run ``fn`` in one output transaction: the files it writes are staged and renamed
    together at the end, or all removed when it fails (see :func:`varshift._io.transaction`)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .io.atomic import transaction

        with transaction():
            return fn(*args, **kwargs)

    return wrapper


def _start(run: RunSpec) -> "tuple[torch.device, Dist]":
    """``(device, Dist)``: under torchrun, the process group is started first (so that a
    failure on one rank reaches every rank) and CUDA means ``cuda:LOCAL_RANK`` (see
    :func:`varshift.measure.distributed.join`); otherwise one process, ``device`` as resolved.
    The group is left in ``run.session`` for the caller to end."""
    from .measure.distributed import join

    d, dev = join(resolve_device(run.device), run.backend)
    if run.session is not None and d.active:
        run.session.dist = d
    return dev, d


def _shard(cal, d):
    from .measure.distributed import shard_data

    return None if cal is None else shard_data(cal, d)


def _model(spec: ModelSpec) -> "LoadedModel":
    from .io.loading import load_model, parse_arch_args

    args = spec.arch_args
    if isinstance(args, str) or args is None:
        args = parse_arch_args(args)
    return load_model(spec.path, arch=spec.arch, arch_args=args, trust=spec.trust)


def _data(spec: DataSpec, source: PathLike | None = None) -> Any:
    """The :class:`~varshift.io.data.Calibration` of ``spec``; of ``source`` instead when given,
    read whole with the same batch size (held-out data is scored in full)."""
    from .io.data import load_data

    if source is not None:
        return load_data(source, batch_size=spec.batch_size, max_batches=None)
    return load_data(spec.source, batch_size=spec.batch_size, max_batches=spec.max_batches,
                     max_samples=spec.max_samples)


def _sharding(cal, d) -> list[str]:
    """The report's note on how the ranks split the data (none in one process)."""
    from .measure.distributed import sharding_note

    note = sharding_note(cal, d)
    return [note] if note else []


def _first_batch(batches) -> Any:
    """The first batch of DATA, whole (as the source produced it)."""
    for batch in batches:
        return batch.raw
    raise VarshiftError("DATA yielded no batches")


def _onnx(module, out: PathLike | None, batches, labels: str = "auto") -> "ParityResult | None":
    if not out:
        return None
    from .export import export_onnx

    return export_onnx(module, out, batches=batches, labels=labels)


@dataclass(frozen=True)
class Outputs:
    """Where a command writes: the result (``output``), its ONNX export (``onnx``) and the
    rendered report (``report``: only checked here; the caller renders and writes it)."""

    output: PathLike | None = None
    onnx: PathLike | None = None
    report: PathLike | None = None

    def check(self, *reads: Any) -> None:
        """Before any work: every output writable, none of them an input (``reads``)."""
        _check_outputs(tuple(r for r in reads if r is not None), ("`output`", self.output),
                       ("`onnx`", self.onnx), ("`report`", self.report))


@dataclass(frozen=True)
class Example:
    """An example input built from a shape (``input_shape``: ``"1,3,224,224"`` or a tuple),
    random with ``seed``; ``shape`` is None when there is none."""

    input_shape: str | tuple[int, ...] | None = None
    seed: int = 0

    @property
    def shape(self) -> tuple[int, ...] | None:
        return parse_shape(self.input_shape)

    def build(self, module: Any) -> Any:
        """The example tensor for ``module`` (None without a shape)."""
        if self.shape is None:
            return None
        from .io.inputs import example_input

        return example_input(module, self.shape, seed=self.seed)


@dataclass(frozen=True)
class SwapOptions:
    """What :func:`swap_file` replaces: every regularizer that reaches a norm, by ``to``
    (only ``uout``) with noise half-width ``beta``, traced on ``example`` when given."""

    to: str = "uout"
    beta: float = 0.1
    example: Example = Example()


# --------------------------------------------------------------------------- commands


@_outputs_together
def scan_file(
    model: PathLike,
    *,
    arch: str | None = None,
    arch_args: dict | str | None = None,
    trust: bool = False,
    input_shape: str | tuple[int, ...] | None = None,
    data: PathLike | None = None,
    call: str | None = None,
    labels: str = "auto",
    fail_on: str = "error",
    report: PathLike | None = None,
) -> "ScanReport":
    """Load ``model`` and scan its dataflow graph (``varshift scan``).

    Args:
        input_shape: an example input shape (``"1,3,224,224"``): traces models that torch.fx
            cannot (default None: fx only).
        data: trace with the first batch of this data instead (models that need real inputs:
            integer ids, several inputs, labels in training mode).
        call: ``pkg.module:fn`` / ``file.py:fn`` that runs the model on a batch (with
            ``data``): ``fn(model, batch)``.
        labels: how tuple batches split: ``auto``, ``none`` or ``last``.
        fail_on: ``bool(report)`` is False when a finding reaches this severity (``error``,
            the default; ``warning``; ``never``).
        report: only checked here (it must not be an input and must be writable); the caller
            renders and writes it (default None).
    """
    return run_scan(ModelSpec(model, arch=arch, arch_args=arch_args, trust=trust), CallSpec(call=call, labels=labels),
                    Example(input_shape), data, fail_on, Outputs(report=report))


def run_scan(model: ModelSpec, how: CallSpec, example: Example, data: PathLike | None,
             fail_on: str, outputs: Outputs) -> "ScanReport":
    """:func:`scan_file` with its options as objects."""
    from .options import FailOn, choice
    from .rules import scan

    gate = choice(FailOn, fail_on, "fail_on")
    if example.shape and data:
        raise VarshiftError("`input_shape` and `data` both give the example input; pass one")
    outputs.check(*model.reads(), data, how.call)
    loaded = _model(model)
    x = example.build(loaded.module) if example.shape else None
    if data:
        x = _first_batch(_data(DataSpec(data, max_batches=1)))
    rep = scan(loaded.module, x, call=how.call, labels=how.labels, fail_on=gate)
    return dataclasses.replace(rep, source=str(model.path), notes=loaded.notes + rep.notes)


@_outputs_together
def probe_file(
    model: PathLike,
    data: PathLike,
    *,
    arch: str | None = None,
    arch_args: dict | str | None = None,
    trust: bool = False,
    batch_size: int = 64,
    max_batches: int | None = None,
    max_samples: int | None = None,
    call: str | None = None,
    labels: str = "auto",
    seed: int = 0,
    device: "str | torch.device | None" = "auto",
    fail_above: float = DEFAULT_THRESHOLD,
    report: PathLike | None = None,
    progress: Progress | None = None,
    backend: str | None = None,
) -> "ProbeReport":
    """Load ``model`` and ``data`` and measure every BatchNorm's shift (``varshift probe``).

    Args:
        seed: seeds the train-mode pass (dropout masks); default 0.
        fail_above: ``bool(report)`` is False when a layer's shift reaches it (default 1.1;
            ``float("inf")``: never).
        report: only checked here (see :func:`scan_file`).
        backend: the torch.distributed backend under torchrun (default: NCCL for CUDA, else
            gloo); each rank then measures its shard and every rank returns the merged report.
    """
    return run_probe(ModelSpec(model, arch=arch, arch_args=arch_args, trust=trust),
                     DataSpec(data, batch_size=batch_size, max_batches=max_batches,
                 max_samples=max_samples),
                     CallSpec(call=call, labels=labels), RunSpec(device=device, backend=backend, progress=progress),
                     seed, fail_above, Outputs(report=report))


def run_probe(model: ModelSpec, data: DataSpec, how: CallSpec, run: RunSpec, seed: int,
              fail_above: float, outputs: Outputs) -> "ProbeReport":
    """:func:`probe_file` with its options as objects."""
    check_threshold(fail_above)
    dev, d = _start(run)
    outputs.check(*model.reads(), data.source, how.call)
    loaded = _model(model)
    batches = _shard(_data(data), d)
    from .measure.probing import probe

    rep = probe(loaded.module.to(dev), batches, seed=seed, device=dev, progress=run.progress,
                threshold=fail_above, call=how.call, labels=how.labels)
    return dataclasses.replace(rep, source=str(model.path),
                               notes=loaded.notes + rep.notes + _sharding(batches, d))


@_outputs_together
def recalibrate_file(
    model: PathLike,
    data: PathLike,
    output: PathLike,
    *,
    exact: bool = False,
    cache_mb: float | None = None,
    all_norms: bool = False,
    eval_data: PathLike | None = None,
    onnx: PathLike | None = None,
    include_frozen: bool = False,
    arch: str | None = None,
    arch_args: dict | str | None = None,
    trust: bool = False,
    batch_size: int = 64,
    max_batches: int | None = None,
    max_samples: int | None = None,
    call: str | None = None,
    labels: str = "auto",
    output_key: str | None = None,
    device: "str | torch.device | None" = "auto",
    fail_above: float = DEFAULT_THRESHOLD,
    max_accuracy_drop: float | None = None,
    report: PathLike | None = None,
    progress: Progress | None = None,
    backend: str | None = None,
) -> "RecalibrationReport":
    """Recalibrate the model in file ``model`` on ``data`` and write it to ``output`` in the
    input's own form (``varshift recalibrate``).

    A whole-module pickle is written as one; a checkpoint keeps its keys and layout, with only
    the recalibrated BatchNorm buffers changed (on the CPU).

    Args:
        exact: the exact (inference-path) estimator instead of the population one.
        cache_mb: with ``exact``, the memory (MiB) for the activations it keeps between norms
            (default None: half the available memory); beyond it they are spilled to a
            temporary directory.
        all_norms: recalibrate every BatchNorm, not only the affected ones.
        eval_data: held-out labelled data for accuracy and NLL before/after (default: none,
            metrics are then on the calibration data).
        onnx: also export the result there and check parity in onnxruntime.
        include_frozen: also recalibrate frozen norms (``FrozenBatchNorm2d``, ``momentum=0``).
        call, labels: how the model is called on a batch (see :func:`probe_file`).
        output_key: the output that holds the logits for the metrics (default: ``logits``,
            else the first tensor).
        fail_above: ``bool(report)`` is False when a recalibrated layer's shift afterwards
            reaches it (default 1.1).
        max_accuracy_drop: ``bool(report)`` is False when accuracy falls by more than this
            many percentage points (default None: no guard).
        report: only checked here (see :func:`scan_file`).
        backend: under torchrun (see :func:`probe_file`); only rank 0 writes ``output`` and
            ``onnx``, and every rank holds the same statistics.
    """
    check_threshold(fail_above)
    return run_recalibrate(
        ModelSpec(model, arch=arch, arch_args=arch_args, trust=trust),
        DataSpec(data, batch_size=batch_size, max_batches=max_batches,
                 max_samples=max_samples),
        RecalibrateOptions(exact=exact, cache_mb=cache_mb, all_norms=all_norms,
                           include_frozen=include_frozen, threshold=fail_above,
                           max_accuracy_drop=max_accuracy_drop),
        CallSpec(call=call, labels=labels, output_key=output_key),
        RunSpec(device=device, backend=backend, progress=progress),
        eval_data, Outputs(output=output, onnx=onnx, report=report))


def run_recalibrate(model: ModelSpec, data: DataSpec, fix: RecalibrateOptions, how: CallSpec,
                    run: RunSpec, eval_data: PathLike | None,
                    outputs: Outputs) -> "RecalibrationReport":
    """:func:`recalibrate_file` with its options as objects (``outputs.output`` required)."""
    check_threshold(fix.threshold)
    dev, d = _start(run)
    outputs.check(*model.reads(), data.source, eval_data, how.call)
    loaded = _model(model)
    batches = _shard(_data(data), d)
    held_out = _shard(_data(data, eval_data) if eval_data else None, d)
    from .fix.recalibration import recalibrate
    from .io.saving import norm_buffer_keys, save_like

    fixed, rep = recalibrate(
        loaded.module.to(dev), batches, exact=fix.exact, cache_mb=fix.cache_mb,
        all_norms=fix.all_norms, inplace=True, eval_batches=held_out, device=dev,
        progress=run.progress, threshold=fix.threshold, call=how.call, labels=how.labels,
        output_key=how.output_key, include_frozen=fix.include_frozen,
        max_accuracy_drop=fix.max_accuracy_drop,
    )
    fixed = fixed.cpu()
    rep = dataclasses.replace(rep, source=str(model.path),
                              notes=loaded.notes + rep.notes + _sharding(batches, d))
    if not d.is_main:
        return rep
    assert outputs.output is not None
    changed = norm_buffer_keys([layer.name for layer in rep.recalibrated], fixed)
    save_like(loaded, fixed, outputs.output, changed)
    return dataclasses.replace(rep, output=str(outputs.output),
                               onnx=_onnx(fixed, outputs.onnx, batches, how.labels))


@_outputs_together
def swap_file(
    model: PathLike,
    output: PathLike,
    *,
    to: str = "uout",
    beta: float = 0.1,
    data: PathLike | None = None,
    exact: bool = False,
    cache_mb: float | None = None,
    eval_data: PathLike | None = None,
    onnx: PathLike | None = None,
    input_shape: str | tuple[int, ...] | None = None,
    seed: int = 0,
    arch: str | None = None,
    arch_args: dict | str | None = None,
    trust: bool = False,
    batch_size: int = 64,
    max_batches: int | None = None,
    max_samples: int | None = None,
    call: str | None = None,
    labels: str = "auto",
    output_key: str | None = None,
    device: "str | torch.device | None" = "auto",
    report: PathLike | None = None,
    progress: Progress | None = None,
    backend: str | None = None,
) -> "SwapReport":
    """Swap the regularizers that reach a BatchNorm for Uout in file ``model`` and write the
    whole swapped module to ``output`` (``varshift swap``).

    Args:
        data: also recalibrate the swapped model on this data (default None: BatchNorm keeps
            its statistics until the model is fine-tuned).
        exact: recalibrate with the exact estimator (needs ``data``).
        cache_mb: the exact estimator's memory budget (see :func:`recalibrate_file`).
        eval_data: held-out data for the recalibration's metrics (needs ``data``).
        onnx: also export the result there and check parity (needs ``data`` or
            ``input_shape`` for the inputs it checks).
        input_shape: an example input shape for tracing (and for the ONNX check).
        seed: seeds the random example input built from ``input_shape`` (default 0).
        call, labels, output_key: see :func:`recalibrate_file`.
        report: only checked here (see :func:`scan_file`).
        backend: under torchrun (see :func:`recalibrate_file`).
    """
    return run_swap(
        ModelSpec(model, arch=arch, arch_args=arch_args, trust=trust),
        SwapOptions(to=to, beta=beta, example=Example(input_shape, seed=seed)),
        DataSpec(data, batch_size=batch_size, max_batches=max_batches,
                 max_samples=max_samples) if data else None,
        eval_data, RecalibrateOptions(exact=exact, cache_mb=cache_mb),
        CallSpec(call=call, labels=labels, output_key=output_key),
        RunSpec(device=device, backend=backend, progress=progress),
        Outputs(output=output, onnx=onnx, report=report))


def run_swap(model: ModelSpec, swap: SwapOptions, data: DataSpec | None,
             eval_data: PathLike | None, fix: RecalibrateOptions, how: CallSpec, run: RunSpec,
             outputs: Outputs) -> "SwapReport":
    """:func:`swap_file` with its options as objects (``outputs.output`` required)."""
    shape = swap.example.shape
    dev, d = _start(run)
    outputs.check(*model.reads(), data.source if data else None, eval_data, how.call)
    if eval_data and not data:
        raise VarshiftError("`eval_data` needs `data` (it measures the recalibration)")
    if outputs.onnx and not (data or shape):
        raise VarshiftError("`onnx` needs `data` or `input_shape` to build the inputs it checks")
    loaded = _model(model)
    batches = _shard(_data(data) if data else None, d)
    held_out = _shard(_data(data, eval_data) if data and eval_data else None, d)
    from .fix.swapping import swap as swap_model
    from .io.atomic import write_with

    example = swap.example.build(loaded.module)
    if example is not None:
        from .io.inputs import check_example

        check_example(loaded.module, example)  # swap's fx trace would not run it
    if example is None and batches is not None:
        # the whole first batch: the calling convention casts it as every command does
        example = _first_batch(batches)
    swapped, rep = swap_model(loaded.module, to=swap.to, beta=swap.beta, inplace=True,
                              example_input=example, call=how.call, labels=how.labels)
    if batches is not None:
        from .fix.recalibration import recalibrate

        swapped, recalibration = recalibrate(
            swapped.to(dev), batches, exact=fix.exact, cache_mb=fix.cache_mb, inplace=True,
            eval_batches=held_out, device=dev, progress=run.progress, call=how.call,
            labels=how.labels, output_key=how.output_key,
        )
        rep = dataclasses.replace(rep, recalibration=recalibration)
        swapped = swapped.cpu()
    notes = loaded.notes + rep.notes + (_sharding(batches, d) if batches is not None else [])
    if loaded.form != "module":
        notes.append(
            f"{model.path} is a checkpoint, which cannot carry new layers: the output is a whole "
            "module; to keep training from a checkpoint, build the model with varshift.Uout in "
            "place of the swapped layers"
        )
    if rep.graph_module or loaded.form != "module":
        notes.append("loading the output needs `trust=True` (it holds code or classes beyond "
                     "torch.nn)")
    rep = dataclasses.replace(rep, source=str(model.path), notes=notes,
                              remedy="pass `data` to recalibrate them now")
    if not d.is_main:
        return rep
    import torch

    assert outputs.output is not None
    write_with(outputs.output, lambda tmp: torch.save(swapped, tmp))
    checked = batches if batches is not None else [example]
    return dataclasses.replace(rep, output=str(outputs.output),
                               onnx=_onnx(swapped, outputs.onnx, checked, how.labels))


@_outputs_together
def export_file(
    model: PathLike,
    output: PathLike,
    *,
    data: PathLike | None = None,
    input_shape: str | tuple[int, ...] | None = None,
    seed: int = 0,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    arch: str | None = None,
    arch_args: dict | str | None = None,
    trust: bool = False,
    batch_size: int = 64,
    max_batches: int | None = None,
    max_samples: int | None = None,
    labels: str = "auto",
    report: PathLike | None = None,
) -> "ParityResult":
    """Export the model in file ``model`` to ONNX at ``output`` and check parity in
    onnxruntime (``varshift export``). The export always runs on the CPU.

    Args:
        data: check parity on these batches (or give ``input_shape``).
        input_shape: the shape of a random example input when there is no ``data``.
        seed: seeds that random example input (default 0).
        atol, rtol: the parity tolerance (defaults 1e-4, 1e-3).
        labels: how tuple batches split (``auto``, ``none``, ``last``).
        report: only checked here (see :func:`scan_file`).
    """
    return run_export(ModelSpec(model, arch=arch, arch_args=arch_args, trust=trust),
                      DataSpec(data, batch_size=batch_size, max_batches=max_batches,
                 max_samples=max_samples) if data else None,
                      Example(input_shape, seed=seed), (atol, rtol), CallSpec(labels=labels),
                      Outputs(output, report=report))


def run_export(model: ModelSpec, data: DataSpec | None, example: Example,
               tolerance: tuple[float, float], how: CallSpec, outputs: Outputs) -> "ParityResult":
    """:func:`export_file` with its options as objects; ``tolerance`` is ``(atol, rtol)``;
    only ``how.labels`` matters (the export calls the model itself)."""
    atol, rtol = tolerance
    if not data and not example.shape:
        raise VarshiftError("export needs `data` or `input_shape` (e.g. 1,3,224,224) "
                            "to build the inputs it checks")
    if atol < 0 or rtol < 0:
        raise VarshiftError(f"`atol` and `rtol` must be >= 0, got {atol} and {rtol}")
    outputs.check(*model.reads(), data.source if data else None)
    loaded = _model(model)
    batches = _data(data) if data else None
    from .export import export_onnx

    assert outputs.output is not None

    rep = export_onnx(loaded.module, outputs.output, example.build(loaded.module),
                      batches=batches, atol=atol, rtol=rtol,
                      labels=how.labels)
    return dataclasses.replace(rep, source=str(model.path))
