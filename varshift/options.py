"""The library's modes and option objects, validated once where they enter.

Modes are :class:`~enum.StrEnum` members: a plain string (``"last"``) is accepted wherever
one is (a member *is* its string), and :func:`choice` turns it into the member at the
entrance, with the one message every entrance gives for a bad value. Inside the library only
members travel.

Option objects group what several functions need: :class:`ModelSpec` (how to load a model
file), :class:`DataSpec` (how to read a data source) and :class:`RunSpec` (where and how the
run happens). The command line's option groups build them; the file-level functions
(:mod:`varshift.files`) build them from their keyword arguments; the internals take the
objects, never the flattened lists.

No torch import here: the CLI builds these objects before anything heavy is imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeVar, Union

from ._types import Progress
from .errors import VarshiftError

if TYPE_CHECKING:
    import torch

PathLike = Union[str, "os.PathLike[str]"]


class Labels(StrEnum):
    """How a tuple batch splits into inputs and labels (see :mod:`varshift.calling`)."""

    AUTO = "auto"  #: a trailing integer tensor of the batch's length is the labels
    NONE = "none"  #: every item is an input
    LAST = "last"  #: the last item is the labels


class FailOn(StrEnum):
    """The severity of a scan finding at which ``bool(report)`` turns False."""

    ERROR = "error"
    WARNING = "warning"
    NEVER = "never"


class ExactPath(StrEnum):
    """How the exact estimator runs (docs/concepts.md, "Estimators")."""

    AUTO = "auto"  #: the frontier where the model allows it, else one pass per level
    FRONTIER = "frontier"  #: the frontier, or refuse
    LEVELS = "levels"  #: one pass per dependency level


E = TypeVar("E", bound=StrEnum)


def choice(kind: type[E], value: Any, param: str) -> E:
    """``value`` as a member of ``kind``; the entrance's one check.

    Raises:
        VarshiftError: ``value`` is not one of ``kind``'s values; the message names the
            parameter ``param`` and lists the values.
    """
    if isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        names = ", ".join(m.value for m in kind)
        raise VarshiftError(f"`{param}` must be one of {names}, got {value!r}") from None


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

    def load(self) -> Any:
        """The :class:`~varshift.io.loading.LoadedModel`."""
        from .io.loading import load_model, parse_arch_args

        args = self.arch_args
        if isinstance(args, str) or args is None:
            args = parse_arch_args(args)
        return load_model(self.path, arch=self.arch, arch_args=args, trust=self.trust)

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
        labels: how tuple batches split (a :class:`Labels` value).
    """

    source: PathLike
    batch_size: int = 64
    max_batches: int | None = None
    max_samples: int | None = None
    labels: Labels = Labels.AUTO

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", choice(Labels, self.labels, "labels"))

    def load(self, whole: bool = False) -> Any:
        """The :class:`~varshift.io.data.Calibration`; ``whole``: ignore the budgets (held-out
        data is scored in full)."""
        from .io.data import load_data

        if whole:
            return load_data(self.source, batch_size=self.batch_size, max_batches=None)
        return load_data(self.source, batch_size=self.batch_size, max_batches=self.max_batches,
                         max_samples=self.max_samples)

    def first_batch(self) -> Any:
        """The first batch of the source, whole (as the source produced it)."""
        from .io.data import load_data

        for batch in load_data(self.source, batch_size=64, max_batches=1):
            return batch.raw
        raise VarshiftError("DATA yielded no batches")


@dataclass(frozen=True)
class RunSpec:
    """Where and how a run happens.

    Attributes:
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``,
            ``"cuda:K"`` or a ``torch.device``.
        backend: the torch.distributed backend under torchrun (None: NCCL for CUDA, else gloo).
        progress: ``progress(batches_done, total_or_None)``, called while data streams.
    """

    device: "str | torch.device | None" = "auto"
    backend: str | None = None
    progress: Progress | None = None
