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

  - ``frontier`` (:mod:`varshift.frontier`): the model's eval-mode torch.fx graph runs over all
    batches at once, cut before each target norm; about one forward pass of work, with the
    values alive at the cut kept within ``cache_mb`` (spilled to a temporary directory beyond).
  - ``levels``: norms are grouped into dependency levels (a norm's level is one more than the
    deepest target norm upstream of it); one pass per level, and a pass stops as soon as the
    last norm of its level has run. For models fx cannot trace, or whose norms run more than
    once per forward.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._torch_utils import check_materialized, fork_rng, model_device, preserved_modes, removing
from .._types import Progress
from ..calling import Caller, forward
from ..errors import VarshiftError
from ..graph import NORM, DataflowGraph
from ..io.data import as_batches, peek
from ..measure import distributed
from ..measure.norms import BatchStats, InputStats, ScratchStats, StopForward, norm_modules, per_process_norms
from ..measure.stats import ChannelMoments, require_finite, require_spread, shift_ratio
from ..report.results import ExactInfo, LayerFix, Metrics, RecalibrationReport
from ..rules import scan_for
from . import frontier
from .frontier import check_cache_mb


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

    Returns:
        ``(fixed_model, report)``. ``num_batches_tracked`` of each recalibrated norm is the
        number of calibration batches (as after ``update_bn``); momentum is unchanged.
    """
    d = distributed.resolve(process_group)
    # the whole run under fork_rng: iterating a DataLoader (shuffling, random transforms)
    # draws from the global generator too, from the very first batch on
    dev = torch.device(device) if device is not None else model_device(distributed.unwrap(model))
    with distributed.using(d), fork_rng(dev):
        return _recalibrate(distributed.unwrap(model), batches, exact, all_norms, inplace,
                            eval_batches, measure, threshold, device, progress, cache_mb,
                            exact_path, call, labels, output_key, max_samples, include_frozen)


def _recalibrate(model, batches, exact, all_norms, inplace, eval_batches, measure, threshold,
                 device, progress, cache_mb=None, exact_path="auto", call=None, labels="auto",
                 output_key=None, max_samples=None,
                 include_frozen=False) -> tuple[nn.Module, RecalibrationReport]:
    check_materialized(model)
    check_cache_mb(cache_mb)
    if exact_path not in EXACT_PATHS:
        raise VarshiftError(f"exact_path must be one of {', '.join(EXACT_PATHS)}, got {exact_path!r}")
    # The population estimator alone reads the data once: stream it (a generator is not
    # materialized). Measuring and the exact estimator need several passes.
    single_pass = not exact and not measure
    cal = as_batches(batches, once=single_pass, max_samples=max_samples)
    fixed = model if inplace else copy.deepcopy(model)
    dev = torch.device(device) if device is not None else model_device(fixed)
    caller = Caller(fixed, call=call, labels=labels, output_key=output_key, device=dev)
    prepare = caller.prepare
    norms = norm_modules(fixed)

    first, stream = peek(cal)
    scan_report, graph = scan_for(fixed, prepare(first, 0, limit=None if call else 1))
    data = stream if single_pass else cal
    del first, stream
    # frozen norms are never affected (training cannot have shifted them): only on request
    targets = [n.name for n in scan_report.norms
               if all_norms or n.affected or (include_frozen and n.frozen)]
    targets = [t for t in targets if t in norms]
    notes: list[str] = []
    always_on = [r.name for r in scan_report.regularizers if r.always_on]
    if always_on:
        notes.append(
            f"{', '.join(always_on)} {'stays' if len(always_on) == 1 else 'stay'} active in eval "
            "mode and cannot be switched off; its noise is part of the recalibrated statistics"
        )
    if not targets and not norms:
        notes.append("the model has no BatchNorm layer with running statistics; nothing to "
                     "recalibrate")
    elif not targets and all_norms:
        notes.append("no BatchNorm layer ran on this data; nothing was recalibrated")
    elif not targets:
        notes.append(
            "no BatchNorm layer is reached by an active regularizer; nothing to recalibrate "
            "(use --all-norms to recalibrate every BatchNorm)"
        )

    held_out = eval_batches is not None
    evaluation = as_batches(eval_batches) if eval_batches is not None else cal

    before_stats = before_metrics = None
    why_no_metrics: list[str] = []  # held-out data that cannot be scored is said, not dropped
    if measure:
        before_stats, before_metrics = measure_eval(fixed, cal, caller, norms)
        if held_out:
            before_metrics = metrics_on(fixed, evaluation, caller, held_out=True,
                                        why=why_no_metrics)
    snapshot = {
        name: (m.running_mean.detach().double().mean().item(),
               m.running_var.detach().double().mean().item())
        for name, m in norms.items()
    }

    passes = 0
    n_batches = 0
    exact_info: ExactInfo | None = None
    if targets:
        with per_process_norms(norms):
            if exact:
                passes, n_batches, exact_info = _exact(
                    fixed, cal, prepare, norms, targets, graph, progress, cache_mb, exact_path,
                    dev)
                notes.append(exact_info.note())
            else:
                passes, n_batches = _population(fixed, data, prepare, norms, targets, progress,
                                                getattr(cal, "n_batches", None))

    after_stats = after_metrics = None
    if measure:
        after_stats, after_metrics = measure_eval(fixed, cal, caller, norms)
        if held_out:
            after_metrics = metrics_on(fixed, evaluation, caller, held_out=True)

    layers = []
    order = before_stats.order if before_stats is not None else list(norms)
    target_set = set(targets)
    for name in order:
        m = norms[name]
        rm_b, rv_b = snapshot[name]
        layers.append(
            LayerFix(
                name=name,
                type=type(m).__name__,
                recalibrated=name in target_set,
                shift_before=_shift(before_stats, name, rv_b) if before_stats else math.nan,
                shift_after=(
                    _shift(after_stats, name, m.running_var.double().mean().item())
                    if after_stats else math.nan
                ),
                running_var_before=rv_b,
                running_var_after=m.running_var.double().mean().item(),
                running_mean_before=rm_b,
                running_mean_after=m.running_mean.double().mean().item(),
            )
        )
    if why_no_metrics:
        notes.append(f"no held-out accuracy or NLL: --eval-data {getattr(evaluation, 'source', '')} "
                     f"cannot be scored ({why_no_metrics[0]})")
    if measure and not held_out and before_metrics is not None:
        notes.append("accuracy and NLL are on the calibration data, not held out (pass --eval-data)")
    report = RecalibrationReport(
        model=type(model).__name__,
        estimator="exact" if exact else "population",
        layers=layers,
        before=before_metrics,
        after=after_metrics,
        passes=passes,
        batches=n_batches,
        samples=distributed.current().sum_counts({"n": getattr(cal, "samples", None) or 0})["n"],
        threshold=threshold,
        notes=notes,
        data=getattr(cal, "source", None),
        eval_data=getattr(evaluation, "source", None) if held_out else None,
        exact=exact_info,
    )
    return fixed, report


# --------------------------------------------------------------------------- estimators


def _write(m: nn.Module, moments: ChannelMoments, n_batches: int, name: str = "") -> None:
    """Store new statistics in the norm's own buffers (same tensors, dtype and device).

    Raises:
        DataError: the statistics are not finite, or constant (nothing is written to that norm).
    """
    assert moments.mean is not None
    require_finite(moments, name, "recalibrated")
    require_spread(moments, name)
    m.running_mean.copy_(moments.mean.to(m.running_mean))
    m.running_var.copy_(moments.var.to(m.running_var))
    if getattr(m, "num_batches_tracked", None) is not None:
        m.num_batches_tracked.fill_(n_batches)


def _population(model, batches, prepare, norms, targets, progress, total) -> tuple[int, int]:
    n_batches = 0
    with contextlib.ExitStack() as stack:
        stack.enter_context(preserved_modes(model))
        stack.enter_context(torch.no_grad())
        scratch = stack.enter_context(ScratchStats(norms))
        handles = stack.enter_context(removing([]))
        stats = BatchStats(scratch, targets).attach(handles)
        model.eval()
        for m in norms.values():
            m.train()
        scratch.scratch()
        for index, batch in enumerate(batches):
            forward(model, prepare(batch, index), index)
            n_batches += 1
            if progress is not None:
                progress(n_batches, total)
    n_batches = distributed.current().merge_stats(stats, n_batches)
    for name in targets:  # all or nothing: no norm is written when one is unusable
        if stats.moments[name].mean is not None:
            require_finite(stats.moments[name], name, "recalibrated")
            require_spread(stats.moments[name], name)
    with torch.no_grad():
        for name in targets:
            if stats.moments[name].mean is not None:
                _write(norms[name], stats.moments[name], n_batches, name)
    return 1, n_batches



def dependency_levels(scan_graph_norms: dict[str, set[str]], targets: list[str]) -> list[list[str]]:
    """Group ``targets`` into levels: a norm's level is 1 + the deepest target upstream.

    Args:
        scan_graph_norms: norm name -> names of the norms downstream of it.
    """
    target_set = set(targets)
    upstream: dict[str, set[str]] = {t: set() for t in targets}
    for src, downs in scan_graph_norms.items():
        if src in target_set:
            for d in downs:
                if d in target_set and d != src:
                    upstream[d].add(src)
    level: dict[str, int] = {}

    def depth(t: str, seen: frozenset = frozenset()) -> int:
        if t in level:
            return level[t]
        if t in seen:  # a cycle (a norm feeding itself through a loop): break it
            return 0
        d = 1 + max((depth(u, seen | {t}) for u in upstream[t]), default=-1)
        level[t] = d
        return d

    for t in targets:
        depth(t)
    out: list[list[str]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for t in targets:
        out[level[t]].append(t)
    return out


def _norm_reach(graph: DataflowGraph) -> dict[str, set[str]]:
    """Norm name -> the names of the norms downstream of it."""
    out: dict[str, set[str]] = {}
    for op in graph.ops:
        if op.role == NORM:
            out.setdefault(op.name, set()).update(
                graph.ops[i].name for i in graph.downstream(op.index)
            )
    return out


class _CallCounter:
    """Counts each norm's calls per forward; tells whether the counts are the same every time."""

    def __init__(self, norms: dict[str, nn.Module], names: list[str]) -> None:
        self.norms, self.names = norms, names
        self.rows: list[dict[str, int]] = []

    def begin_forward(self) -> None:
        self.rows.append({})

    def _hook(self, name: str):
        def hook(module, args):
            row = self.rows[-1]
            row[name] = row.get(name, 0) + 1

        return hook

    def attach(self, handles: list) -> "_CallCounter":
        for name in self.names:
            handles.append(self.norms[name].register_forward_pre_hook(self._hook(name)))
        return self

    def constant(self) -> dict[str, int] | None:
        """Calls per forward of every norm, or None when they differ between forwards."""
        if not self.rows or any(row != self.rows[0] for row in self.rows):
            return None
        return dict(self.rows[0])


