"""Recompute BatchNorm running statistics with every regularizer off.

Two estimators (docs/concepts.md, "Estimators"):

* ``population`` (default): one pass with the model in eval mode (regularizers off) except the
  norms, which normalize with batch statistics as in training. Each target norm's new
  statistics are the exact population mean and unbiased variance of its input over the whole
  calibration set, merged in float64 from the batch statistics BatchNorm computes anyway (read,
  not recomputed). ``torch.optim.swa_utils.update_bn`` instead leaves dropout on and averages
  per-batch variances.
* ``exact``: each target norm's statistics are the population statistics of its input on the
  *inference path*, with every upstream norm already in eval mode with its new statistics.
  Afterwards the shift of every recalibrated norm, measured on the same data, is 1. Two paths
  compute the same statistics:

  - ``frontier`` (:mod:`varshift.fix.frontier`): the model's eval-mode torch.fx graph runs over all
    batches at once, cut before each target norm; about one forward pass of work, with the
    values alive at the cut kept within ``cache_mb`` (spilled to a temporary directory beyond).
  - ``levels``: norms are grouped into dependency levels (a norm's level is one more than the
    deepest target norm upstream of it); one pass per level, and a pass stops as soon as the
    last norm of its level has run. For models fx cannot trace, or whose norms run more than
    once per forward.
"""


from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn as nn

from .._torch_utils import check_materialized
from .._types import Progress
from ..io.data import as_batches
from ..measure.context import Context, Prepared, entering, prepare
from ..measure.metrics import MetricSums, measure_eval, metrics_on, shift_of
from ..measure.norms import InputStats, per_process_norms
from ..options import CallSpec, ExactPath, RecalibrateOptions
from ..report.results import ExactInfo, LayerFix, Metrics, RecalibrationReport
from .exact import EXACT_PATHS, dependency_levels, exact, exact_levels
from .population import Job, population, write_norm

__all__ = ["recalibrate", "dependency_levels", "measure_eval", "metrics_on", "EXACT_PATHS",
           "MetricSums", "exact_levels", "write_norm"]


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    exact: bool = False,
    all_norms: bool = False,
    *,
    inplace: bool = False,
    eval_batches: Iterable[Any] | None = None,
    measure: bool = True,
    threshold: float = 1.1,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
    cache_mb: float | None = None,
    exact_path: str = "auto",
    process_group: Any = None,
    call: Any = None,
    labels: str = "auto",
    output_key: str | None = None,
    max_samples: int | None = None,
    include_frozen: bool = False,
    max_accuracy_drop: float | None = None,
) -> tuple[nn.Module, RecalibrationReport]:
    """Recompute the running statistics of the affected norms with every regularizer off.

    Args:
        model: the trained model. Untouched unless ``inplace=True``; a deep copy is fixed.
        batches: calibration inputs: an iterable of tensors or ``(inputs, labels)`` pairs.
        exact: use the exact (inference-path) estimator instead of the population one.
        all_norms: recalibrate every norm, not only those an active regularizer reaches.
        inplace: fix ``model`` itself instead of a copy.
        eval_batches: held-out ``(inputs, labels)`` for accuracy and NLL before/after
            (default: the calibration batches, reported as not held out).
        measure: measure per-layer shifts and metrics before and after (two extra eval
            passes each); ``False`` runs only the estimator.
        threshold: ``bool(report)`` is False when a recalibrated layer's shift afterwards
            reaches it.
        device: where the batches go (default: the model's device, where the model must be).
        progress: called as ``progress(batches_done, total_or_None)``.
        cache_mb: with ``exact``, the memory (MiB) the frontier's kept activations may use;
            beyond it they are spilled to a temporary directory, removed afterwards
            (default: half the memory available when the run starts; 0 spills everything).
        exact_path: ``"auto"`` (the frontier where the model allows it, else one pass per
            dependency level), ``"frontier"`` (refuse a model it cannot handle) or
            ``"levels"`` (always one pass per level).
        process_group: run across the ranks of this torch.distributed group, each with its
            own ``batches`` (and ``eval_batches``): statistics and metrics are merged exactly
            once per pass (the exact estimator: once per norm), and every rank ends with
            bit-identical buffers and the same report. Default: the initialized default
            group, if any; ``False``: this process alone. A ``DistributedDataParallel``
            wrapper is unwrapped (its module is fixed).
        call: ``fn(model, batch)`` returning the output or ``(output, labels)`` (or a
            ``pkg.module:fn`` string); default: the rules of :mod:`varshift.calling`.
        labels: ``"auto"``, ``"none"`` or ``"last"``: how tuple batches split.
        output_key: the output the metrics read (default: ``logits``, else the first tensor).
        max_samples: use at most this many calibration samples (the last batch cut).
        include_frozen: also recalibrate frozen norms (``FrozenBatchNorm2d``, ``momentum=0``),
            which are left alone by default because training never updates them
            (``all_norms`` includes them too).
        max_accuracy_drop: ``bool(report)`` is False when accuracy falls by more than this
            many percentage points (default None: no guard).

    Returns:
        ``(fixed_model, report)``. ``num_batches_tracked`` of each recalibrated norm is the
        number of calibration batches (as after ``update_bn``); momentum is unchanged.
    """
    opts = RecalibrateOptions(
        exact=exact, exact_path=exact_path, cache_mb=cache_mb, all_norms=all_norms,
        include_frozen=include_frozen, measure=measure, threshold=threshold,
        max_accuracy_drop=max_accuracy_drop)
    how = CallSpec(call=call, labels=labels, output_key=output_key)
    with entering(model, process_group=process_group, device=device,
                  progress=progress) as (module, ctx):
        check_materialized(module)  # a lazy module cannot even be copied
        fixed = module if inplace else copy.deepcopy(module)
        return fixed, _recalibrate(fixed, Inputs(batches, eval_batches=eval_batches,
                                                 max_samples=max_samples), opts,
                                   how, ctx, type(module).__name__)


