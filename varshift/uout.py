"""Uout: the paper's variance-stable replacement for dropout."""

from __future__ import annotations

import torch
import torch.nn as nn


class Uout(nn.Module):
    """Uniform multiplicative noise (Li et al., CVPR 2019, "Uout").

    In training: ``x + x * r`` with ``r ~ U(-beta, beta)`` drawn per element, which scales the
    variance of zero-mean input by ``1 + beta**2 / 3`` (dropout with drop probability p scales
    it by ``1 / (1 - p)``). In eval mode: the identity, so it exports to nothing.

    Args:
        beta: half-width of the noise, >= 0 (default 0.1).
    """

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        if not beta >= 0:
            raise ValueError(f"Uout beta must be >= 0, got {beta}")
        self.beta = float(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.beta == 0.0:
            return x
        r = torch.empty_like(x).uniform_(-self.beta, self.beta)
        return x + x * r

    def extra_repr(self) -> str:
        return f"beta={self.beta:g}"
