"""Output files: checked before any work, staged beside their targets, committed together.

One mechanism for every file varshift writes (models, ONNX files, reports):

* :func:`check_output_path` runs before any work. It refuses an output that is one of the
  run's input files (through symlinks and hard links), an empty path, a path ending in ``/``,
  a directory, a FIFO, socket or block device, a folder that does not exist, and a folder in
  which a file cannot actually be created (it creates and removes a temporary file there, so
  ``/proc``, ``/sys``, read-only mounts and permission problems are caught before minutes of
  computation, not after).
* :func:`atomic_path` writes to a temporary file beside the target. Outside a
  :func:`transaction` it renames it onto the target at once; inside one, the rename waits for
  the end of the transaction, so a run writes all its outputs or none of them (a failing
  ``--onnx`` export leaves no ``--output`` behind). On any error or signal the temporary files
  are removed.
* A symlink output is followed (the link stays, its target is replaced, as ``cp`` does); a
  character device such as ``/dev/null`` is written through, never replaced.
* OS errors while writing (a full disk, a quota, a file-size limit) are
  :class:`~varshift.errors.OutputError`: one line, exit 2.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
import shutil
import signal
import stat
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..errors import OutputError

#: Errors that mean "this place cannot take the file", whatever the file is. (Permissions
#: and missing folders are checked before any work; an ENOENT deep inside an exporter is
#: more likely the exporter's own business than the output's.)
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


# --------------------------------------------------------------------------- inputs


def input_files(*specs: "str | os.PathLike | None") -> list[Path]:
    """The files a run reads, from its MODEL/DATA paths and ``pkg.module:fn`` /
    ``file.py:fn`` specs (``arch``, ``data``, ``call``); specs whose module cannot be
    located without running it are skipped. None entries are ignored."""
    out: list[Path] = []
    for spec in specs:
        if spec is None or str(spec) == "":
            continue
        path = spec_file(spec)
        if path is not None:
            out.append(path)
    return out


def spec_file(spec: "str | os.PathLike") -> Path | None:
    """The file behind a path or a ``target:callable`` spec (None when there is none)."""
    text = os.fspath(spec)
    path = Path(text)
    if path.exists() or ":" not in text:
        return path
    target = text.rpartition(":")[0]
    if not target:
        return None
    if target.endswith(".py") or "/" in target or os.sep in target:
        return Path(target)
    if "." in target:
        # find_spec on a dotted name imports the parent packages (runs their __init__);
        # only look for modules whose parents are already imported.
        parent = target.rpartition(".")[0]
        import sys

        if parent not in sys.modules:
            return None
    try:
        found = importlib.util.find_spec(target)
    except (ImportError, ValueError, AttributeError):
        return None
    origin = getattr(found, "origin", None) if found is not None else None
    return Path(origin) if origin and os.path.isfile(origin) else None


def _same_file(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` name one file: the same inode (symlinks, hard links,
    ``..`` detours) or, when one does not exist yet, the same resolved path."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return Path(os.path.realpath(a)) == Path(os.path.realpath(b))


# --------------------------------------------------------------------------- checks


def check_output_path(out: "str | os.PathLike", what: str, inputs: Iterable = ()) -> Path:
    """Check, before any work, that ``out`` can be written and is none of ``inputs``.

    Args:
        out: the output path as the user gave it.
        what: the parameter that named it, for messages, in backticks (```output```,
            ```report```, ...: the command line writes it as its flag).
        inputs: paths (or specs, see :func:`input_files`) of every file the run reads.

    Returns:
        ``out`` as a Path.

    Raises:
        OutputError: one line naming the path and the problem.
    """
    text = os.fspath(out)
    if text.strip() == "":
        raise OutputError(f"{what} is an empty path; give a file path")
    path = Path(text)
    for inp in input_files(*inputs):
        if _same_file(path, inp):
            raise OutputError(f"{what} {path} is an input file ({inp}); write the output elsewhere")
    if path.is_dir():
        raise OutputError(f"{what} {path} is a directory; give a file path")
    if text.endswith(("/", os.sep)):
        raise OutputError(f"{what} {text} ends with '/' (a folder); give a file path")
    real = Path(os.path.realpath(path))
    if real.exists():
        mode = real.stat().st_mode
        if stat.S_ISCHR(mode):  # /dev/null, a terminal: written through, never replaced
            if not os.access(real, os.W_OK):
                raise OutputError(f"{what} {path} is a character device that is not writable")
            return path
        if not stat.S_ISREG(mode):
            kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket"
                    if stat.S_ISSOCK(mode) else "a block device" if stat.S_ISBLK(mode)
                    else "a special file")
            raise OutputError(f"{what} {path} is {kind}; varshift writes regular files "
                              "(or a character device such as /dev/null)")
    parent = real.parent
    if not parent.is_dir():
        raise OutputError(f"{what} {path}: folder {path.parent} does not exist")
    _probe_folder(parent, path, what)
    if real.exists():
        _check_replaceable(real, parent, path, what)
    return path


def _probe_folder(parent: Path, path: Path, what: str) -> None:
    """Create and remove a temporary file in ``parent``: the only test that answers for
    /proc, /sys, read-only mounts, ACLs and quotas alike (``os.access`` does not)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".varshift-check.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise OutputError(f"{what} {path}: cannot create files in {parent} "
                          f"({exc.strerror or exc})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def _check_replaceable(real: Path, parent: Path, path: Path, what: str) -> None:
    """In a sticky folder (``/tmp``), only the file's owner (or the folder's, or root) may
    replace it: a rename onto another user's file fails after all the work."""
    euid = os.geteuid() if hasattr(os, "geteuid") else 0
    try:
        pst, tst = parent.stat(), real.stat()
    except OSError:
        return
    if (pst.st_mode & stat.S_ISVTX and euid != 0 and tst.st_uid != euid
            and pst.st_uid != euid):
        raise OutputError(f"{what} {path} belongs to another user in the sticky folder "
                          f"{parent}; it cannot be replaced, write elsewhere")