@dataclass(frozen=True)
class Inputs:
    """The data of one recalibration: calibration batches, held-out batches (or None), and
    the calibration sample budget."""

    batches: Iterable[Any]
    eval_batches: Iterable[Any] | None = None
    max_samples: int | None = None


def _recalibrate(fixed: nn.Module, data: Inputs, opts: RecalibrateOptions, how: CallSpec,
                 ctx: Context, model_name: str) -> RecalibrationReport:
    """Recalibrate ``fixed`` in place; its report."""
    # The population estimator alone reads the data once: stream it (a generator is not
    # materialized). Measuring and the exact estimator need several passes.
    single_pass = not opts.exact and not opts.measure
    prep = prepare(fixed, data.batches, how, ctx, once=single_pass, max_samples=data.max_samples)
    targets = choose_targets(prep, opts)
    notes = target_notes(prep, targets, opts)
    held_out = data.eval_batches is not None
    evaluation = as_batches(data.eval_batches) if data.eval_batches is not None else prep.cal
    why_no_metrics: list[str] = []  # held-out data that cannot be scored is said, not dropped
    before = _Measured.take(fixed, prep, ctx, evaluation if held_out else None, why_no_metrics) \
        if opts.measure else None
    snapshot = {name: _means(m) for name, m in prep.norms.items()}
    passes = n_batches = 0
    exact_info: ExactInfo | None = None
    if targets:
        job = Job(fixed, prep.norms, targets, prep.caller.prepare, ctx)
        with per_process_norms(prep.norms):
            if opts.exact:
                passes, n_batches, exact_info = exact(job, prep.cal, prep.graph,
                                                      ExactPath(opts.exact_path), opts.cache_mb)
                notes.append(exact_info.note())
            else:
                data_pass = prep.cal if opts.measure else prep.stream
                passes, n_batches = population(job, data_pass, getattr(prep.cal, "n_batches", None))
    after = _Measured.take(fixed, prep, ctx, evaluation if held_out else None) \
        if opts.measure else None
    notes += _metric_notes(why_no_metrics, evaluation, before, held_out)
    return RecalibrationReport(
        model=model_name,
        estimator=opts.estimator,
        layers=_layers(prep.norms, set(targets), snapshot, before, after),
        before=before.metrics if before else None,
        after=after.metrics if after else None,
        passes=passes,
        batches=n_batches,
        samples=ctx.dist.sum_counts({"n": getattr(prep.cal, "samples", None) or 0})["n"],
        threshold=opts.threshold,
        max_accuracy_drop=opts.max_accuracy_drop,
        notes=notes,
        data=getattr(prep.cal, "source", None),
        eval_data=getattr(evaluation, "source", None) if held_out else None,
        exact=exact_info,
    )


