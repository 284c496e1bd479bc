"""The population estimator, and how any estimator writes a norm's new statistics.

One pass with the model in eval mode (regularizers off) except the target norms, which
normalize with batch statistics as in training. Each target's new statistics are the exact
population mean and unbiased variance of its input over the whole calibration set, merged in
float64 from the batch statistics BatchNorm computes anyway (read, not recomputed).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from .._torch_utils import preserved_modes, removing
from ..calling import forward
from ..measure.context import Context
from ..measure.norms import BatchStats, ScratchStats
from ..measure.stats import ChannelMoments, require_finite, require_spread


@dataclass(frozen=True)
class Job:
    """What an estimator works on.

    Attributes:
        model: the module whose norms are written.
        norms: name -> norm module (every norm of ``model``).
        targets: the names of the norms to recalibrate.
        prepare: ``prepare(batch, index)`` -> the invocation (:meth:`Caller.prepare`).
        ctx: the process (ranks, device, progress).
    """

    model: nn.Module
    norms: dict[str, nn.Module]
    targets: list[str]
    prepare: Callable[..., Any]
    ctx: Context


def write_norm(m: nn.Module, moments: ChannelMoments, n_batches: int, name: str = "") -> None:
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


def population(job: Job, batches: Iterable[Any], total: int | None) -> tuple[int, int]:
    """One pass over ``batches``; ``(passes, batches)``. All or nothing: no norm is written
    when one norm's statistics are unusable."""
    model, norms, targets = job.model, job.norms, job.targets
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
            forward(model, job.prepare(batch, index), index)
            n_batches += 1
            job.ctx.tick(n_batches, total)
    n_batches = job.ctx.dist.merge_stats(stats, n_batches)
    for name in targets:
        if stats.moments[name].mean is not None:
            require_finite(stats.moments[name], name, "recalibrated")
            require_spread(stats.moments[name], name)
    with torch.no_grad():
        for name in targets:
            if stats.moments[name].mean is not None:
                write_norm(norms[name], stats.moments[name], n_batches, name)
    return 1, n_batches