def _same_everywhere(per_forward: dict[str, int] | None) -> dict[str, int] | None:
    """The calls per forward when every rank saw the same counts, else None (no early stop):
    the ranks must make the same passes."""
    d = distributed.current()
    if not d.active:
        return per_forward
    everyone = d.exchange(per_forward)
    return per_forward if all(p == everyone[0] for p in everyone) else None


EXACT_PATHS = ("auto", "frontier", "levels")


def _exact(model, cal, prepare, norms, targets, graph, progress, cache_mb, exact_path,
           device) -> tuple[int, int, ExactInfo]:
    """The exact estimator: the frontier where the model allows it, else one pass per level."""
    reason: str | None
    if exact_path == "levels":
        reason = "one pass per dependency level was asked for (exact_path='levels')"
    elif graph.traced_with != "fx":
        reason = "torch.fx cannot trace the model (the scan ran it instead)"
    else:
        reason = _single_tensor_input(cal, prepare)
        if reason is None:
            p = frontier.plan(model, targets)
            reason = p if isinstance(p, str) else None
    if reason is not None:
        if exact_path == "frontier":
            raise VarshiftError(f"the frontier path of --exact cannot run: {reason}")
        passes, n = _exact_levels(model, cal, prepare, norms, targets, graph, progress)
        return passes, n, ExactInfo(path="levels", reason=reason)
    budget = frontier.default_cache_mb(device) if cache_mb is None else float(cache_mb)
    d = distributed.current()
    if d.active:  # the default depends on each machine's free memory: one budget, the least
        budget = min(d.exchange(budget))
    total = {"batches": 0}

    def write(name, moments, n_batches):
        # Across ranks: merge this norm's moments before writing it, so that the next cut
        # runs on the merged statistics everywhere (one small exchange per norm).
        holder = _Moments({name: moments})
        total["batches"] = d.merge_stats(holder, n_batches)
        _write(norms[name], holder.moments[name], total["batches"], name)

    assert not isinstance(p, str)
    with preserved_modes(model), torch.no_grad():
        model.eval()
        done = frontier.run(p, cal, lambda batch: prepare(batch, 0).args[0], write, budget,
                            device, model, progress,
                            getattr(cal, "n_batches", None))
    n_batches = total["batches"] if d.active else done.batches
    memory = (done.peak_mb, done.kept_mb, done.spilled_mb)
    if d.active:  # the report is the same on every rank: the busiest rank's memory
        memory = tuple(max(values) for values in zip(*d.exchange(memory)))
    return 1, n_batches, ExactInfo(
        path="frontier", reason=None, cuts=done.cuts, cache_mb=budget,
        default_budget=cache_mb is None,
        peak_mb=memory[0], kept_mb=memory[1], spilled_mb=memory[2])


