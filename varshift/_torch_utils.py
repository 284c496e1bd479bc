"""Small torch helpers shared by the passes: mode guards, module surgery, state snapshots."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn


@contextlib.contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restore every module's ``training`` flag on exit, also when the body raises."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def removing(handles: list) -> Iterator[list]:
    """Remove every hook handle appended to ``handles`` on exit."""
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()
        handles.clear()


def fork_rng(device: torch.device):
    """``torch.random.fork_rng`` covering ``device``: the caller's CPU (and, for a CUDA
    device, that device's) RNG state is restored on exit."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.random.fork_rng(devices=[index])
    return torch.random.fork_rng(devices=[])


def check_materialized(model: nn.Module) -> None:
    """Refuse a model with uninitialized lazy parameters or buffers.

    Such a model was never run: its BatchNorm layers hold no statistics, it cannot be copied,
    and a forward would materialize the lazy layers, changing the model.

    Raises:
        VarshiftError: naming the first lazy tensors.
    """
    from .errors import VarshiftError

    lazy = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
            if nn.parameter.is_lazy(t)]
    if lazy:
        raise VarshiftError(
            f"the model has {len(lazy)} uninitialized lazy parameter(s)/buffer(s) "
            f"({', '.join(lazy[:3])}): it was never run, so its BatchNorm layers hold no "
            "statistics; load trained weights (or run one forward) first"
        )


def parent_name(qualname: str) -> tuple[str, str]:
    """Split ``"a.b.c"`` into ``("a.b", "c")`` (torch.fx's ``_parent_name``)."""
    parent, _, name = qualname.rpartition(".")
    return parent, name


def replace_submodule(root: nn.Module, qualname: str, new: nn.Module) -> None:
    """Replace the submodule at ``qualname`` with ``new``, in place.

    ``new`` takes the ``training`` mode of the module it replaces: a fresh module is in training
    mode, and a stochastic one (Uout) in an eval-mode model would inject noise at inference.
    """
    parent, name = parent_name(qualname)
    owner = root.get_submodule(parent) if parent else root
    new.train(getattr(owner, name).training)
    setattr(owner, name, new)


def copy_modes(src: nn.Module, dst: nn.Module, default: bool | None = None) -> None:
    """Give every submodule of ``dst`` the ``training`` flag of the module with the same
    qualified name in ``src``; those ``src`` lacks keep theirs (or take ``default``)."""
    modes = {name: m.training for name, m in src.named_modules()}
    for name, m in dst.named_modules():
        if name in modes:
            m.training = modes[name]
        elif default is not None:
            m.training = default


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a stateless model)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of the model's first floating parameter (float32 by default)."""
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.float32
