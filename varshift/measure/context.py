"""What every measuring run starts from, passed explicitly.

:class:`Context` is the process a run happens in: the :class:`~varshift.measure.distributed.Dist`
(one process, or a rank of a torchrun group), the device the batches go to, and the progress
callback. :func:`entering` makes one from a public function's arguments; :func:`prepare` is
the preamble that :func:`~varshift.probe` and :func:`~varshift.recalibrate` share: the data as
:class:`~varshift.io.data.Calibration`, the :class:`~varshift.calling.Caller`, the norms, and
the scan of the model on its first batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn

from .._torch_utils import check_materialized, fork_rng, model_device
from .._types import Progress
from ..calling import Caller
from ..graph import DataflowGraph
from ..io.data import as_batches, peek
from ..options import CallSpec
from ..report.results import ScanReport
from ..rules import scan_for
from . import distributed
from .distributed import Dist
from .norms import norm_modules


@dataclass(frozen=True)
class Context:
    """The process one run happens in.

    Attributes:
        dist: the ranks the statistics are merged across (``Dist()``: this process alone).
        device: where the batches go.
        progress: ``progress(batches_done, total_or_None)`` after each batch, or None.
    """

    dist: Dist
    device: torch.device
    progress: Progress | None = None

    def tick(self, done: int, total: int | None) -> None:
        if self.progress is not None:
            self.progress(done, total)


@contextlib.contextmanager
def entering(model: nn.Module, *, process_group: Any, device: Any,
             progress: Progress | None) -> Iterator[tuple[nn.Module, Context]]:
    """``(module, context)`` for a public entry point's arguments: the module inside a
    ``DistributedDataParallel`` wrapper, the ranks of ``process_group`` (see
    :func:`~varshift.measure.distributed.resolve`), the device (default: the model's).

    The body runs under :func:`~varshift._torch_utils.fork_rng` (iterating a DataLoader,
    with its shuffling and random transforms, draws from the global generator too, from the
    very first batch on) and the Dist's guard (a failure reaches every rank)."""
    d = distributed.resolve(process_group)
    module = distributed.unwrap(model)
    dev = torch.device(device) if device is not None else model_device(module)
    with d.guard(), fork_rng(dev):
        yield module, Context(d, dev, progress)


@dataclass
class Prepared:
    """What a run needs before its first pass (see :func:`prepare`).

    Attributes:
        cal: the calibration data.
        stream: the data for a single pass (the first batch chained back in front).
        caller: how the model is called on a batch.
        norms: name -> norm module.
        scan: the scan of the model on its first batch.
        graph: the dataflow graph that scan traced.
    """

    cal: Any
    stream: Iterable[Any]
    caller: Caller
    norms: dict[str, nn.Module]
    scan: ScanReport
    graph: DataflowGraph


def prepare(model: nn.Module, batches: Iterable[Any], how: CallSpec, ctx: Context, *,
            once: bool, max_samples: int | None = None) -> Prepared:
    """The shared preamble: ``model`` checked, ``batches`` read (a generator streamed when
    ``once``: its first batch is peeked for the scan and chained back, so a data callable
    is called once), the caller built, the model scanned on the first batch.

    Raises:
        VarshiftError: the model has uninitialized lazy modules.
        DataError: the data is empty or does not fit the model.
    """
    check_materialized(model)
    cal = as_batches(batches, once=once, max_samples=max_samples)
    caller = Caller(model, call=how.call, labels=how.labels, output_key=how.output_key,
                    device=ctx.device)
    norms = norm_modules(model)
    first, stream = peek(cal)
    scan, graph = scan_for(model, caller.prepare(first, 0, limit=None if how.call else 1))
    return Prepared(cal, stream, caller, norms, scan, graph)
