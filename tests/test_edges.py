"""Every edge of the contract "2: bad input, one line on stderr; anything else is a bug" and
"outputs are written atomically and never replace the input", by class of failure:

1. outputs never destroy any file the run reads; 2. special output files; 3. write failures
and all-or-nothing outputs; 4. SIGTERM/SIGHUP; 5. extreme and odd data; 6. option ranges;
7. user code that calls sys.exit; 8. evidence that cannot be computed is said, not dropped;
9. what the safe loader may allocate; 10. messages that name the real problem.

Runs are real: real files, real models, ``varshift.cli.main`` in-process (or a subprocess
where a signal or a resource limit must hit a whole process).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TESTS, Result, signal_mid_recalibrate, subprocess_env
from fixtures import edge_models as EM
from varshift.cli import main

EDGE_PY = TESTS / "fixtures" / "edge_models.py"


def run(*argv: object) -> Result:
    """``varshift.cli.main`` in-process, stdout and stderr captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return Result(code, out.getvalue(), err.getvalue())


def usage_error(result: Result, *mentions: str) -> None:
    assert result.code == 2, (result.code, result.err[-2000:])
    assert len(result.err_lines) == 1, result.err
    assert result.err.startswith("varshift: error: ")
    assert "Traceback" not in result.err
    for m in mentions:
        assert m in result.err, result.err


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every regular file under ``folder`` with its bytes (links followed)."""
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Inputs of every kind: a whole-module model, a checkpoint with its --arch file, data
    as .pt / .npy, held-out data, and a .py data source."""
    d = tmp_path_factory.mktemp("edge_inputs")
    model = EM.tiny()
    x, y = EM.tiny_data()
    torch.save(model, d / "model.pt")
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, d / "ckpt.pt")
    shutil.copy(EDGE_PY, d / "arch.py")
    shutil.copy(EDGE_PY, d / "source.py")
    torch.save((x, y), d / "data.pt")
    np.save(d / "data.npy", x.numpy())
    xe, ye = EM.tiny_data(seed=5)
    torch.save((xe, ye), d / "eval.pt")
    return {"dir": d, "model": d / "model.pt", "ckpt": d / "ckpt.pt", "arch": d / "arch.py",
            "source": d / "source.py", "data": d / "data.pt", "npy": d / "data.npy",
            "eval": d / "eval.pt"}


# --------------------------------------------------------------------------- 1. inputs protected


def _command_line(command: str, f: dict[str, Path], out_dir: Path) -> tuple[list, dict]:
    """A full command line that reads every kind of input the command takes, and its
    outputs (option -> path)."""
    model = [f["ckpt"], "--arch", f"{f['arch']}:build"]
    data = ["--data", f"{f['source']}:tiny_batches"]
    outputs: dict[str, Path] = {"--report": out_dir / "report.json"}
    if command == "scan":
        argv = ["scan", *model]
    elif command == "probe":
        argv = ["probe", *model, *data]
    elif command == "recalibrate":
        argv = ["recalibrate", *model, *data, "--eval-data", f["eval"]]
        outputs.update({"--output": out_dir / "fixed.pt", "--onnx": out_dir / "fixed.onnx"})
    elif command == "swap":
        argv = ["swap", *model, "--data", f["data"], "--eval-data", f["eval"]]
        outputs.update({"--output": out_dir / "swapped.pt", "--onnx": out_dir / "swapped.onnx"})
    else:
        argv = ["export", *model, "--data", f["npy"]]
        outputs.update({"--output": out_dir / "model.onnx"})
    return argv, outputs


#: Which inputs each command's command line reads (see _command_line).
_READS = {
    "scan": ["ckpt", "arch"],
    "probe": ["ckpt", "arch", "source"],
    "recalibrate": ["ckpt", "arch", "source", "eval"],
    "swap": ["ckpt", "arch", "data", "eval"],
    "export": ["ckpt", "arch", "npy"],
}
_OUTPUTS = {"scan": ["--report"], "probe": ["--report"],
            "recalibrate": ["--output", "--onnx", "--report"],
            "swap": ["--output", "--onnx", "--report"], "export": ["--output", "--report"]}
