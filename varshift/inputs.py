"""Example inputs for tracing and export."""

from __future__ import annotations

import torch
import torch.nn as nn

from ._torch_utils import model_device, model_dtype


def example_input(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A standard-normal tensor of ``shape`` in the model's dtype and on its device.

    Drawn from a private generator seeded with ``seed``: the global RNG is not touched.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=model_dtype(model))
    return x.to(model_device(model))
