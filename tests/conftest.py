"""Shared test helpers: the ``--update-golden`` flag, saved model files, and CLI runners."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
GOLDEN = TESTS / "golden"

# The fixture models live in tests/fixtures; pickles of them name ``fixtures.models.<Class>``.
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="Regenerate tests/golden/* from the current renderers instead of comparing.",
    )


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-golden"))


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread for the whole suite: the test models are small, and on a shared
    2-core machine two threads made each op many times slower (measured 14-30x). Numbers are
    compared with tolerances either way."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _plain_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rendering must not depend on the developer's terminal settings."""
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS", "LINES"):
        monkeypatch.delenv(var, raising=False)


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return self.err.splitlines()


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run ``varshift.cli.main(argv)`` in-process and return its code, stdout and stderr."""
    from varshift.cli import main

    def run(*argv: object) -> Result:
        capsys.readouterr()  # drop anything printed before
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "COLUMNS")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS), str(REPO), *filter(None, [env.get("PYTHONPATH")])]
    )
    env.update(extra)
    return env


def run_module(*argv: object, cwd: Path | None = None, **env: str) -> Result:
    """Run ``python -m varshift ...`` in a real subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "varshift", *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=subprocess_env(**env),
        timeout=120,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def save(tmp_path: Path):
    """``save(obj, name, **torch_save_kwargs) -> Path``: torch.save into tmp_path."""
    import torch

    def _save(obj, name: str = "model.pt", **kwargs) -> Path:
        path = tmp_path / name
        torch.save(obj, path, **kwargs)
        return path

    return _save
