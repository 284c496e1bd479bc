"""Streaming per-channel population statistics, merged exactly across batches in float64.

Each batch contributes its count, per-channel mean and sum of squared deviations (M2); batches
are merged with Chan et al.'s parallel update, so the result is the mean and variance over
*all* samples and positions, not the mean of per-batch variances. Memory is O(channels).
"""

from __future__ import annotations

import math

import torch


def batch_moments(x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Per-channel (count, mean, M2) of ``x`` of shape (N, C, *), channels on dim 1.

    The per-batch moments come from torch's fused BatchNorm statistics kernel (one pass,
    two-pass-accurate, double accumulation on CPU); 2-D inputs, where that kernel is slow on
    CPU, use ``var_mean``. Both are returned in float64.
    """
    channels = x.shape[1]
    n = x.numel() // channels if channels else 0
    if x.ndim > 2 and n > 1 and x.is_floating_point():
        mean = torch.zeros(channels, dtype=x.dtype, device=x.device)
        var = torch.ones(channels, dtype=x.dtype, device=x.device)
        torch.batch_norm_update_stats(x, mean, var, 1.0)  # var: unbiased
        return n, mean.double(), var.double() * (n - 1)
    dims = [0, *range(2, x.ndim)]
    var, mean = torch.var_mean(x.float() if not x.is_floating_point() else x, dim=dims,
                               correction=0)
    return n, mean.double(), var.double() * n


class ChannelMoments:
    """Running per-channel count, mean and M2 (float64) of the tensors added to it."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """Add every sample and position of ``x`` (N, C, *)."""
        self.merge(*batch_moments(x))

    def merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Merge a batch's count, per-channel mean and M2 (Chan et al.)."""
        if n == 0:
            return
        mean, m2 = mean.double(), m2.double()
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean.clone(), m2.clone()
            return
        if mean.shape != self.mean.shape:
            raise ValueError(f"channel count changed: {tuple(self.mean.shape)} -> {tuple(mean.shape)}")
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += m2 + delta.square() * (self.count * n / total)
        self.count = total

    @property
    def var(self) -> torch.Tensor:
        """Unbiased population variance per channel (float64)."""
        assert self.m2 is not None, "no data"
        return self.m2 / max(self.count - 1, 1)

    @property
    def biased_var(self) -> torch.Tensor:
        assert self.m2 is not None, "no data"
        return self.m2 / max(self.count, 1)

    @property
    def finite(self) -> bool:
        """True when no data was added or every channel's mean and M2 are finite."""
        if self.mean is None:
            return True
        return bool(torch.isfinite(self.mean).all() and torch.isfinite(self.m2).all())


def require_finite(moments: ChannelMoments, layer: str, what: str) -> None:
    """Raise a one-line DataError when ``moments`` overflowed (inf) or hold NaN.

    Float64 moments of finite float32 inputs only overflow when the layer's input itself was
    inf/NaN: the data holds values too large for the model's dtype (an input of 1e30 squares
    past float32's range inside a conv or BatchNorm), or the model produces inf/NaN on it.
    Statistics like that must not be reported as a shift or written into a model.
    """
    if moments.finite:
        return
    from ..errors import DataError

    raise DataError(
        f"the {what} statistics of {layer or '(root)'} are not finite (inf/NaN): the data "
        "holds values too large for the model's dtype, or the model produces inf/NaN on it; "
        "scale the data as in training"
    )


def require_spread(moments: ChannelMoments, layer: str) -> None:
    """Raise a one-line DataError when every channel of ``layer``'s input had zero variance.

    Statistics from constant inputs (all-zero or all-equal calibration data, or a layer the
    data never excites) would set ``running_var`` to 0: the norm would then divide by
    ``sqrt(eps)`` and blow its outputs up. A fix must not be written from them.
    """
    if moments.m2 is None or bool((moments.m2 > 0).any()):
        return
    from ..errors import DataError

    raise DataError(
        f"the calibration data gives {layer or '(root)'} constant inputs (zero variance in "
        "every channel); recalibrating on it would zero its running variance: use varied data"
    )


def shift_ratio(a: float, b: float) -> float:
    """The variance shift between two variances, ``max(a/b, b/a)`` (the paper's ``max(r, 1/r)``);
    1 when equal; inf when exactly one is zero or infinite, or when the ratio over- or
    underflows; nan when either is nan."""
    if math.isnan(a) or math.isnan(b):
        return math.nan
    if a == b:
        return 1.0
    if a == 0 or b == 0 or math.isinf(a) or math.isinf(b):
        return math.inf
    r = a / b
    if r == 0 or math.isinf(r):  # the ratio itself left float range
        return math.inf
    return max(r, 1 / r)