def check_outputs(inputs: Iterable, *outputs: "tuple[str, str | os.PathLike | None]") -> None:
    """:func:`check_output_path` for every named output, and no two outputs the same file.

    Args:
        inputs: paths and specs of every file the run reads.
        outputs: ``(option, path or None)`` pairs; None entries are skipped.
    """
    inputs = list(inputs)
    seen: list[tuple[Path, str]] = []
    for what, path in outputs:
        if path is None:
            continue
        checked = check_output_path(path, what, inputs)
        if _is_char_device(checked):  # several outputs may go to /dev/null
            continue
        for other, other_what in seen:
            if _same_file(checked, other):
                raise OutputError(f"{what} and {other_what} are the same file: {path}")
        seen.append((checked, what))


def _is_char_device(path: Path) -> bool:
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False


# --------------------------------------------------------------------------- transactions


class _Transaction:
    """Temporary files waiting to be renamed onto their targets, all together."""

    def __init__(self) -> None:
        self.staged: list[tuple[Path, Path]] = []

    def discard(self) -> None:
        for tmp, _ in self.staged:
            with contextlib.suppress(OSError):
                tmp.unlink()
        self.staged.clear()

    def commit(self) -> None:
        """Install every staged file. Signals wait until it is done, so that an interrupt
        cannot leave some outputs written and others not."""
        with _signals_deferred():
            pending = list(self.staged)
            self.staged.clear()
            try:
                while pending:
                    tmp, target = pending[0]
                    _install(tmp, target)
                    pending.pop(0)
            except OSError as exc:
                for tmp, _ in pending:
                    with contextlib.suppress(OSError):
                        tmp.unlink()
                raise _write_error(target, exc) from None


#: The open transaction of each thread: threads that write files at the same time through
#: the API must not commit or discard each other's outputs.
_local = threading.local()


def _current() -> "_Transaction | None":
    return getattr(_local, "txn", None)


@contextlib.contextmanager
def transaction() -> Iterator[None]:
    """Within it, :func:`atomic_path` stages its file; at the end every staged file is
    renamed onto its target (on success) or removed (on any exception, interrupt or signal).
    A transaction inside another (in the same thread) joins the outer one."""
    if _current() is not None:
        yield
        return
    txn = _local.txn = _Transaction()
    _local.committed = False
    try:
        yield
    except BaseException:
        _local.txn = None
        txn.discard()
        raise
    _local.txn = None
    _local.committed = bool(txn.staged)
    txn.commit()


