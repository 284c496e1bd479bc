"""Example inputs for tracing and export."""

from __future__ import annotations

import torch
import torch.nn as nn

from .._torch_utils import model_device, model_dtype


def example_input(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A standard-normal tensor of ``shape`` in the model's dtype and on its device.

    Drawn from a private generator seeded with ``seed``: the global RNG is not touched.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=model_dtype(model))
    return x.to(model_device(model))


def expected_input(model: nn.Module) -> str | None:
    """What the model's first weighted layer expects, e.g. ``features.0 (Conv2d) expects
    (N, 3, H, W)``; None when it cannot tell. A heuristic for error messages."""
    spatial = {1: "L", 2: "H, W", 3: "D, H, W"}
    for name, m in model.named_modules():
        desc = None
        if isinstance(m, nn.modules.conv._ConvNd):
            dims = len(m.kernel_size)
            desc = f"(N, {m.in_channels}, {spatial.get(dims, '...')})"
        elif isinstance(m, nn.Linear):
            desc = f"(N, {m.in_features}) or (N, ..., {m.in_features})"
        elif isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            desc = f"integer token ids < {m.num_embeddings}"
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and hasattr(m, "num_features"):
            desc = f"(N, {m.num_features}, ...)"
        if desc:
            return f"the first layer {name or '(root)'} ({type(m).__name__}) expects {desc}"
    return None


#: Example sizes for the spatial dimensions of a hint, by the first layer's rank.
_HINT_SPATIAL = {1: (256,), 2: (224, 224), 3: (16, 112, 112)}


def shape_hint(model: nn.Module) -> str | None:
    """An ``--input-shape`` for the model, from its first weighted layer: ``1,22,256`` for an
    EEG net whose first layer is ``Conv1d(22, ...)``, ``1,3,224,224`` for an image net; None
    when the model takes something a shape cannot describe (token ids, several inputs)."""
    from ..calling import forward_signature

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


def fit_error(model: nn.Module, x, exc: BaseException, where: str = "DATA"):
    """A one-line DataError for inputs (a tensor or an Invocation) that do not fit ``model``."""
    from ..errors import DataError, one_line

    detail = one_line(exc, 240)
    expected = expected_input(model)
    hint = f"; {expected}" if expected else ""
    return DataError(
        f"{where} does not fit the model: {_what(x)}{hint} ({type(exc).__name__}: {detail})"
    )


def _what(x) -> str:
    from ..calling import Invocation, describe

    if isinstance(x, Invocation) and x.call is None and len(x.args) == 1 and not x.kwargs \
            and isinstance(x.args[0], torch.Tensor):
        x = x.args[0]
    if isinstance(x, torch.Tensor):
        return f"inputs of shape {tuple(x.shape)} ({str(x.dtype).replace('torch.', '')})"
    return f"inputs {describe(x)}"


def check_example(model: nn.Module, x: torch.Tensor) -> None:
    """Run ``model`` once on the example input ``x`` (eval mode, no grad; modes and the
    global RNG restored), so that an example that does not fit the model is an error even
    where torch.fx traced the model without running it.

    Raises:
        DataError: the model does not run on ``x`` (one line naming its shape).
    """
    from .._torch_utils import preserved_modes

    with preserved_modes(model), torch.no_grad(), torch.random.fork_rng(devices=[]):
        model.eval()
        try:
            model(x)
        except Exception as exc:
            raise fit_error(model, x, exc, where="the example input (--input-shape)") from None
