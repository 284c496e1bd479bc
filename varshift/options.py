"""The library's modes and option objects, validated once where they enter.

Modes are :class:`Mode` members (string enums): a plain string (``"last"``) is accepted wherever
one is (a member *is* its string), and :func:`choice` turns it into the member at the
entrance, with the one message every entrance gives for a bad value. Inside the library only
members travel.

Option objects group what several functions need: :class:`ModelSpec` (how to load a model
file), :class:`DataSpec` (how to read a data source), :class:`CallSpec` (how the model is
called on a batch), :class:`RunSpec` (where and how the run happens) and
:class:`RecalibrateOptions`. They are plain, validated data: the stages that act on them
(:mod:`varshift.files`, :mod:`varshift.measure.context`) read them. The command line's
option groups build them; the file-level functions build them from their keyword arguments;
the internals take the objects, never the flattened lists.

A leaf module: it imports no torch and no stage, so that the CLI can build these objects
before anything heavy is imported.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, TypeVar, Union

from ._types import Progress
from .errors import DataError, VarshiftError

if TYPE_CHECKING:
    import torch

PathLike = Union[str, "os.PathLike[str]"]


class Mode(str, Enum):
    """A mode: an enum whose members are their strings (``Labels.LAST == "last"``, and
    ``f"{Labels.LAST}"`` is ``"last"``), as :class:`enum.StrEnum` of Python 3.11."""

    def __str__(self) -> str:
        return str(self.value)


class Labels(Mode):
    """How a tuple batch splits into inputs and labels (see :mod:`varshift.calling`)."""

    AUTO = "auto"  #: a trailing integer tensor of the batch's length is the labels
    NONE = "none"  #: every item is an input
    LAST = "last"  #: the last item is the labels


class FailOn(Mode):
    """The severity of a scan finding at which ``bool(report)`` turns False."""

    ERROR = "error"
    WARNING = "warning"
    NEVER = "never"


class ExactPath(Mode):
    """How the exact estimator runs (docs/concepts.md, "Estimators")."""

    AUTO = "auto"  #: the frontier where the model allows it, else one pass per level
    FRONTIER = "frontier"  #: the frontier, or refuse
    LEVELS = "levels"  #: one pass per dependency level


E = TypeVar("E", bound=Mode)


def choice(kind: type[E], value: Any, param: str,
           error: type[VarshiftError] = VarshiftError) -> E:
    """``value`` as a member of ``kind``; the entrance's one check.

    Raises:
        VarshiftError: (or ``error``, a subclass) ``value`` is not one of ``kind``'s values;
            the message names the parameter ``param`` and lists the values.
    """
    if isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        names = ", ".join(m.value for m in kind)
        raise error(f"`{param}` must be one of {names}, got {value!r}") from None


@dataclass(frozen=True)
class ModelSpec:
    """How to load a model file.

    Attributes:
        path: the file (``torch.save`` output: a module, a state dict or a checkpoint).
        arch: ``pkg.module:fn`` or ``file.py:fn`` that builds the module for a state dict.
        arch_args: keyword arguments for ``arch``: a dict, or its JSON text.
        trust: allow full unpickling (runs code from the file; trusted files only).
    """

    path: PathLike
    arch: str | None = None
    arch_args: dict | str | None = None
    trust: bool = False

    def reads(self) -> tuple:
        """The paths and specs this model's loading reads (no output may replace them)."""
        return (self.path, self.arch)


@dataclass(frozen=True)
class DataSpec:
    """How to read a data source (``.pt``, ``.npy``, ``.npz``, or ``pkg.module:callable``).

    Attributes:
        source: the file or the callable's spec.
        batch_size: samples per batch for file data.
        max_batches: use at most this many batches (None: all).
        max_samples: use at most this many samples, the last batch cut (None: all).

    How a batch splits into inputs and labels is the caller's business: :class:`CallSpec`.
    """

    source: PathLike
    batch_size: int = 64
    max_batches: int | None = None
    max_samples: int | None = None


