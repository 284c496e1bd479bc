"""varshift._io, the one mechanism for output files: checks, staging, all-or-nothing commits."""

from __future__ import annotations

import os
import signal
import stat
import sys
import threading
from pathlib import Path

import pytest

from varshift import _io
from varshift.errors import OutputError


def test_transaction_commits_every_file_together(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    with _io.transaction():
        _io.write_text_atomic(a, "A")
        _io.write_with(b, lambda tmp: tmp.write_text("B"))
        # staged, not yet in place: nothing at the targets, one temp beside each
        assert not a.exists() and not b.exists()
        assert len([p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]) == 2
    assert a.read_text() == "A" and b.read_text() == "B"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


@pytest.mark.parametrize("exc", [ValueError("boom"), KeyboardInterrupt()])
def test_transaction_discards_every_file_on_error(tmp_path, exc):
    (tmp_path / "a.txt").write_text("old")
    with pytest.raises(type(exc)):
        with _io.transaction():
            _io.write_text_atomic(tmp_path / "a.txt", "new")
            _io.write_text_atomic(tmp_path / "b.txt", "B")
            raise exc
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    assert (tmp_path / "a.txt").read_text() == "old"


def test_nested_transactions_join_the_outer_one(tmp_path):
    with pytest.raises(RuntimeError):
        with _io.transaction():
            with _io.transaction():
                _io.write_text_atomic(tmp_path / "inner.txt", "x")
            assert not (tmp_path / "inner.txt").exists()  # the inner end commits nothing
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []


def test_threads_have_their_own_transactions(tmp_path):
    """A thread that fails discards its files only; another thread's commit is its own."""
    started, failed = threading.Event(), threading.Event()

    def worker():
        with _io.transaction():
            _io.write_text_atomic(tmp_path / "worker.txt", "w")
            started.set()
            failed.wait(10)

    t = threading.Thread(target=worker)
    t.start()
    started.wait(10)
    with pytest.raises(ValueError):
        with _io.transaction():
            _io.write_text_atomic(tmp_path / "main.txt", "m")
            raise ValueError
    failed.set()
    t.join(10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["worker.txt"]


def test_without_a_transaction_each_write_lands_at_once(tmp_path):
    _io.write_text_atomic(tmp_path / "a.txt", "A")
    assert (tmp_path / "a.txt").read_text() == "A"
    assert oct(stat.S_IMODE((tmp_path / "a.txt").stat().st_mode)) == "0o644"


def test_a_symlinked_output_keeps_its_link(tmp_path):
    real = tmp_path / "real.txt"
    real.write_text("old")
    (tmp_path / "link.txt").symlink_to(real)
    _io.write_text_atomic(tmp_path / "link.txt", "new")
    assert (tmp_path / "link.txt").is_symlink() and real.read_text() == "new"


def test_dev_null_is_written_through():
    before = os.stat(os.devnull)
    _io.write_text_atomic(os.devnull, "x" * 1000)
    after = os.stat(os.devnull)
    assert stat.S_ISCHR(after.st_mode) and after.st_ino == before.st_ino


@pytest.mark.parametrize("path,message", [
    ("", "empty path"),
    ("   ", "empty path"),
    ("{tmp}/new/", "ends with '/'"),
    ("{tmp}", "is a directory"),
    ("{tmp}/missing/x.pt", "does not exist"),
    ("/proc/x.pt", "cannot create files"),
])
def test_check_output_path_refuses(tmp_path, path, message):
    with pytest.raises(OutputError, match=message.replace("(", r"\(")) as info:
        _io.check_output_path(path.format(tmp=tmp_path), "--output")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # the writability probe left nothing


def test_check_output_path_refuses_fifos_and_sockets(tmp_path):
    import socket

    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OutputError, match="FIFO"):
        _io.check_output_path(tmp_path / "fifo", "--output")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tmp_path / "sock"))
        with pytest.raises(OutputError, match="socket"):
            _io.check_output_path(tmp_path / "sock", "--output")
    finally:
        sock.close()


def test_inputs_are_recognized_through_links_and_specs(tmp_path):
    src = tmp_path / "net.py"
    src.write_text("def build(): pass\n")
    os.link(src, tmp_path / "hard.py")
    (tmp_path / "soft.py").symlink_to(src)
    spec = f"{src}:build"
    for out in ("net.py", "hard.py", "soft.py", "sub/../net.py"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(OutputError, match="input file"):
            _io.check_output_path(tmp_path / out, "--report", [spec])
    assert _io.spec_file("json:dumps") == Path(sys.modules["json"].__file__)
    assert _io.spec_file("no_such_module_xyz:fn") is None


def test_check_outputs_refuses_two_outputs_on_one_file_but_not_dev_null(tmp_path):
    with pytest.raises(OutputError, match="same file"):
        _io.check_outputs([], ("--output", tmp_path / "x"), ("--report", tmp_path / "x"))
    _io.check_outputs([], ("--output", os.devnull), ("--report", os.devnull))


def test_signals_wait_for_the_commit(tmp_path):
    """A signal that arrives while the staged files are renamed is delivered, to the handler
    that was in place, after the last rename: never between two of them."""
    seen = []
    old = signal.signal(signal.SIGTERM, lambda *a: seen.append(
        sorted(p.name for p in tmp_path.iterdir())))
    try:
        with _io._signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # give Python every chance to run a pending handler
                pass
            assert seen == []
            (tmp_path / "renamed").write_text("")
        for _ in range(1000):
            pass
        assert seen == [["renamed"]]
    finally:
        signal.signal(signal.SIGTERM, old)


class _SignalsWhenUsed(type(Path())):
    """A staged file's path that sends this process a real SIGINT each time the OS is handed
    it: Ctrl-C arriving in the middle of the commit's renames."""

    def __fspath__(self) -> str:
        os.kill(os.getpid(), signal.SIGINT)
        return super().__fspath__()


def test_a_commit_is_never_cut_by_a_signal(tmp_path):
    with pytest.raises(KeyboardInterrupt):  # delivered, after the commit
        with _io.transaction():
            for name in ("a", "b", "c"):
                _io.write_text_atomic(tmp_path / f"{name}.txt", name)
            txn = _io._current()
            tmp, target = txn.staged[0]
            txn.staged[0] = (_SignalsWhenUsed(tmp), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "c.txt"]
    assert (tmp_path / "c.txt").read_text() == "c"
    assert _io.outputs_committed()  # so the CLI does not claim "no output was written"
    with pytest.raises(ValueError):
        with _io.transaction():
            _io.write_text_atomic(tmp_path / "d.txt", "d")
            raise ValueError
    assert not _io.outputs_committed()


def test_write_failures_become_output_errors(tmp_path):
    def fail(tmp):
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match="No space left on device") as info:
        _io.write_with(tmp_path / "x.pt", fail)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_other_errors_in_a_writer_pass_through(tmp_path):
    def fail(tmp):
        raise ValueError("a bug, not a disk")

    with pytest.raises(ValueError):
        _io.write_with(tmp_path / "x.pt", fail)
    assert list(tmp_path.iterdir()) == []
