"""Small shared types (no torch import: the CLI and files.py use them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

#: ``progress(batches_done, total_or_None)``: called while calibration data streams.
Progress = Callable[[int, "int | None"], None]


@dataclass
class SourceLocation:
    """A line of Python source: ``file`` (relative to the current directory when inside it),
    1-based ``line``, and the ``function`` it is in (None for a definition site)."""

    file: str
    line: int
    function: str | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        return f"{where} in {self.function}" if self.function else where
