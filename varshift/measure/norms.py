"""Norm-layer plumbing shared by probe and recalibrate."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from ..errors import StopForward
from ..graph.kinds import is_norm


def norm_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every norm (BatchNorm-family layer with running statistics), by qualified name."""
    return {name: m for name, m in model.named_modules() if is_norm(m)}


def input_count(x: torch.Tensor) -> int:
    """Values per channel in a norm's input (N, C, *): N times the spatial size."""
    return x.numel() // x.shape[1] if x.ndim > 1 and x.shape[1] else 0


class ScratchStats:
    """Lets train-mode norms report their batch statistics without touching the model's.

    ``scratch()`` swaps each norm's ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` for private copies and sets ``momentum = 1``: a train-mode forward
    then normalizes with batch statistics (as in training) and leaves that batch's mean and
    unbiased variance in the scratch buffers, computed by BatchNorm's own kernel, so they are
    read rather than computed twice. ``original()`` (alias ``restore()``) puts the model's own
    tensors (the same objects) and momentum back. Use as a context manager, which restores on
    exit, also when the body raises.
    """

    def __init__(self, norms: dict[str, nn.Module]) -> None:
        self.norms = norms
        # frozen norms (FrozenBatchNorm2d) have neither num_batches_tracked nor momentum
        self.saved = {
            name: (m.running_mean, m.running_var, getattr(m, "num_batches_tracked", None),
                   getattr(m, "momentum", None))
            for name, m in norms.items()
        }
        self.buffers = {
            name: (rm.clone(), rv.clone(), None if nbt is None else nbt.clone())
            for name, (rm, rv, nbt, _) in self.saved.items()
        }

    def scratch(self) -> None:
        for name, m in self.norms.items():
            _put(m, *self.buffers[name], 1.0)

    def original(self) -> None:
        for name, m in self.norms.items():
            _put(m, *self.saved[name])

    restore = original

    def batch_stats(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The last train-mode batch's (mean, unbiased var) of norm ``name``."""
        rm, rv, _ = self.buffers[name]
        return rm, rv

    def __enter__(self) -> "ScratchStats":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def _put(m: nn.Module, running_mean, running_var, num_batches_tracked, momentum) -> None:
    """Set a norm's statistics buffers and momentum. Straight into ``_buffers`` and
    ``__dict__`` where they live there: ``Module.__setattr__`` is slow, and this runs for
    every norm twice per batch."""
    buffers = m._buffers
    for key, value in (("running_mean", running_mean), ("running_var", running_var),
                       ("num_batches_tracked", num_batches_tracked)):
        if key in buffers:
            buffers[key] = value
        elif value is not None or hasattr(m, key):
            setattr(m, key, value)
    if not hasattr(m, "momentum"):
        return
    if "momentum" in m.__dict__:
        m.__dict__["momentum"] = momentum
    else:
        m.momentum = momentum


class _PerProcessBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A SyncBatchNorm's state with BatchNorm's per-process forward (any input rank >= 2)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


@contextlib.contextmanager
def per_process_norms(norms: dict[str, nn.Module]) -> Iterator[None]:
    """Run ``SyncBatchNorm`` layers as plain BatchNorm in the body, restored on exit.

    In training mode a SyncBatchNorm all-reduces every batch's statistics across the process
    group (and refuses CPU tensors while a group exists). The estimators keep exact sums and
    merge them once per pass instead: a per-batch collective would cost a round trip per norm
    per batch and deadlock when the ranks' shards have different batch counts.
    """
    swapped = [m for m in norms.values() if isinstance(m, nn.SyncBatchNorm)]
    try:
        for m in swapped:
            m.__class__ = _PerProcessBatchNorm
        yield
    finally:
        for m in swapped:
            m.__class__ = nn.SyncBatchNorm


class InputStats:
    """Float64 population moments of norms' inputs, fed by forward pre-hooks.

    Args:
        norms: name -> norm module (all norms; only ``names`` are hooked).
        names: the norms to measure (default: all).

    ``active`` switches collection on and off between passes. ``order`` lists the norms in
    the order of their first call; ``calls`` counts calls. With ``stop_after`` (name -> calls
    per forward), the hook raises :class:`StopForward` once every one of those norms has been
    called that many times in the current forward (``begin_forward()`` resets the count).
    """

    def __init__(self, norms: dict[str, nn.Module], names=None) -> None:
        from .stats import ChannelMoments

        self.norms = norms
        self.names = list(norms if names is None else names)
        self.moments = {n: ChannelMoments() for n in self.names}
        self.calls = {n: 0 for n in self.names}
        self.order: list[str] = []
        self.active = True
        self.stop_after: dict[str, int] | None = None
        self._this_forward: dict[str, int] = {}

    def begin_forward(self) -> None:
        self._this_forward = {}

    def _hook(self, name: str):
        def hook(module, args):
            if not self.active:
                return
            if self.calls[name] == 0:
                self.order.append(name)
            self.calls[name] += 1
            self.moments[name].add(args[0])
            if self.stop_after is not None:
                self._this_forward[name] = self._this_forward.get(name, 0) + 1
                if all(self._this_forward.get(n, 0) >= k for n, k in self.stop_after.items()):
                    raise StopForward

        return hook

    def attach(self, handles: list) -> "InputStats":
        for name in self.names:
            handles.append(self.norms[name].register_forward_pre_hook(self._hook(name)))
        return self


class BatchStats:
    """Population moments from train-mode norms' own batch statistics (see ScratchStats).

    A post-hook merges the batch mean and unbiased variance that BatchNorm left in the scratch
    buffers. On a norm's first call the pre-hook keeps a copy of the scratch variance, to learn
    whether the norm updates its running statistics at all; one that does not (a custom
    subclass, a frozen norm, ``momentum=0``) is measured from its input instead. (A sentinel
    written into the buffer would be read by a norm that normalizes with its running
    statistics in training too, such as ``FrozenBatchNorm2d``.) Checking only once keeps a GPU
    from synchronizing on every norm of every batch.
    """

    def __init__(self, scratch: ScratchStats, names=None) -> None:
        from .stats import ChannelMoments

        self.scratch = scratch
        self.names = list(scratch.norms if names is None else names)
        self.moments = {n: ChannelMoments() for n in self.names}
        self.updates_stats: dict[str, bool] = {}
        self.active = True
        self._single: set[str] = set()  # norms running this call in eval mode (one value)
        self._before: dict[str, torch.Tensor] = {}  # scratch variance before the first call

    def _pre(self, name: str):
        def hook(module, args):
            if not self.active:
                return
            if module.training and input_count(args[0]) <= 1:
                # One value per channel (a batch of one sample, a 1x1 map): torch refuses to
                # normalize it with batch statistics. Normalize it with the scratch statistics
                # (the last batch's) for this call only, and take its statistics from the
                # input itself in the post-hook: the population moments stay exact.
                module.training = False
                self._single.add(name)
                return
            if name not in self.updates_stats:
                self._before[name] = self.scratch.batch_stats(name)[1].clone()

        return hook

    def _post(self, name: str):
        def hook(module, args, output):
            if not self.active:
                return
            x = args[0]
            if name in self._single:
                self._single.discard(name)
                module.training = True
                self.moments[name].add(x)
                return
            mean, var = self.scratch.batch_stats(name)
            updates = self.updates_stats.get(name)
            if updates is None:
                updates = not torch.equal(var, self._before.pop(name))
                self.updates_stats[name] = updates
            if updates:
                n = input_count(x)
                self.moments[name].merge(n, mean, var.double() * (n - 1))
            else:
                self.moments[name].add(x)

        return hook

    def attach(self, handles: list) -> "BatchStats":
        for name in self.names:
            m = self.scratch.norms[name]
            handles.append(m.register_forward_pre_hook(self._pre(name)))
            handles.append(m.register_forward_hook(self._post(name)))
        return self