_CASES = [(c, o, i, how) for c in _READS for o in _OUTPUTS[c] for i in _READS[c]
          for how in ("same", "symlink", "hardlink")]


@pytest.mark.parametrize("command,option,kind,how", _CASES,
                         ids=[f"{c}-{o[2:]}-{i}-{h}" for c, o, i, h in _CASES])
def test_no_output_option_can_replace_any_input(files, tmp_path, command, option, kind, how):
    """Every output option pointed at every file the run reads (the file itself, a symlink
    to it, a hard link to it): exit 2 before any work, every input byte-identical."""
    argv, outputs = _command_line(command, files, tmp_path)
    target = files[kind]
    if how == "symlink":
        (tmp_path / "link").symlink_to(target)
        target = tmp_path / "link"
    elif how == "hardlink":
        os.link(files[kind], tmp_path / "link")
        target = tmp_path / "link"
    outputs[option] = target
    before = snapshot(files["dir"])
    result = run(*argv, *[a for k, v in outputs.items() for a in (k, v)], "--quiet")
    usage_error(result, "is an input file", option)
    assert snapshot(files["dir"]) == before
    if how != "same":
        assert os.path.samefile(target, files[kind])  # the link itself is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == (["link"] if how != "same" else [])


def test_output_is_a_module_file_an_arch_spec_imports(files, tmp_path, monkeypatch):
    """``--arch pkg.module:fn``: the module's file is an input too."""
    shutil.copy(EDGE_PY, tmp_path / "edge_arch_mod.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = (tmp_path / "edge_arch_mod.py").read_bytes()
    result = run("scan", files["ckpt"], "--arch", "edge_arch_mod:build",
                 "--report", tmp_path / "edge_arch_mod.py")
    usage_error(result, "is an input file")
    assert (tmp_path / "edge_arch_mod.py").read_bytes() == before


# --------------------------------------------------------------------------- 2. special files


def test_dev_null_is_written_through_never_replaced(files, tmp_path):
    result = run("recalibrate", files["model"], "--data", files["data"], "-o", os.devnull,
                 "--report", os.devnull, "--quiet")
    assert result.code == 0, result.err
    st = os.stat(os.devnull)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    # staged in the temp folder (not beside /dev/null), and removed after the copy
    import tempfile

    assert not any(p.name.startswith(".null.") for p in Path(tempfile.gettempdir()).iterdir())


def test_fifo_output_is_refused_and_left_a_fifo(files, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    result = run("recalibrate", files["model"], "--data", files["data"], "-o", fifo)
    usage_error(result, "FIFO")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


@pytest.mark.parametrize("option", ["-o", "--report"])
def test_trailing_slash_is_refused_and_creates_nothing(files, tmp_path, option):
    outputs = {"-o": tmp_path / "fixed.pt", option: f"{tmp_path}/newdir/"}
    result = run("recalibrate", files["model"], "--data", files["data"],
                 *[a for k, v in outputs.items() for a in (k, v)])
    usage_error(result, "ends with '/'")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", ["-o", "--report", "--onnx"])
def test_empty_output_path_is_refused(files, tmp_path, option):
    outputs = {"-o": tmp_path / "fixed.pt", option: ""}
    result = run("recalibrate", files["model"], "--data", files["data"],
                 *[a for k, v in outputs.items() for a in (k, v)])
    usage_error(result, "empty path")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- 3. write failures


@pytest.mark.parametrize("where", ["/proc/varshift-x.pt", "/sys/varshift-x.pt",
                                   "/proc/self/varshift/x.pt"])
@pytest.mark.parametrize("option", ["-o", "--onnx", "--report"])
def test_unwritable_places_refused_before_any_work(tmp_path, where, option):
    """Checked before loading: a corrupt MODEL is not even opened."""
    bad_model = tmp_path / "corrupt.pt"
    bad_model.write_bytes(b"PK\x03\x04 not a zip")
    outputs = {"-o": tmp_path / "fixed.pt", option: where}
    result = run("recalibrate", bad_model, "--data", tmp_path / "missing.pt",
                 *[a for k, v in outputs.items() for a in (k, v)])
    usage_error(result, option)
    assert "corrupt" not in result.err and "missing" not in result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.pt"]


def test_outputs_are_all_or_nothing(files, tmp_path):
    """The model recalibrates, its ONNX export fails: neither --output nor --report is left."""
    ckpt = tmp_path / "zeta.pt"
    torch.save(EM.ZetaNet().state_dict(), ckpt)
    result = run("recalibrate", ckpt, "--arch", f"{EDGE_PY}:build", "--arch-args",
                 '{"name": "zeta"}', "--data", files["data"], "-o", tmp_path / "fixed.pt",
                 "--onnx", tmp_path / "fixed.onnx", "--report", tmp_path / "r.json")
    usage_error(result, "ONNX")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zeta.pt"]


def _limited(limit: int):
    """preexec_fn: a file-size limit (a full disk, deterministically); SIGXFSZ ignored so a
    write past it fails with EFBIG instead of killing the process."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _run_limited(argv: list, limit: int, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "varshift", *map(str, argv)], capture_output=True, text=True,
        cwd=cwd, env=subprocess_env(OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1"),
        preexec_fn=_limited(limit), timeout=300,
    )


def test_full_disk_while_saving_is_one_line_and_leaves_nothing(files, tmp_path):
    size = files["model"].stat().st_size
    proc = _run_limited(["recalibrate", files["model"], "--data", files["data"],
                         "-o", tmp_path / "fixed.pt", "--quiet"], size // 2, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "cannot write" in proc.stderr and "fixed.pt" in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_full_disk_during_export_is_not_blamed_on_the_model(files, tmp_path):
    proc = _run_limited(["export", files["model"], "--input-shape", "2,1,6,6",
                         "-o", tmp_path / "m.onnx", "--quiet"], 2048, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "cannot export" not in proc.stderr and "cannot write" in proc.stderr
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- 4. signals


@pytest.mark.parametrize("name,code", [("SIGTERM", 143), ("SIGHUP", 129), ("SIGINT", 130)])
def test_signal_while_writing_exits_and_leaves_no_temp(tmp_path, monkeypatch, name, code):
    """The signal arrives while torch.save writes the output (in-process, deterministic)."""
    model = tmp_path / "model.pt"
    torch.save(EM.tiny_signal_on_save(), model)
    torch.save(EM.tiny_data(), tmp_path / "data.pt")
    monkeypatch.setenv("VARSHIFT_TEST_SIGNAL", name)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    result = run("recalibrate", model, "--data", tmp_path / "data.pt", "--trust",
                 "-o", tmp_path / "fixed.pt", "--report", tmp_path / "r.json")
    assert result.code == code, result.err
    # click echoes an empty line before its Abort on Ctrl-C; one line of text either way
    assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.pt", "model.pt"]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)) == before


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_signal_from_outside_mid_run(tmp_path, sig, code):
    """A real signal from another process while recalibrate streams its data."""
    returncode, err = signal_mid_recalibrate(tmp_path, sig, start_timeout=90, settle=0.3)
    assert returncode == code, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "started"]


# --------------------------------------------------------------------------- 5. odd data


def _odd_data(kind: str, folder: Path) -> Path:
    x, y = EM.tiny_data()
    if kind in ("str", "bytes", "object", "structured", "longdouble", "datetime", "complex-npy"):
        arr = {
            "str": np.array(["a", "b"] * 16),
            "bytes": np.array([b"a", b"b"] * 16),
            "object": np.array([{"a": 1}] * 32, dtype=object),
            "structured": np.zeros(32, dtype=[("a", "f4"), ("b", "i4")]),
            "longdouble": x.numpy().astype(np.longdouble),
            "datetime": np.zeros(32, dtype="M8[s]"),
            "complex-npy": x.numpy().astype(np.complex64),
        }[kind]
        path = folder / f"{kind}.npy"
        np.save(path, arr, allow_pickle=(kind == "object"))
        return path
    tensor = {
        "sparse": lambda: x.to_sparse(),
        "float8": lambda: x.to(torch.float8_e4m3fn),
        "complex": lambda: x.to(torch.complex64),
    }[kind]
    path = folder / f"{kind}.pt"
    torch.save((tensor(), y), path)
    return path


_DTYPE_CASES = {
    "str": "str dtype", "bytes": "bytes dtype", "object": "pickled", "structured": "structured",
    "longdouble": "float128", "datetime": "datetime", "complex-npy": "complex",
    "sparse": "sparse", "float8": "float8_e4m3fn", "complex": "complex64",
}


def _data_commands(model: Path, data: Path, out: Path) -> dict[str, list]:
    return {
        "probe": ["probe", model, "--data", data],
        "recalibrate": ["recalibrate", model, "--data", data, "-o", out],
        "swap": ["swap", model, "--data", data, "-o", out],
        "export": ["export", model, "--data", data, "-o", out.with_suffix(".onnx")],
    }


@pytest.mark.parametrize("kind", list(_DTYPE_CASES))
@pytest.mark.parametrize("command", ["probe", "recalibrate", "swap", "export"])
def test_unusable_dtypes_are_one_line_naming_the_dtype(files, tmp_path, kind, command):
    data = _odd_data(kind, tmp_path)
    argv = _data_commands(files["model"], data, tmp_path / "out.pt")[command]
    result = run(*argv, "--quiet")
    usage_error(result, _DTYPE_CASES[kind])
    assert "allow_pickle" not in result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == [data.name]


def test_dtype_check_covers_data_callables(tmp_path):
    from varshift.data import load_data
    from varshift.errors import DataError

    src = tmp_path / "cplx.py"
    src.write_text("import torch\ndef batches():\n    return [torch.ones(4, 1, 6, 6, "
                   "dtype=torch.complex64)]\n")
    with pytest.raises(DataError, match="complex64"):
        list(load_data(f"{src}:batches"))


def _huge(folder: Path) -> Path:
    x, y = EM.tiny_data()
    x[3, 0, 2, 2] = 1e30  # one value: its square overflows float32 inside the conv/BN
    path = folder / "huge.pt"
    torch.save((x, y), path)
    return path


@pytest.mark.parametrize("argv", [["probe"], ["recalibrate"], ["recalibrate", "--exact"],
                                  ["swap"]], ids=["probe", "population", "exact", "swap"])
def test_overflowing_statistics_are_a_data_error_and_nothing_is_written(files, tmp_path, argv):
    data = _huge(tmp_path)
    command = [argv[0], files["model"], "--data", data, *argv[1:]]
    if argv[0] != "probe":
        command += ["-o", tmp_path / "out.pt"]
    result = run(*command, "--quiet")
    usage_error(result, "not finite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.pt"]


def test_overflow_check_is_on_the_statistics_not_on_a_magnitude(files, tmp_path):
    """Large values whose squares stay in float32's range are fine: the run succeeds and the
    measured variance matches the data's (independently computed)."""
    x, y = EM.tiny_data()
    x = x * 1e15
    torch.save((x, y), tmp_path / "big.pt")
    result = run("probe", files["model"], "--data", tmp_path / "big.pt", "--format", "json",
                 "--fail-above", "1e300")
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    assert all(np.isfinite(layer["eval_var_mean"]) for layer in doc["layers"])


def test_shift_ratio_never_divides_by_zero():
    from varshift.stats import shift_ratio

    assert shift_ratio(1e-320, 1e300) == float("inf")  # ratio underflows to 0
    assert shift_ratio(1e300, 1e-300) == float("inf")  # ratio overflows
    assert shift_ratio(float("inf"), 1.0) == float("inf")
    assert shift_ratio(2.0, 1.0) == 2.0 and shift_ratio(1.0, 4.0) == 4.0


@pytest.mark.slow
def test_integer_images_are_handled_alike_by_every_command(files, tmp_path):
    """uint8 / int64 images: every command casts them to the model's dtype (probe's shift
    equals the one measured on the same values as float32)."""
    x, y = EM.tiny_data()
    ints = (x * 20).round().clamp(-100, 100).to(torch.int64)
    torch.save((ints, y), tmp_path / "ints.pt")
    torch.save((ints.float(), y), tmp_path / "floats.pt")
    shifts = []
    for data in ("ints.pt", "floats.pt"):
        r = run("probe", files["model"], "--data", tmp_path / data, "--format", "json",
                "--fail-above", "1e300")
        assert r.code == 0, r.err
        shifts.append([l["shift"] for l in json.loads(r.out)["layers"]])
    assert shifts[0] == shifts[1]
    for argv in (["recalibrate", "-o", tmp_path / "r.pt"], ["swap", "-o", tmp_path / "s.pt"],
                 ["export", "-o", tmp_path / "e.onnx"]):
        r = run(argv[0], files["model"], "--data", tmp_path / "ints.pt", *argv[1:], "--quiet")
        assert r.code == 0, (argv[0], r.err)


# --------------------------------------------------------------------------- 6. options


@pytest.mark.parametrize("command", ["probe", "swap", "export"])
def test_seed_out_of_range_is_a_usage_error(files, tmp_path, command):
    argv = {"probe": ["probe", files["model"], "--data", files["data"]],
            "swap": ["swap", files["model"], "-o", tmp_path / "s.pt"],
            "export": ["export", files["model"], "-o", tmp_path / "e.onnx",
                       "--input-shape", "2,1,6,6"]}[command]
    for seed in ("99999999999999999999999", str(2**64), "-1"):
        usage_error(run(*argv, "--seed", seed), "--seed")
    assert list(tmp_path.iterdir()) == []


def test_largest_seed_is_accepted(files):
    r = run("probe", files["model"], "--data", files["data"], "--seed", str(2**64 - 1),
            "--fail-above", "1e300", "--quiet")
    assert r.code == 0, r.err


def test_library_probe_range_checks_its_seed(files):
    import varshift
    from varshift.errors import VarshiftError

    with pytest.raises(VarshiftError, match="seed"):
        varshift.probe(EM.tiny(), [EM.tiny_data()[0]], seed=2**64)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["probe", "recalibrate", "swap", "export"])
def test_device_cuda_without_cuda_is_refused_by_every_command(files, tmp_path, command):
    argv = _data_commands(files["model"], files["data"], tmp_path / "out.pt")[command]
    usage_error(run(*argv, "--device", "cuda"), "CUDA is not available")
    assert list(tmp_path.iterdir()) == []


def test_input_shape_that_does_not_fit_is_an_error_even_when_fx_traces(files, tmp_path):
    result = run("scan", files["model"], "--input-shape", "1,3,5")
    usage_error(result, "does not fit", "(1, 3, 5)")
    result = run("swap", files["model"], "--input-shape", "1,3,5", "-o", tmp_path / "s.pt")
    usage_error(result, "does not fit", "(1, 3, 5)")
    assert list(tmp_path.iterdir()) == []
    ok = run("scan", files["model"], "--input-shape", "2,1,6,6", "--quiet")
    assert ok.code in (0, 1), ok.err


# --------------------------------------------------------------------------- 7. sys.exit


def test_sys_exit_in_user_code_is_an_error_in_it(files, tmp_path):
    exits_on_import = tmp_path / "exits.py"
    exits_on_import.write_text("import sys\nsys.exit(4)\ndef build():\n    pass\n")
    cases = [
        ["scan", files["ckpt"], "--arch", f"{EDGE_PY}:build_exits"],
        ["scan", files["ckpt"], "--arch", f"{exits_on_import}:build"],
        ["probe", files["model"], "--data", f"{EDGE_PY}:batches_exit"],
        ["probe", files["model"], "--data", f"{EDGE_PY}:batches_exit_later"],
        ["recalibrate", files["model"], "--data", f"{EDGE_PY}:batches_exit_later",
         "-o", tmp_path / "out.pt"],
    ]
    for argv in cases:
        result = run(*argv)
        usage_error(result, "sys.exit(")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exits.py"]


def test_sys_exit_anywhere_else_in_a_command_is_exit_2(files, tmp_path):
    """The net in main(): a model whose forward exits (loaded with --trust)."""
    src = tmp_path / "exiting_model.py"
    src.write_text("import sys, torch.nn as nn\nclass Exiting(nn.Module):\n"
                   "    def forward(self, x):\n        sys.exit(9)\n"
                   "def build():\n    return Exiting()\n")
    torch.save({"w": torch.zeros(1)}, tmp_path / "sd.pt")
    src.write_text(src.read_text().replace("class Exiting(nn.Module):\n",
                   "class Exiting(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                   "        import torch\n        self.register_buffer('w', torch.zeros(1))\n"))
    result = run("probe", tmp_path / "sd.pt", "--arch", f"{src}:build",
                 "--data", files["data"])
    assert result.code == 2, result.err
    assert len(result.err_lines) == 1 and "sys.exit" in result.err


# --------------------------------------------------------------------------- 8. evidence


@pytest.mark.parametrize("labels,reason", [
    (None, "no labels"),
    ("float", "float32"),
    ("range", "outside the model's 10 classes"),
])
def test_held_out_data_that_cannot_be_scored_says_why(files, tmp_path, labels, reason):
    xe, ye = EM.tiny_data(seed=5)
    if labels is None:
        torch.save(xe, tmp_path / "eval.pt")
    elif labels == "float":
        torch.save((xe, ye.float()), tmp_path / "eval.pt")
    else:
        torch.save((xe, ye + 10), tmp_path / "eval.pt")
    result = run("recalibrate", files["model"], "--data", files["data"], "--eval-data",
                 tmp_path / "eval.pt", "-o", tmp_path / "fixed.pt", "--format", "json")
    assert result.code in (0, 1), result.err
    doc = json.loads(result.out)
    assert not doc.get("metrics")
    notes = " ".join(doc.get("notes", []))
    assert "cannot be scored" in notes and reason in notes, notes


# --------------------------------------------------------------------------- 9. loader bounds


def _crafted_zip(path: Path, pickle_bytes: bytes) -> Path:
    """A torch.save-shaped zip archive whose data.pkl is ``pickle_bytes``."""
    buf = io.BytesIO()
    torch.save({"a": torch.zeros(1)}, buf)
    buf.seek(0)
    with zipfile.ZipFile(buf) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info.filename, pickle_bytes if info.filename.endswith("data.pkl") else data)
    return path


def _call(module: str, name: str, *ints: int) -> bytes:
    """Pickle opcodes: GLOBAL module.name, a tuple of ints, REDUCE (a constructor call)."""
    args = b"".join(b"\x8a" + bytes([8]) + i.to_bytes(8, "little", signed=True) for i in ints)
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"(" + args + b"tR."


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("what", ["model", "data"])
def test_allow_listed_constructors_never_run(tmp_path, files, what):
    """nn.Linear(30000, 30000) would take 3.6 GB: refused with nothing allocated."""
    path = _crafted_zip(tmp_path / "linear.pt", _call("torch.nn.modules.linear", "Linear",
                                                       30000, 30000))
    assert path.stat().st_size < 2000
    rss = _max_rss_mb()
    if what == "model":
        result = run("scan", path)
        usage_error(result, "constructor", "Linear(30000, 30000)")
    else:  # data's allow-list is TensorDataset alone: nn.Linear is outside it
        result = run("probe", files["model"], "--data", path)
        usage_error(result, "outside varshift's safe list")
        ctor = _crafted_zip(tmp_path / "ds.pt", _call("torch.utils.data.dataset",
                                                     "TensorDataset", 30000, 30000))
        usage_error(run("probe", files["model"], "--data", ctor), "refused to load DATA",
                    "constructor")
    assert _max_rss_mb() - rss < 500


@pytest.mark.parametrize("what", ["model", "data"])
@pytest.mark.parametrize("payload", [
    ("builtins", "bytearray", 200_000_000_000),
    ("torch", "FloatTensor", 200_000, 200_000),
], ids=["bytearray-200GB", "FloatTensor-160GB"])
def test_what_a_load_may_allocate_is_bounded_by_the_file_size(tmp_path, files, what, payload):
    module, name, *ints = payload
    path = _crafted_zip(tmp_path / "big.pt", _call(module, name, *ints))
    rss = _max_rss_mb()
    limits = resource.getrlimit(resource.RLIMIT_AS)
    if what == "model":
        result = run("scan", path)
    else:
        result = run("probe", files["model"], "--data", path)
    usage_error(result, "more memory than a file of its size")
    assert _max_rss_mb() - rss < 500
    assert resource.getrlimit(resource.RLIMIT_AS) == limits  # the bound is lifted again


def test_whole_module_files_still_load_safely(files):
    from varshift.loading import load_model

    loaded = load_model(files["model"])
    reference = EM.tiny()
    for a, b in zip(loaded.module.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- 10. messages


def test_text_file_as_pt_data_is_not_blamed_on_the_safe_list(files, tmp_path):
    for text in ("cos\nsystem\n(S'echo hi'\ntR.", "hello world\n"):
        (tmp_path / "data.pt").write_text(text)
        result = run("probe", files["model"], "--data", tmp_path / "data.pt")
        usage_error(result, "not a torch.save file", "text file")
        assert "safe list" not in result.err


def test_text_npy_never_suggests_unsafe_loading(files, tmp_path):
    (tmp_path / "data.npy").write_text("1 2 3\n")
    result = run("probe", files["model"], "--data", tmp_path / "data.npy")
    usage_error(result, "not a numpy")
    assert "allow_pickle" not in result.err and "pickle.load" not in result.err


def test_pseudo_file_is_not_called_empty(files):
    result = run("scan", "/proc/self/status")
    usage_error(result, "pseudo-file")
    assert "empty" not in result.err
    usage_error(run("probe", files["model"], "--data", "/proc/self/status"), "pseudo-file")


def test_fifo_as_input_is_refused_without_blocking(files, tmp_path):
    fifo = tmp_path / "in.pt"
    os.mkfifo(fifo)
    usage_error(run("scan", fifo), "FIFO")
    usage_error(run("probe", files["model"], "--data", fifo), "FIFO")


# --------------------------------------------------------------------------- 5b. zero spread


def test_constant_data_never_writes_a_zero_running_var(files, tmp_path):
    """All-zero data: the conv's output is its bias, constant per channel. recalibrate refuses
    (a running_var of 0 would blow the norm's outputs up); probe flags an infinite shift and
    exits 1."""
    x, y = EM.tiny_data()
    torch.save((torch.zeros_like(x), y), tmp_path / "zeros.pt")
    for extra in ([], ["--exact"]):
        result = run("recalibrate", files["model"], "--data", tmp_path / "zeros.pt",
                     "-o", tmp_path / "fixed.pt", *extra)
        usage_error(result, "constant inputs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zeros.pt"]
    probe = run("probe", files["model"], "--data", tmp_path / "zeros.pt", "--format", "json")
    assert probe.code == 1, probe.err
    assert json.loads(probe.out)["summary"]["max_shift"] in (float("inf"), None, "inf")
