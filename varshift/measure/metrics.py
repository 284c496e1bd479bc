"""Accuracy and NLL before and after a fix, and every norm's eval-mode input moments.

One eval pass feeds both (:func:`measure_eval`); held-out data is scored on its own
(:func:`metrics_on`). Data that cannot be scored (no labels, float labels, labels outside the
model's classes, outputs that are not ``(N, classes)`` logits) gives no metrics and says why.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._torch_utils import preserved_modes, removing
from ..calling import Caller, forward
from ..report.results import Metrics
from .distributed import Dist
from .norms import InputStats
from .stats import require_finite, shift_ratio


def shift_of(stats: InputStats, name: str, running_var_mean: float) -> float:
    moments = stats.moments[name]
    if moments.mean is None:
        return math.nan
    return shift_ratio(moments.var.mean().item(), running_var_mean)


class MetricSums:
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

    def result(self, held_out: bool, d: Dist) -> Metrics | None:
        if d.active:  # sums over ranks; the lowest rank's reason makes them unusable
            everyone = d.exchange((self.reason, self.correct, self.nll, self.n))
            self.reason = next((r for r, *_ in everyone if r is not None), None)
            self.correct = sum(c for _, c, _, _ in everyone)
            self.nll = sum(v for _, _, v, _ in everyone)
            self.n = sum(n for *_, n in everyone)
        if self.reason is not None or self.n == 0:
            return None
        return Metrics(self.correct / self.n, self.nll / self.n, self.n, held_out)


def measure_eval(model: nn.Module, cal: Any, caller: Caller, norms: dict[str, nn.Module],
                 d: Dist) -> tuple[InputStats, Metrics | None]:
    """One eval pass: every norm's input moments, and metrics when labels are present."""
    sums = MetricSums()
    with contextlib.ExitStack() as stack:
        stack.enter_context(preserved_modes(model))
        stack.enter_context(torch.no_grad())
        handles = stack.enter_context(removing([]))
        stats = InputStats(norms).attach(handles)
        model.eval()
        for index, batch in enumerate(cal):
            _add_batch(sums, model, caller, batch, index)
    d.merge_stats(stats)
    # An inference-path input that overflowed (data far outside the model's range) makes
    # every statistic downstream meaningless, whether or not that norm is recalibrated.
    for name in stats.order:
        require_finite(stats.moments[name], name, "eval-mode")
    return stats, sums.result(False, d)


def _add_batch(sums: MetricSums, model, caller, batch, index: int) -> None:
    inv = caller.prepare(batch, index)
    out = forward(model, inv, index)
    # --output-key is checked on every output, labels or not: a wrong key is an error
    wanted = inv.labels is not None or caller.output_key is not None
    sums.add(caller.logits(out) if wanted else None, inv.labels)


def metrics_on(model: nn.Module, batches: Any, caller: Caller, d: Dist,
               why: list[str] | None = None) -> Metrics | None:
    """Accuracy and NLL of the eval-mode model on held-out labelled ``batches``; None when they cannot
    be computed, with the reason appended to ``why`` (no labels, float labels, labels out of
    the model's class range, outputs that are not logits)."""
    sums = MetricSums()
    with preserved_modes(model), torch.no_grad():
        model.eval()
        for index, batch in enumerate(batches):
            _add_batch(sums, model, caller, batch, index)
    if sums.reason is not None and why is not None:
        why.append(sums.reason)
    return sums.result(True, d)