def _single_tensor_input(cal, prepare) -> str | None:
    """None when the model is called as ``model(x)`` with one tensor (what the frontier runs:
    the traced graph's first input), else why not."""
    inv = prepare(next(iter(cal)), 0)
    if inv.call is not None:
        return "a --call function runs the model (the frontier feeds the traced graph itself)"
    if inv.kwargs or len(inv.args) != 1 or not isinstance(inv.args[0], torch.Tensor):
        return "the model takes more than one input tensor (the frontier feeds one)"
    return None


class _Moments:
    """A bare holder of named moments for :meth:`varshift.distributed.Dist.merge_stats`."""

    def __init__(self, moments: dict[str, ChannelMoments]) -> None:
        self.moments = moments


def _exact_levels(model, cal, prepare, norms, targets, graph, progress) -> tuple[int, int]:
    """One eval pass per dependency level, each stopped after its level's last norm."""
    levels = dependency_levels(_norm_reach(graph), targets)
    total = getattr(cal, "n_batches", None)
    per_forward: dict[str, int] | None = None
    n_batches = 0
    with preserved_modes(model), torch.no_grad():
        model.eval()
        for k, level in enumerate(levels):
            with removing([]) as handles:
                stats = InputStats(norms, level).attach(handles)
                counter = _CallCounter(norms, targets).attach(handles) if k == 0 else None
                if per_forward is not None:
                    # Stop each forward once this level's norms have all run: nothing
                    # downstream of them matters for this pass.
                    stats.stop_after = {n: per_forward[n] for n in level if n in per_forward}
                n_batches = 0
                for index, batch in enumerate(cal):
                    stats.begin_forward()
                    if counter is not None:
                        counter.begin_forward()
                    try:
                        forward(model, prepare(batch, index), index)
                    except StopForward:
                        pass
                    n_batches += 1
                    if progress is not None:
                        progress(k * (total or 0) + n_batches,
                                 None if total is None else total * len(levels))
                if counter is not None:
                    per_forward = _same_everywhere(counter.constant())
            n_batches = distributed.current().merge_stats(stats, n_batches)
            for name in level:
                if stats.moments[name].mean is not None:
                    _write(norms[name], stats.moments[name], n_batches, name)
    return len(levels), n_batches


