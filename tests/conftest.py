"""Shared test helpers: the ``--update-golden`` flag, saved model files, and CLI runners."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
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


# JSON documents checked against the shipped schemas in this run, by schema id.
VALIDATED: collections.Counter[str] = collections.Counter()


def validate_document(doc: dict) -> None:
    """Check one report document against its JSON Schema (varshift/schemas/)."""
    from varshift import schema

    schema.validate(doc)
    VALIDATED[doc["schema"]] += 1


@pytest.fixture(autouse=True, scope="session")
def _validate_every_report():
    """Every report document the suite produces (``to_dict()``: the API, the CLI's --format
    json and --report, nested recalibration / ONNX results) is validated against its schema
    on the way out; a mismatch fails the test that produced it."""
    import jsonschema  # noqa: F401  (the test extra; fail here, not in the middle of a test)

    from varshift import reports

    original = reports._document

    def checked(name: str, body: dict) -> dict:
        doc = original(name, body)
        validate_document(doc)
        return doc

    reports._document = checked
    yield
    reports._document = original


def pytest_terminal_summary(terminalreporter) -> None:
    if VALIDATED:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(VALIDATED.items()))
        terminalreporter.write_line(f"JSON reports validated against their schemas: {counts}")


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
    _validate_if_report(proc.stdout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def _validate_if_report(text: str) -> None:
    """Validate stdout that is a JSON report (a subprocess's documents bypass the hook)."""
    if not text.lstrip().startswith("{"):
        return
    try:
        doc = json.loads(text)
    except ValueError:
        return
    if isinstance(doc, dict) and str(doc.get("schema", "")).startswith("varshift."):
        validate_document(doc)


def signal_mid_recalibrate(tmp_path: Path, sig: int, *, start_timeout: float,
                           settle: float) -> tuple[int, str]:
    """Run ``python -m varshift recalibrate`` on a slow data callable in a real subprocess,
    send it ``sig`` once it is ``settle`` seconds into reading its data, and return its exit
    code and stderr. The model is ``tmp_path/model.pt``, the output ``tmp_path/fixed.pt``
    and the marker the data callable writes ``tmp_path/started``."""
    import torch

    from fixtures import fix_models as FM

    torch.manual_seed(0)
    model, out = tmp_path / "model.pt", tmp_path / "fixed.pt"
    torch.save(FM.chain3(), model)
    marker = tmp_path / "started"
    proc = subprocess.Popen(
        [sys.executable, "-m", "varshift", "recalibrate", model, "--output", out,
         "--data", f"{TESTS / 'fixtures' / 'fix_models.py'}:slow_batches"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=subprocess_env(VARSHIFT_TEST_MARKER=str(marker), OMP_NUM_THREADS="1"),
    )
    try:
        deadline = time.monotonic() + start_timeout
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never started reading data"
            time.sleep(0.05)
        time.sleep(settle)
        assert proc.poll() is None, "the run finished before the signal"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


@pytest.fixture
def save(tmp_path: Path):
    """``save(obj, name, **torch_save_kwargs) -> Path``: torch.save into tmp_path."""
    import torch

    def _save(obj, name: str = "model.pt", **kwargs) -> Path:
        path = tmp_path / name
        torch.save(obj, path, **kwargs)
        return path

    return _save
