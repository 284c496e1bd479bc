"""Measure each norm's variance shift on calibration data (the paper's metric).

One iteration over the data; for every batch, two forwards:

* **eval**: the whole model in eval mode (the inference path). A pre-hook adds each norm's
  input to float64 population moments.
* **train**: regularizers active and norms normalizing with batch statistics, as in training.
  The norms' running buffers are swapped for scratch copies with momentum 1
  (:class:`~varshift.measure.norms.ScratchStats`), so BatchNorm's own kernel leaves each batch's
  statistics there; a post-hook reads and merges them. The model's statistics are untouched.

No activation is kept: memory is O(channels), whatever the number of batches.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable

import torch
import torch.nn as nn

from .._torch_utils import fork_rng, preserved_modes, removing
from .._types import Progress
from ..calling import forward
from ..errors import VarshiftError
from ..options import CallSpec
from ..report.results import LayerShift, ProbeReport
from .context import Context, Prepared, entering, prepare
from .norms import BatchStats, InputStats, ScratchStats, per_process_norms
from .stats import ChannelMoments, require_finite, shift_ratio

#: Unaffected layers whose train-mode variance differs from their running variance by more
#: than this factor suggest calibration data unlike the training data.
MISMATCH = 1.25


def probe(
    model: nn.Module,
    batches: Iterable[Any],
    seed: int = 0,
    *,
    threshold: float = 1.1,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
    process_group: Any = None,
    call: Any = None,
    labels: str = "auto",
    max_samples: int | None = None,
) -> ProbeReport:
    """Measure every norm's variance shift on ``batches``, in execution order.

    Args:
        model: the model; its parameters, buffers (``num_batches_tracked`` included) and
            every module's ``training`` flag are exactly as before afterwards, also on error.
        batches: an iterable of input tensors or ``(inputs, labels)`` pairs (labels unused).
        seed: seeds the train-mode pass (dropout masks), so it is reproducible; the caller's
            RNG state is left as it was.
        threshold: layers at or above this shift count as shifted (``bool(report)`` is False).
        device: where the batches go (default: the model's device, where the model must be).
        progress: called as ``progress(batches_done, total_or_None)`` after each batch.
        process_group: run across the ranks of this torch.distributed group, each with its
            own ``batches``: the moments are merged exactly once at the end and every rank
            returns the same report. Default: the initialized default group, if any;
            ``False``: this process alone.
        call: ``fn(model, batch)`` (or a ``pkg.module:fn`` string) that runs the model on one
            batch; default: the calling convention of :mod:`varshift.calling` (tensors,
            tuples as positional arguments, dicts as keyword arguments).
        labels: ``"auto"``, ``"none"`` or ``"last"``: how tuple batches split (see
            :mod:`varshift.calling`).
        max_samples: stop after this many samples (the last batch cut); default: all.

    Returns:
        A :class:`ProbeReport`.

    Raises:
        DataError: the data is empty, has NaN/Inf, or does not fit the model.
        VarshiftError: the model has uninitialized lazy modules (it was never run).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise VarshiftError(f"`seed` must be an integer in [0, 2**64), got {seed!r}")
    how = CallSpec(call=call, labels=labels)
    with entering(model, process_group=process_group, device=device,
                  progress=progress) as (module, ctx):
        prep = prepare(module, batches, how, ctx, once=True, max_samples=max_samples)
        return _probe(module, prep, seed, threshold, ctx)


def _probe(model: nn.Module, prep: Prepared, seed: int, threshold: float,
           ctx: Context) -> ProbeReport:
    norms, d = prep.norms, ctx.dist
    n_batches = samples = 0
    with contextlib.ExitStack() as stack:
        stack.enter_context(preserved_modes(model))
        stack.enter_context(torch.no_grad())
        stack.enter_context(fork_rng(ctx.device))
        stack.enter_context(per_process_norms(norms))
        scratch = stack.enter_context(ScratchStats(norms))
        handles = stack.enter_context(removing([]))
        eval_stats = InputStats(norms).attach(handles)
        train_stats = BatchStats(scratch).attach(handles)
        torch.manual_seed(seed)
        for index, batch in enumerate(prep.stream):
            x = prep.caller.prepare(batch, index)
            del batch
            eval_stats.active, train_stats.active = True, False
            scratch.original()
            model.eval()
            forward(model, x, index)
            eval_stats.active, train_stats.active = False, True
            scratch.scratch()
            model.train()
            forward(model, x, index)
            n_batches += 1
            samples += x.samples
            ctx.tick(n_batches, getattr(prep.cal, "n_batches", None))

    if d.active:  # one exact merge across ranks, identical on every rank
        n_batches = d.merge_stats(eval_stats, n_batches)
        d.merge_stats(train_stats)
        samples = d.sum_counts({"n": samples})["n"]
    affected = {n.name: n for n in prep.scan.norms}
    layers = [
        _layer(name, norms[name], eval_stats.moments[name], train_stats.moments[name],
               affected.get(name), eval_stats.calls[name])
        for name in eval_stats.order
    ]
    notes = []
    unused = [name for name in norms if eval_stats.calls[name] == 0]
    if unused:
        notes.append(
            f"{len(unused)} BatchNorm layer(s) never ran on this data: {', '.join(unused[:5])}"
        )
    return ProbeReport(
        model=type(model).__name__,
        layers=layers,
        samples=samples,
        batches=n_batches,
        seed=seed,
        threshold=threshold,
        traced_with=prep.scan.traced_with,
        # frozen norms' statistics never came from this model's training: no evidence
        warnings=calibration_warnings(layers, {n.name for n in prep.scan.norms if n.frozen}),
        notes=notes,
        data=getattr(prep.cal, "source", None),
        regularizer_kinds={r.name: r.kind for r in prep.scan.regularizers},
    )


def _layer(name, module, ev: ChannelMoments, tr: ChannelMoments, scan_entry, calls) -> LayerShift:
    require_finite(ev, name, "eval-mode")
    require_finite(tr, name, "train-mode")
    rv = module.running_var.detach().double().cpu()
    rm = module.running_mean.detach().double().cpu()
    eps = float(getattr(module, "eps", 1e-5))
    assert ev.mean is not None  # every norm saw data
    e_var, e_mean = ev.var.cpu(), ev.mean.cpu()
    if tr.mean is not None:
        t_var_mean, t_mean_mean = tr.var.mean().item(), tr.mean.mean().item()
    else:
        t_var_mean = t_mean_mean = math.nan
    ratio = (e_var + eps) / (rv + eps)
    per_channel = torch.maximum(ratio, 1 / ratio)
    return LayerShift(
        name=name,
        type=type(module).__name__,
        affected=None if scan_entry is None else scan_entry.affected,
        reached_by=[] if scan_entry is None else list(scan_entry.reached_by),
        channels=int(rv.numel()),
        running_var_mean=rv.mean().item(),
        eval_var_mean=e_var.mean().item(),
        train_var_mean=t_var_mean,
        shift=shift_ratio(e_var.mean().item(), rv.mean().item()),
        train_shift=shift_ratio(t_var_mean, e_var.mean().item()),
        channel_shift_median=per_channel.median().item(),
        channel_shift_max=per_channel.max().item(),
        running_mean_mean=rm.mean().item(),
        eval_mean_mean=e_mean.mean().item(),
        train_mean_mean=t_mean_mean,
        mean_offset=((e_mean - rm).abs() / (rv + eps).sqrt()).mean().item(),
        calls=calls,
    )


def calibration_warnings(layers: list[LayerShift],
                         frozen: "set[str] | frozenset" = frozenset()) -> list[str]:
    """Warnings when unaffected layers' train-mode variance is far from their running variance.

    When the train-mode pass reproduces such a layer's shift (its train-mode variance matches
    the running one, its eval variance does not), the cause is an op that is random in
    training which no rule recognized, not the data: say that instead.
    """
    warnings: list[str] = []
    unexplained = [
        l for l in layers
        if l.affected is False and l.name not in frozen
        and l.shift > MISMATCH and l.train_shift > MISMATCH
        and shift_ratio(l.train_var_mean, l.running_var_mean) <= MISMATCH
    ]
    if unexplained:
        names = ", ".join(l.name for l in unexplained[:5])
        worst = max(unexplained, key=lambda l: l.shift)
        warnings.append(
            f"{len(unexplained)} layer(s) that no recognized regularizer reaches show a shift "
            f"that the train-mode pass reproduces ({names}; worst {worst.name}: "
            f"{worst.shift:.2f}x): an unrecognized train-mode op upstream is the likely cause, "
            "not the calibration data; recalibrate them with `all_norms=True` and "
            "`exact=True`"
        )
    skip = {l.name for l in unexplained}
    off = [
        (l, shift_ratio(l.train_var_mean, l.running_var_mean))
        for l in layers
        if l.affected is False and l.name not in skip and l.name not in frozen
    ]
    off = [(l, r) for l, r in off if r > MISMATCH]
    if off:
        worst, ratio = max(off, key=lambda t: t[1])
        warnings.append(
            f"the calibration data may not look like the training data: {len(off)} layer(s) "
            f"that no regularizer reaches differ from their running variance by more than "
            f"{MISMATCH:g}x in train mode (worst {worst.name}: {ratio:.2f}x); conclusions are weak"
        )
    return warnings
