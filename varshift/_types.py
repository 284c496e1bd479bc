"""Small shared type aliases (no torch import: the CLI and files.py use them)."""

from __future__ import annotations

from typing import Callable

#: ``progress(batches_done, total_or_None)``: called while calibration data streams.
Progress = Callable[[int, "int | None"], None]