# --------------------------------------------------------------------------- measurement


def _shift(stats: InputStats, name: str, running_var_mean: float) -> float:
    moments = stats.moments[name]
    if moments.mean is None:
        return math.nan
    return shift_ratio(moments.var.mean().item(), running_var_mean)


class _MetricSums:
    """Accuracy and NLL sums over labelled batches; ``reason`` says why there are none."""

    def __init__(self) -> None:
        self.correct = 0
        self.nll = 0.0
        self.n = 0
        self.reason: str | None = None  # set once: the first batch that cannot be scored

    def _unusable(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def add(self, logits: Any, y: Any) -> None:
        """Add one batch: ``logits`` as the caller picked them from the output."""
        if self.reason is not None:
            return
        if y is None:
            return self._unusable("it has no labels")
        if not isinstance(y, torch.Tensor):  # detection targets and the like
            return self._unusable(f"its labels are a {type(y).__name__}, not a tensor of class "
                                  "indices")
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            return self._unusable(f"the model's output ({shape}) is not (N, classes) logits")
        if y.is_floating_point() or y.dtype == torch.bool:
            return self._unusable(f"its labels are {str(y.dtype).replace('torch.', '')}, not "
                                  "integer class indices")
        if y.ndim != 1 or logits.shape[0] != y.shape[0]:
            return self._unusable(f"its labels of shape {tuple(y.shape)} do not match the "
                                  f"model's output {tuple(logits.shape)}")
        y = y.to(logits.device)
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= logits.shape[1]:
            return self._unusable(f"its labels span {lo}..{hi}, outside the model's "
                                  f"{logits.shape[1]} classes (0..{logits.shape[1] - 1})")
        self.correct += int((logits.argmax(1) == y).sum())
        self.nll += float(F.cross_entropy(logits.double(), y, reduction="sum"))
        self.n += y.shape[0]

    def result(self, held_out: bool) -> Metrics | None:
        d = distributed.current()
        if d.active:  # sums over ranks; the lowest rank's reason makes them unusable
            everyone = d.exchange((self.reason, self.correct, self.nll, self.n))
            self.reason = next((r for r, *_ in everyone if r is not None), None)
            self.correct = sum(c for _, c, _, _ in everyone)
            self.nll = sum(v for _, _, v, _ in everyone)
            self.n = sum(n for *_, n in everyone)
        if self.reason is not None or self.n == 0:
            return None
        return Metrics(self.correct / self.n, self.nll / self.n, self.n, held_out)


def measure_eval(model, cal, caller, norms) -> tuple[InputStats, Metrics | None]:
    """One eval pass: every norm's input moments, and metrics when labels are present."""
    sums = _MetricSums()
    with contextlib.ExitStack() as stack:
        stack.enter_context(preserved_modes(model))
        stack.enter_context(torch.no_grad())
        handles = stack.enter_context(removing([]))
        stats = InputStats(norms).attach(handles)
        model.eval()
        for index, batch in enumerate(cal):
            _add_batch(sums, model, caller, batch, index)
    distributed.current().merge_stats(stats)
    # An inference-path input that overflowed (data far outside the model's range) makes
    # every statistic downstream meaningless, whether or not that norm is recalibrated.
    for name in stats.order:
        require_finite(stats.moments[name], name, "eval-mode")
    return stats, sums.result(held_out=False)


def _add_batch(sums: _MetricSums, model, caller, batch, index: int) -> None:
    inv = caller.prepare(batch, index)
    out = forward(model, inv, index)
    # --output-key is checked on every output, labels or not: a wrong key is an error
    wanted = inv.labels is not None or caller.output_key is not None
    sums.add(caller.logits(out) if wanted else None, inv.labels)


def metrics_on(model, batches, caller, held_out: bool,
               why: list[str] | None = None) -> Metrics | None:
    """Accuracy and NLL of the eval-mode model on labelled ``batches``; None when they cannot
    be computed, with the reason appended to ``why`` (no labels, float labels, labels out of
    the model's class range, outputs that are not logits)."""
    sums = _MetricSums()
    with preserved_modes(model), torch.no_grad():
        model.eval()
        for index, batch in enumerate(batches):
            _add_batch(sums, model, caller, batch, index)
    if sums.reason is not None and why is not None:
        why.append(sums.reason)
    return sums.result(held_out)
