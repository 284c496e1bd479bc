"""The command line: a thin layer that turns flags into the library's specs and calls it."""

from .app import app, main, run

__all__ = ["app", "main", "run"]
