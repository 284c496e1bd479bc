"""Deterministic fuzzing of every command with corrupted model and data files.

Cases are generated from fixed seeds (the same cases on every run): truncations, bit flips,
zeroed ranges and random bytes behind real magic numbers (zip, pickle, legacy torch.save,
numpy) of a real model, checkpoint and data files; odd dtypes and shapes; NaN/Inf, huge,
subnormal and constant values. Every command runs on them in-process, and every run must keep
the contract:

* the exit code is 0, 1 or 2 (130/143 only for an interrupt; never 3, a bug);
* exit 2 prints exactly one line on stderr, ``varshift: error: ...``; no run prints a
  traceback;
* every input file is byte-identical afterwards;
* a failed run leaves nothing at or beside its output paths; a successful one leaves no
  temporary file.

ONNX export costs seconds per successful run, so ``export`` runs on every corrupted file
that fails before exporting and on a fixed sample of the rest (``EXPORT_SAMPLE``).
The whole module runs in well under two minutes on one core.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TESTS, Result
from fixtures import edge_models as EM
from varshift.cli import main

EDGE_PY = TESTS / "fixtures" / "edge_models.py"
OK_CODES = {0, 1, 2, 130, 143}
#: Which fuzzed files (by index among those that load) also get a full ONNX export.
EXPORT_SAMPLE = 3

#: torch.save's legacy magic number as pickled (LONG1) after PROTO 2.
LEGACY_HEAD = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."


def run(*argv: object) -> Result:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return Result(code, out.getvalue(), err.getvalue())


# --------------------------------------------------------------------------- mutations


def truncations(data: bytes, rng: random.Random) -> dict[str, bytes]:
    n = len(data)
    cuts = sorted({1, 16, n // 10, n // 2, (9 * n) // 10, n - 1, rng.randrange(2, n - 1)})
    return {f"trunc{c}": data[:c] for c in cuts}


def bit_flips(data: bytes, rng: random.Random, count: int, rounds: int) -> dict[str, bytes]:
    out = {}
    for r in range(rounds):
        b = bytearray(data)
        for _ in range(count):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        out[f"flip{count}x{r}"] = bytes(b)
    return out


def zeroed(data: bytes, rng: random.Random, rounds: int) -> dict[str, bytes]:
    out = {}
    for r in range(rounds):
        a = rng.randrange(len(data))
        b = min(len(data), a + rng.randrange(1, 256))
        out[f"zero{r}"] = data[:a] + bytes(b - a) + data[b:]
    return out


def magic_garbage(rng: random.Random) -> dict[str, bytes]:
    heads = {"zip": b"PK\x03\x04", "pickle": b"\x80\x02", "legacy": LEGACY_HEAD,
             "npy": b"\x93NUMPY\x01\x00", "text": b"cos\nsystem\n"}
    return {f"magic-{k}": h + rng.randbytes(rng.randrange(1, 400)) for k, h in heads.items()}


def mutations(data: bytes, seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {**truncations(data, rng), **bit_flips(data, rng, 1, 3), **bit_flips(data, rng, 16, 3),
            **zeroed(data, rng, 2), **magic_garbage(rng)}


# --------------------------------------------------------------------------- base files


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("fuzz_base")
    x, y = EM.tiny_data()
    torch.save(EM.tiny(), d / "model.pt")
    torch.save({"epoch": 1, "state_dict": EM.tiny().state_dict()}, d / "ckpt.pt")
    torch.save((x, y), d / "data.pt")
    np.save(d / "data.npy", x.numpy())
    np.savez(d / "data.npz", inputs=x.numpy(), labels=y.numpy())
    return {p.stem + p.suffix.replace(".", "_"): p for p in d.iterdir()}


def _value_cases() -> dict[str, object]:
    """Data files with odd values, dtypes and shapes (built lazily, deterministic)."""
    x, y = EM.tiny_data()
    gen = torch.Generator().manual_seed(3)

    def with_value(v: float) -> torch.Tensor:
        z = x.clone()
        idx = torch.randint(0, z.numel(), (3,), generator=gen)
        z.view(-1)[idx] = v
        return z

    return {
        "nan": (with_value(float("nan")), y),
        "inf": (with_value(float("inf")), y),
        "huge": (with_value(1e30), y),
        "max-float32": (with_value(3.4e38), y),
        "subnormal": (x * 1e-44, y),
        "zeros": (torch.zeros_like(x), y),
        "constant": (torch.full_like(x, 7.0), y),
        "float64": (x.double(), y),
        "float16": (x.half(), y),
        "bfloat16": (x.bfloat16(), y),
        "uint8": ((x * 30 + 128).clamp(0, 255).to(torch.uint8), y),
        "bool": (x > 0, y),
        "complex": (x.to(torch.complex64), y),
        "float8": (x.to(torch.float8_e5m2), y),
        "one-sample": (x[:1], y[:1]),
        "two-samples": (x[:2], y[:2]),
        "empty": (x[:0], y[:0]),
        "scalar": (torch.tensor(1.0), None),
        "1d": (x.view(-1), None),
        "5d": (x.unsqueeze(2), y),
        "wrong-channels": (x.repeat(1, 3, 1, 1), y),
        "labels-short": (x, y[:5]),
        "labels-2d": (x, y.view(-1, 1).float()),
        "labels-huge": (x, y + 10**12),
        "strided-view": (x.transpose(2, 3), y),
    }


# --------------------------------------------------------------------------- runs


def _digest(paths: list[Path]) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file()}


def _commands(model: Path, data: Path, out: Path, export: bool, arch: bool) -> list[list]:
    model_args = [model, "--arch", f"{EDGE_PY}:build"] if arch else [model]
    cmds = [
        ["scan", *model_args, "--report", out / "scan.json"],
        ["probe", *model_args, "--data", data, "--report", out / "probe.md"],
        ["recalibrate", *model_args, "--data", data, "-o", out / "fixed.pt",
         "--report", out / "r.json"],
        ["recalibrate", *model_args, "--data", data, "--exact", "-o", out / "exact.pt"],
        ["swap", *model_args, "--data", data, "-o", out / "swapped.pt"],
    ]
    if export:
        cmds.append(["export", *model_args, "--data", data, "-o", out / "model.onnx"])
    return cmds


def _check(result: Result, argv: list, inputs_before: dict, inputs: list[Path], out: Path):
    where = " ".join(str(a) for a in argv)
    assert result.code in OK_CODES, (where, result.code, result.err[-3000:])
    assert "Traceback" not in result.err, (where, result.err[-3000:])
    if result.code == 2:
        lines = result.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("varshift: error: "), (where, result.err)
        assert list(out.iterdir()) == [], (where, sorted(p.name for p in out.iterdir()))
    else:
        assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == [], where
    assert _digest(inputs) == inputs_before, where


def _loads(model: Path, data: Path, arch: bool) -> bool:
    """Whether both files load (then an export would really run, which takes seconds)."""
    from varshift.data import load_data
    from varshift.errors import VarshiftError
    from varshift.loading import load_model

    try:
        load_model(model, arch=f"{EDGE_PY}:build" if arch else None)
        for _ in load_data(data):
            pass
    except VarshiftError:
        return False
    return True


#: Exports of loadable files so far, across the module (see EXPORT_SAMPLE).
_exports: list[Path] = []


def _fuzz(files: list[tuple[Path, Path, bool]], tmp: Path, counter: list) -> None:
    """Run every command on each (model, data, arch) triple."""
    for model, data, arch in files:
        inputs = [model, data]
        before = _digest(inputs)
        loads = _loads(model, data, arch)
        export = not loads or len(_exports) < EXPORT_SAMPLE
        if loads and export:
            _exports.append(model)
        out = tmp / "out"
        for argv in _commands(model, data, out, export, arch):
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            _check(run(*argv, "--quiet"), argv, before, inputs, out)
            counter.append(argv[0])


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", ["model_pt", "ckpt_pt"])
def test_fuzzed_models(base, tmp_path, name):
    counter: list = []
    source = base[name]
    files = []
    for i, (label, blob) in enumerate(sorted(mutations(source.read_bytes(), seed=11).items())):
        path = tmp_path / f"{label}.pt"
        path.write_bytes(blob)
        files.append((path, base["data_pt"], name == "ckpt_pt"))
    _fuzz(files, tmp_path, counter)
    print(f"fuzz: {len(files)} files, {len(counter)} runs")
    assert len(counter) >= 5 * len(files)


@pytest.mark.parametrize("name", ["data_pt", "data_npy", "data_npz"])
def test_fuzzed_data_files(base, tmp_path, name):
    counter: list = []
    source = base[name]
    files = []
    for label, blob in sorted(mutations(source.read_bytes(), seed=23).items()):
        path = tmp_path / f"{label}{source.suffix}"
        path.write_bytes(blob)
        files.append((base["model_pt"], path, False))
    _fuzz(files, tmp_path, counter)
    print(f"fuzz: {len(files)} files, {len(counter)} runs")
    assert len(counter) >= 5 * len(files)


def test_odd_values_dtypes_and_shapes(base, tmp_path):
    counter: list = []
    files = []
    for label, (x, y) in _value_cases().items():
        path = tmp_path / f"{label}.pt"
        torch.save(x if y is None else (x, y), path)
        files.append((base["model_pt"], path, False))
    _fuzz(files, tmp_path, counter)
    print(f"fuzz: {len(files)} files, {len(counter)} runs")
    assert len(counter) >= 5 * len(files)


def test_case_count_is_stable():
    """The generators are deterministic: the same inputs make the same cases."""
    a = mutations(bytes(range(256)) * 8, seed=11)
    b = mutations(bytes(range(256)) * 8, seed=11)
    assert a == b and len(a) >= 20