def outputs_committed() -> bool:
    """Whether this thread's last transaction renamed its files into place (a signal held
    during the commit is raised after it: the outputs are then complete, not missing)."""
    return bool(getattr(_local, "committed", False))


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP until the body is done, then deliver them to the handlers
    that were in place. Blocking the signal mask is not enough: a signal sent to the process
    may land on any thread that does not block it (torch's worker threads), and Python then
    runs the handler in the main thread all the same. Python runs handlers only in the main
    thread, so elsewhere there is nothing to hold."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    old: dict[int, object] = {}
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is None:
            continue
        try:
            old[signum] = signal.signal(signum, lambda n, _frame: pending.append(n))
        except (ValueError, OSError):  # not settable here
            continue
    try:
        yield
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)


def _install(tmp: Path, target: Path) -> None:
    if _is_char_device(target):
        with tmp.open("rb") as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.unlink()
        return
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)


def _write_error(target: Path, exc: BaseException, written: int | None = None) -> OutputError:
    """One line for a failed write. Writers that hide the OS error (torch.save's C++ zip
    writer says "unexpected pos 64 vs 0") get a diagnosis from the file system instead."""
    reason = _errno_reason(exc) or _diagnose(target, written)
    if reason is None:
        text = str(exc).strip().splitlines()
        reason = text[0][:200] if text else type(exc).__name__
    return OutputError(f"cannot write {target} ({reason}); nothing was written")


def _errno_reason(exc: BaseException | None) -> str | None:
    for _ in range(10):
        if exc is None:
            return None
        if isinstance(exc, OSError) and exc.strerror:
            return exc.strerror
        exc = exc.__cause__ or exc.__context__
    return None


def _diagnose(target: Path, written: int | None) -> str | None:
    """Why a write may have failed, from the outside: a full file system or the process's
    file-size limit (``ulimit -f``)."""
    folder = Path(os.path.realpath(target)).parent
    with contextlib.suppress(OSError, AttributeError):
        st = os.statvfs(folder)
        if st.f_bavail * st.f_frsize < 1 << 20:
            return "No space left on device"
    with contextlib.suppress(ImportError, OSError, ValueError):
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and written is not None and written >= limit - 4096:
            return f"File too large: the file-size limit (ulimit -f) is {limit} bytes"
    return None


def is_write_failure(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from) is an OS-level write failure:
    a full disk, a quota, a file-size limit, a read-only file system, ... Writers such as
    ``torch.save`` or an ONNX exporter wrap these in their own exception types."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 10:
        exc = current
        if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
            return True
        text = str(exc)
        if any(s in text for s in ("No space left", "Disk quota", "File too large",
                                   "Read-only file system", "file write failed",
                                   "failed writing file", "PytorchStreamWriter",
                                   "inline_container.cc")):
            return True
        current = exc.__cause__ or exc.__context__
        seen += 1
    return False


@contextlib.contextmanager
def atomic_path(target: "str | os.PathLike") -> Iterator[Path]:
    """Yield a temporary path beside ``target`` (following a symlink target to its file);
    move it onto ``target`` when the body succeeds: at once, or at the end of the current
    :func:`transaction`. On any error the temporary file is removed; a write failure (full
    disk, ...) becomes an OutputError."""
    target = Path(target)
    real = Path(os.path.realpath(target))
    device = _is_char_device(real)
    folder = Path(tempfile.gettempdir()) if device else real.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{real.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise _write_error(target, exc) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
    except BaseException as exc:
        written = None
        with contextlib.suppress(OSError):
            written = tmp_path.stat().st_size
            tmp_path.unlink()
        if isinstance(exc, Exception) and not isinstance(exc, OutputError) and (
                is_write_failure(exc) or _diagnose(target, written)):
            raise _write_error(target, exc, written) from exc
        raise
    txn = _current()
    if txn is not None:
        txn.staged.append((tmp_path, real))
        return
    try:
        _install(tmp_path, real)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise _write_error(target, exc) from None


def write_text_atomic(target: "str | os.PathLike", text: str) -> None:
    """Write ``text`` to ``target`` atomically (staged inside a :func:`transaction`)."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_with(target: "str | os.PathLike", writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and move the result onto ``target`` atomically (staged
    inside a :func:`transaction`)."""
    with atomic_path(target) as tmp:
        writer(tmp)