class Session:
    """Holds the process group a run started under torchrun, for whoever started the run to
    end it (:meth:`Dist.finish`, :func:`~varshift.measure.distributed.shutdown`).

    Attributes:
        dist: the :class:`~varshift.measure.distributed.Dist`, or None (no group started).
    """

    def __init__(self) -> None:
        self.dist: Any = None


@dataclass(frozen=True)
class RunSpec:
    """Where and how a run happens.

    Attributes:
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``,
            ``"cuda:K"`` or a ``torch.device``.
        backend: the torch.distributed backend under torchrun (None: NCCL for CUDA, else gloo).
        progress: ``progress(batches_done, total_or_None)``, called while data streams.
        session: where a started process group is left (None: the run does not say).
    """

    device: "str | torch.device | None" = "auto"
    backend: str | None = None
    progress: Progress | None = None
    session: Session | None = None


@dataclass(frozen=True)
class CallSpec:
    """How the model is called on a batch (see :mod:`varshift.calling`).

    Attributes:
        call: ``fn(model, batch)`` returning the output or ``(output, labels)``, or its
            ``pkg.module:fn`` / ``file.py:fn`` spec; None: the calling convention's rules.
        labels: how tuple batches split (a :class:`Labels` value).
        output_key: the output that holds the logits (None: ``logits``, else the first tensor).
    """

    call: Any = None
    labels: Labels | str = Labels.AUTO
    output_key: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", choice(Labels, self.labels, "labels", DataError))


def check_threshold(value: float | None, param: str = "fail_above") -> None:
    """A shift threshold is a ratio >= 1 (``inf``: never fail).

    Raises:
        VarshiftError: naming ``param`` and the bad value.
    """
    if value is not None and not value >= 1.0:
        raise VarshiftError(f"`{param}` must be a ratio >= 1.0, got {value}")


def check_cache_mb(cache_mb: float | None) -> None:
    """A memory budget is a finite number of MiB >= 0 (None: the default).

    Raises:
        VarshiftError: naming the bad value.
    """
    if cache_mb is None:
        return
    try:
        ok = not isinstance(cache_mb, bool) and math.isfinite(float(cache_mb)) and cache_mb >= 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise VarshiftError(
            f"`cache_mb` must be a number of MiB >= 0 (0 spills everything to disk), got "
            f"{cache_mb!r}"
        )


@dataclass(frozen=True)
class RecalibrateOptions:
    """What :func:`~varshift.recalibrate` does (its keyword arguments, validated at once).

    Attributes:
        exact: the exact (inference-path) estimator instead of the population one.
        exact_path: how the exact estimator runs (an :class:`ExactPath` value).
        cache_mb: the exact estimator's memory budget in MiB (None: half the available).
        all_norms: recalibrate every norm, not only those an active regularizer reaches.
        include_frozen: also recalibrate frozen norms.
        measure: measure shifts and metrics before and after.
        threshold: ``bool(report)`` is False when a recalibrated layer's shift afterwards
            reaches it.
        max_accuracy_drop: ``bool(report)`` is False when accuracy falls by more than this
            many percentage points (None: no guard).
    """

    exact: bool = False
    exact_path: ExactPath | str = ExactPath.AUTO
    cache_mb: float | None = None
    all_norms: bool = False
    include_frozen: bool = False
    measure: bool = True
    threshold: float = 1.1
    max_accuracy_drop: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "exact_path", choice(ExactPath, self.exact_path, "exact_path"))
        check_cache_mb(self.cache_mb)
        drop = self.max_accuracy_drop
        if drop is not None and not drop >= 0:
            raise VarshiftError(
                f"`max_accuracy_drop` must be >= 0 percentage points, got {drop}")

    @property
    def estimator(self) -> str:
        return "exact" if self.exact else "population"
