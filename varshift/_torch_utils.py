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


def parent_name(qualname: str) -> tuple[str, str]:
    """Split ``"a.b.c"`` into ``("a.b", "c")`` (torch.fx's ``_parent_name``)."""
    parent, _, name = qualname.rpartition(".")
    return parent, name


def replace_submodule(root: nn.Module, qualname: str, new: nn.Module) -> None:
    """Replace the submodule at ``qualname`` with ``new``, in place."""
    parent, name = parent_name(qualname)
    setattr(root.get_submodule(parent) if parent else root, name, new)


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
