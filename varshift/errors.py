"""User errors: every exception class varshift raises on purpose lives here, and the one
helper that turns any exception into the one line such a message quotes (:func:`one_line`).

Every :class:`VarshiftError` is a problem with the input or the usage (a missing file, a
refused pickle, data that does not fit the model, ...). The CLI prints its message as one
line on stderr and exits 2. Any other exception is a bug in varshift and keeps its traceback.
"""

from __future__ import annotations

import pickle
import re


def one_line(exc: BaseException | Warning | str, limit: int = 300, *, root: bool = False,
             typed: bool = False) -> str:
    """An exception's message on one line: its first paragraph with whitespace collapsed and
    terminal colours removed (the type's name when the message is empty), cut to ``limit``
    characters.

    Args:
        root: describe the root cause (follow ``__cause__``) instead of ``exc`` itself.
        typed: prefix the type's name, ``"ValueError: ..."``.
    """
    if root:
        while isinstance(exc, BaseException) and exc.__cause__ is not None:
            exc = exc.__cause__
    if isinstance(exc, SystemExit):  # str() would be just the code: say what happened
        return f"it called sys.exit({exc.code!r})"
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    line = " ".join(re.split(r"\n\s*\n", text, maxsplit=1)[0].split())
    if isinstance(exc, BaseException):
        if typed:
            line = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
        elif not line:
            line = type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


class VarshiftError(Exception):
    """Bad input or usage. The message is one line that names the bad value and the options."""


class LoadError(VarshiftError):
    """A model file could not be loaded."""


class RefusedPickleError(LoadError):
    """A pickle needs classes outside the safe allow-list.

    Attributes:
        classes: the qualified names of the classes the file needs.
    """

    def __init__(self, message: str, classes: list[str]):
        super().__init__(message)
        self.classes = classes


class ArchError(LoadError):
    """``arch`` / ``arch_args`` do not name a callable that builds a module."""


class StateDictMismatch(LoadError):
    """A state dict does not fit the module built by ``arch``."""


class TraceError(VarshiftError):
    """The model's dataflow graph could not be traced."""


class DataError(VarshiftError):
    """Calibration data is missing, unreadable, or does not fit the model."""


class ExportError(VarshiftError):
    """The model could not be exported to ONNX, or the exported file is not valid ONNX.

    Attributes:
        log: what the exporters wrote to stdout / stderr and the warnings they raised while
            trying (swallowed during the export), for debugging.
    """

    def __init__(self, message: str, log: str = "") -> None:
        super().__init__(message)
        self.log = log


class OutputError(VarshiftError):
    """An output path is unusable (the input itself, an unwritable folder, ...)."""


class CallError(DataError):
    """``call`` could not be resolved, raised, or returned no usable output."""


class RemoteError(VarshiftError):
    """Another rank failed; the message is that rank's own one-line error.

    Attributes:
        rank: the failing rank.
        code: the exit code that rank reported (2 for bad input).
    """

    def __init__(self, message: str, rank: int, code: int = 2) -> None:
        super().__init__(message)
        self.rank = rank
        self.code = code


class ConstructorCall(pickle.UnpicklingError):
    """A pickle calls an allow-listed class's constructor (REDUCE) instead of restoring an
    instance (NEWOBJ + BUILD, which is what ``torch.save`` writes)."""


class RandomAtTraceTime(Exception):
    """fx ran a random draw for real while tracing (``if torch.rand(1) < p:``, a draw with no
    traced argument): the graph would bake in one outcome."""


class StopForward(BaseException):
    """Raised by a hook to end a forward pass early: everything needed has been seen.

    A BaseException, so that a model whose forward catches ``Exception`` cannot swallow it.
    """


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: raised in the main thread so that every ``finally`` and
    every temporary-file cleanup runs on the way out, as for Ctrl-C's KeyboardInterrupt.

    Attributes:
        signum: the signal's number (the exit code is 128 + it).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