def choose_targets(prep: Prepared, opts: RecalibrateOptions) -> list[str]:
    """The norms to recalibrate, in the scan's order: those an active regularizer reaches
    (every norm with ``all_norms``); frozen norms are never affected (training cannot have
    shifted them), so only on request."""
    targets = [n.name for n in prep.scan.norms
               if opts.all_norms or n.affected or (opts.include_frozen and n.frozen)]
    return [t for t in targets if t in prep.norms]


def target_notes(prep: Prepared, targets: list[str], opts: RecalibrateOptions) -> list[str]:
    """What the report says about the choice of targets."""
    notes: list[str] = []
    always_on = [r.name for r in prep.scan.regularizers if r.always_on]
    if always_on:
        notes.append(
            f"{', '.join(always_on)} {'stays' if len(always_on) == 1 else 'stay'} active in eval "
            "mode and cannot be switched off; its noise is part of the recalibrated statistics"
        )
    if not targets and not prep.norms:
        notes.append("the model has no BatchNorm layer with running statistics; nothing to "
                     "recalibrate")
    elif not targets and opts.all_norms:
        notes.append("no BatchNorm layer ran on this data; nothing was recalibrated")
    elif not targets:
        notes.append(
            "no BatchNorm layer is reached by an active regularizer; nothing to recalibrate "
            "(use `all_norms=True` to recalibrate every BatchNorm)"
        )
    return notes


@dataclass
class _Measured:
    """One measurement of the model: every norm's eval-mode input moments, and metrics."""

    stats: InputStats
    metrics: Metrics | None

    @classmethod
    def take(cls, model: nn.Module, prep: Prepared, ctx: Context, held_out: Any,
             why: list[str] | None = None) -> "_Measured":
        """On the calibration data; the metrics on ``held_out`` instead when given."""
        stats, metrics = measure_eval(model, prep.cal, prep.caller, prep.norms, ctx.dist)
        if held_out is not None:
            metrics = metrics_on(model, held_out, prep.caller, ctx.dist, why=why)
        return cls(stats, metrics)


def _means(m: nn.Module) -> tuple[float, float]:
    return (m.running_mean.detach().double().mean().item(),
            m.running_var.detach().double().mean().item())


def _layers(norms: dict[str, nn.Module], targets: set[str],
            snapshot: dict[str, tuple[float, float]], before: _Measured | None,
            after: _Measured | None) -> list[LayerFix]:
    """One row per norm, in execution order (the module order when nothing was measured)."""
    rows = []
    for name in before.stats.order if before is not None else list(norms):
        m = norms[name]
        (rm_b, rv_b), (rm_a, rv_a) = snapshot[name], _means(m)
        rows.append(LayerFix(
            name=name,
            type=type(m).__name__,
            recalibrated=name in targets,
            shift_before=shift_of(before.stats, name, rv_b) if before else math.nan,
            shift_after=shift_of(after.stats, name, rv_a) if after else math.nan,
            running_var_before=rv_b,
            running_var_after=rv_a,
            running_mean_before=rm_b,
            running_mean_after=rm_a,
        ))
    return rows


def _metric_notes(why_no_metrics: list[str], evaluation: Any, before: _Measured | None,
                  held_out: bool) -> list[str]:
    if why_no_metrics:
        return [f"no held-out accuracy or NLL: `eval_batches` {getattr(evaluation, 'source', '')} "
                f"cannot be scored ({why_no_metrics[0]})"]
    if before is not None and not held_out and before.metrics is not None:
        return ["accuracy and NLL are on the calibration data, not held out (pass `eval_batches`)"]
    return []
