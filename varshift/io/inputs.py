"""Example inputs for tracing and export.

:func:`fit_error` and :func:`expected_input` (the message for inputs that do not fit a model)
live in :mod:`varshift.calling`, which raises it when the model rejects a batch; they are
importable from here too.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .._torch_utils import model_device, model_dtype, preserved_modes
from ..calling import expected_input, fit_error, forward_signature

__all__ = ["check_example", "example_input", "expected_input", "fit_error", "shape_hint"]


def example_input(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A standard-normal tensor of ``shape`` in the model's dtype and on its device.

    Drawn from a private generator seeded with ``seed``: the global RNG is not touched.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=model_dtype(model))
    return x.to(model_device(model))


#: Example sizes for the spatial dimensions of a hint, by the first layer's rank.
_HINT_SPATIAL = {1: (256,), 2: (224, 224), 3: (16, 112, 112)}


def shape_hint(model: nn.Module) -> str | None:
    """An ``--input-shape`` for the model, from its first weighted layer: ``1,22,256`` for an
    EEG net whose first layer is ``Conv1d(22, ...)``, ``1,3,224,224`` for an image net; None
    when the model takes something a shape cannot describe (token ids, several inputs)."""
    sig = forward_signature(model)
    if sig is not None and sig.required > 1:
        return None
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            dims = _HINT_SPATIAL.get(len(m.kernel_size), ())
            return ",".join(map(str, (1, m.in_channels, *dims)))
        if isinstance(m, nn.Linear):
            return f"1,{m.in_features}"
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            return None
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and int(getattr(m, "num_features", 0)):
            dims = {nn.BatchNorm2d: (224, 224), nn.BatchNorm3d: (16, 112, 112)}.get(type(m), ())
            return ",".join(map(str, (1, m.num_features, *dims)))
    return None


def check_example(model: nn.Module, x: torch.Tensor) -> None:
    """Run ``model`` once on the example input ``x`` (eval mode, no grad; modes and the
    global RNG restored), so that an example that does not fit the model is an error even
    where torch.fx traced the model without running it.

    Raises:
        DataError: the model does not run on ``x`` (one line naming its shape).
    """
    with preserved_modes(model), torch.no_grad(), torch.random.fork_rng(devices=[]):
        model.eval()
        try:
            model(x)
        except Exception as exc:
            raise fit_error(model, x, exc, where="the example input (`input_shape`)") from None
