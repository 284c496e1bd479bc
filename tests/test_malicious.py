"""Malicious pickles in every input kind, with every command: the payload never runs without
``--trust`` (and data is never trusted).

The payload creates a marker file when unpickled by an ordinary unpickler;
``test_payloads_are_live`` proves that for every file, so the other tests can fail.
"""

from __future__ import annotations

import contextlib
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from conftest import TESTS, Result
from fixtures import edge_models as EM
from varshift.cli import main

EDGE_ARCH = f"{TESTS / 'fixtures' / 'edge_models.py'}:build"


class Payload:
    """Unpickling this opens (creates) ``marker`` for writing: code runs at load time."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def run(*argv: object) -> Result:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return Result(code, out.getvalue(), err.getvalue())


def model_files(folder: Path, payload: Payload) -> dict[str, Path]:
    """MODEL files carrying the payload, one per way a model can be stored."""
    model = EM.tiny()
    files = {
        "whole": folder / "evil_whole.pt",
        "legacy": folder / "evil_legacy.pt",
        "nested-checkpoint": folder / "evil_ckpt.pt",
        "deep-checkpoint": folder / "evil_deep.pt",
        "hidden-in-module": folder / "evil_module.pt",
        "plain-pickle": folder / "evil_plain.pt",
    }
    torch.save(payload, files["whole"])
    torch.save({"state_dict": model.state_dict(), "x": payload}, files["legacy"],
               _use_new_zipfile_serialization=False)
    torch.save({"epoch": 1, "state_dict": model.state_dict(), "extra": payload},
               files["nested-checkpoint"])
    torch.save({"model": {"state_dict": model.state_dict()}, "opt": {"hooks": [payload]}},
               files["deep-checkpoint"])
    hidden = EM.tiny()
    hidden.hook = payload  # in the __dict__ of a module built only from torch.nn classes
    torch.save(hidden, files["hidden-in-module"])
    files["plain-pickle"].write_bytes(pickle.dumps({"state_dict": model.state_dict(), "p": payload}))
    return files


def data_files(folder: Path, payload: Payload) -> dict[str, Path]:
    """DATA files carrying the payload, one per data format."""
    x, y = EM.tiny_data()
    files = {
        "pt": folder / "evil_data.pt",
        "pt-legacy": folder / "evil_legacy_data.pt",
        "pt-dict": folder / "evil_dict.pt",
        "tensordataset": folder / "evil_ds.pt",
        "npy": folder / "evil.npy",
        "npz": folder / "evil.npz",
    }
    torch.save((x, payload), files["pt"])
    torch.save((x, y, payload), files["pt-legacy"], _use_new_zipfile_serialization=False)
    torch.save({"inputs": x, "labels": y, "meta": payload}, files["pt-dict"])
    ds = TensorDataset(x, y)
    ds.hook = payload
    torch.save(ds, files["tensordataset"])
    objects = np.empty(2, dtype=object)
    objects[0], objects[1] = payload, payload
    np.save(files["npy"], objects, allow_pickle=True)
    np.savez(files["npz"], inputs=x.numpy(), labels=objects)
    return files


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "PWNED"


def test_payloads_are_live(tmp_path: Path, marker: Path) -> None:
    """Every file's payload runs under an ordinary unpickler: the tests below can fail."""
    payload = Payload(marker)
    for name, path in {**model_files(tmp_path, payload), **data_files(tmp_path, payload)}.items():
        marker.unlink(missing_ok=True)
        if path.suffix == ".npy":
            np.load(path, allow_pickle=True)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=True) as z:
                z["labels"]
        elif name == "plain-pickle":
            pickle.loads(path.read_bytes())
        else:
            torch.load(path, weights_only=False)
        assert marker.exists(), name


COMMANDS = ["scan", "probe", "recalibrate", "swap", "export"]
MODEL_KINDS = ["whole", "legacy", "nested-checkpoint", "deep-checkpoint", "hidden-in-module",
               "plain-pickle"]
DATA_KINDS = ["pt", "pt-legacy", "pt-dict", "tensordataset", "npy", "npz"]


def _argv(command: str, model: Path, out: Path, data: Path, eval_data: Path | None = None) -> list:
    argv = {
        "scan": ["scan", model],
        "probe": ["probe", model, "--data", data],
        "recalibrate": ["recalibrate", model, "--data", data, "-o", out / "fixed.pt"],
        "swap": ["swap", model, "--data", data, "-o", out / "swapped.pt"],
        "export": ["export", model, "--data", data, "-o", out / "model.onnx"],
    }[command]
    if eval_data is not None:
        argv += ["--eval-data", eval_data]
    return argv + ["--report", out / "report.json"]


def _assert_refused(result: Result, marker: Path, out: Path) -> None:
    assert not marker.exists(), "the payload ran"
    assert result.code == 2, result.err
    assert len(result.err_lines) == 1 and "Traceback" not in result.err
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("command", COMMANDS)
def test_malicious_model_never_runs(tmp_path: Path, marker: Path, command: str, kind: str):
    model = model_files(tmp_path, Payload(marker))[kind]
    torch.save(EM.tiny_data(), tmp_path / "data.pt")
    out = tmp_path / "out"
    out.mkdir()
    result = run(*_argv(command, model, out, tmp_path / "data.pt"), "--arch", EDGE_ARCH)
    _assert_refused(result, marker, out)


@pytest.mark.parametrize("kind", DATA_KINDS)
@pytest.mark.parametrize("command", COMMANDS[1:])
def test_malicious_data_never_runs(tmp_path: Path, marker: Path, command: str, kind: str):
    data = data_files(tmp_path, Payload(marker))[kind]
    torch.save(EM.tiny(), tmp_path / "model.pt")
    out = tmp_path / "out"
    out.mkdir()
    result = run(*_argv(command, tmp_path / "model.pt", out, data))
    _assert_refused(result, marker, out)


@pytest.mark.parametrize("kind", DATA_KINDS)
@pytest.mark.parametrize("command", ["recalibrate", "swap"])
def test_malicious_eval_data_never_runs(tmp_path: Path, marker: Path, command: str, kind: str):
    evil = data_files(tmp_path, Payload(marker))[kind]
    torch.save(EM.tiny(), tmp_path / "model.pt")
    torch.save(EM.tiny_data(), tmp_path / "data.pt")
    out = tmp_path / "out"
    out.mkdir()
    result = run(*_argv(command, tmp_path / "model.pt", out, tmp_path / "data.pt", evil))
    _assert_refused(result, marker, out)


@pytest.mark.parametrize("kind", DATA_KINDS)
def test_trust_never_reaches_data(tmp_path: Path, marker: Path, kind: str):
    """--trust is about MODEL only: data files stay on the safe path."""
    data = data_files(tmp_path, Payload(marker))[kind]
    torch.save(EM.tiny(), tmp_path / "model.pt")
    result = run("probe", tmp_path / "model.pt", "--data", data, "--trust")
    assert not marker.exists()
    assert result.code == 2 and len(result.err_lines) == 1
