"""The command line: exit codes, formats, --report, --quiet, colour, and every bad input."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import varshift

from conftest import TESTS, run_module, subprocess_env
from fixtures import models as M

FIXTURE_ARCH = f"{TESTS / 'fixtures' / 'models.py'}:build"
ANSI = re.compile(r"\x1b\[")
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*(?:3[0-9]|9[0-7]|4[0-9]|10[0-7])[;m]")


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    """Whole torch.nn-only modules: one with an error, one with a warning, one clean."""
    paths = {}
    for name, factory in (("error", M.plain_dropout_bn), ("warning", M.plain_warning),
                          ("clean", M.plain_clean)):
        paths[name] = tmp_path / f"{name}.pt"
        torch.manual_seed(0)
        torch.save(factory(), paths[name])
    return paths


# --------------------------------------------------------------------------- exit codes


@pytest.mark.parametrize(
    "model,fail_on,code",
    [
        ("error", None, 1),
        ("error", "error", 1),
        ("error", "warning", 1),
        ("error", "never", 0),
        ("warning", None, 0),
        ("warning", "error", 0),
        ("warning", "warning", 1),
        ("warning", "never", 0),
        ("clean", None, 0),
        ("clean", "warning", 0),
    ],
)
def test_exit_code_follows_fail_on(cli, models, model: str, fail_on: str | None, code: int) -> None:
    args = ["scan", models[model]] + (["--fail-on", fail_on] if fail_on else [])
    result = cli(*args)
    assert result.code == code, result.err
    assert result.err == ""
    assert result.out.strip()


def test_json_document(cli, models) -> None:
    result = cli("scan", models["error"], "--format", "json")
    assert result.code == 1
    doc = json.loads(result.out)
    assert doc["schema"] == "varshift.scan/1"
    assert doc["varshift_version"] == varshift.__version__
    assert doc["source"] == str(models["error"])
    assert {"regularizers", "norms", "findings", "summary"} <= doc.keys()

    (reg,) = doc["regularizers"]
    assert {"name", "kind", "p", "active", "reaches"} <= reg.keys()
    assert (reg["name"], reg["kind"], reg["p"], reg["active"], reg["reaches"]) == (
        "1", "dropout", 0.2, True, ["3", "6"])
    assert [{k: n[k] for k in ("name", "type", "affected", "direct", "reached_by")}
            for n in doc["norms"]] == [
        {"name": "3", "type": "BatchNorm2d", "affected": True, "direct": True, "reached_by": ["1"]},
        {"name": "6", "type": "BatchNorm2d", "affected": True, "direct": False, "reached_by": ["1"]},
    ]
    (finding,) = doc["findings"]
    assert {"rule", "severity", "regularizer", "direct", "downstream_count", "predicted_shift",
            "remedy"} <= finding.keys()
    assert finding["rule"] == "regularizer-before-norm" and finding["severity"] == "error"
    assert finding["direct"] == ["3"] and finding["downstream_count"] == 2
    assert finding["predicted_shift"] == pytest.approx(1 / (1 - 0.2))
    assert "recalibrate" in finding["remedy"]
    assert doc["summary"]["errors"] == 1 and doc["summary"]["affected_norms"] == 2


def test_json_of_a_clean_model(cli, models) -> None:
    result = cli("scan", models["clean"], "--format", "json")
    assert result.code == 0
    doc = json.loads(result.out)
    assert doc["findings"] == [] and doc["summary"]["findings"] == 0
    assert doc["norms"][0]["affected"] is False
    assert doc["regularizers"][0]["reaches"] == []


def test_markdown(cli, models) -> None:
    result = cli("scan", models["error"], "--format", "markdown")
    assert result.code == 1
    lines = result.out.splitlines()
    assert lines[0] == f"### varshift scan: {models['error']} (Sequential)"
    assert "| regularizer | p | direct norms | norms reached | predicted shift | severity | remedy |" in lines
    assert any(line.startswith("| `1` (Dropout) | 0.2 | `3` | 2 | 1.25x | error |") for line in lines)
    assert not ANSI.search(result.out)


def test_text_has_no_escape_codes_off_a_terminal(cli, models, monkeypatch) -> None:
    for no_color in (None, "1"):
        if no_color:
            monkeypatch.setenv("NO_COLOR", no_color)
        result = cli("scan", models["error"])
        assert result.code == 1
        assert not ANSI.search(result.out)
        assert "1.25x" in result.out and "ERROR" in result.out


def _run_in_pty(args: list[str], **env: str) -> bytes:
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "varshift", *args], stdout=slave,
                            stderr=subprocess.DEVNULL, env=subprocess_env(**env))
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=120)
    os.close(master)
    return out


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_no_color_on_a_terminal(models) -> None:
    coloured = _run_in_pty(["scan", str(models["error"])], TERM="xterm-256color")
    assert ANSI_COLOUR.search(coloured.decode())  # the check below can fail
    plain = _run_in_pty(["scan", str(models["error"])], TERM="xterm-256color", NO_COLOR="1")
    assert "1.25x" in plain.decode()
    assert not ANSI_COLOUR.search(plain.decode())


def test_python_dash_m(models, tmp_path: Path) -> None:
    """A real ``python -m varshift`` writing to a pipe: no escape codes, --report JSON."""
    report = tmp_path / "r.json"
    result = run_module("scan", models["warning"], "--fail-on", "warning", "--report", report,
                        TERM="xterm-256color")
    assert result.code == 1, result.err
    assert result.err == ""
    assert "WARNING" in result.out and not ANSI.search(result.out)
    doc = json.loads(report.read_text())
    assert doc["schema"] == "varshift.scan/1"
    assert [f["severity"] for f in doc["findings"]] == ["warning"]


# --------------------------------------------------------------------------- --report, --quiet


@pytest.mark.parametrize("name,fmt", [("r.json", "json"), ("r.md", "markdown"),
                                      ("r.markdown", "markdown"), ("r.txt", "text")])
def test_report_file_format_by_extension(cli, models, tmp_path: Path, name: str, fmt: str) -> None:
    out = tmp_path / "reports" / name
    out.parent.mkdir()
    result = cli("scan", models["error"], "--report", out)
    assert result.code == 1
    text = out.read_text()
    if fmt == "json":
        assert json.loads(text)["schema"] == "varshift.scan/1"
    elif fmt == "markdown":
        assert text.startswith("### varshift scan:")
    else:
        assert text.startswith("varshift scan:") and "1.25x" in text
    assert not ANSI.search(text)
    assert sorted(p.name for p in out.parent.iterdir()) == [name]  # no temporary left over
    assert result.out.startswith("varshift scan:")  # stdout keeps --format text


def test_report_matches_stdout(cli, models, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    result = cli("scan", models["warning"], "--format", "json", "--report", out)
    assert out.read_text() == result.out


def test_report_replaces_an_existing_file(cli, models, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    out.write_text("old")
    cli("scan", models["clean"], "--report", out)
    assert json.loads(out.read_text())["summary"]["findings"] == 0


def test_quiet(cli, models, tmp_path: Path) -> None:
    out = tmp_path / "r.md"
    result = cli("scan", models["error"], "--quiet", "--report", out)
    assert result.code == 1
    assert result.out == "" and result.err == ""
    assert out.read_text().startswith("### varshift scan:")
    assert cli("scan", models["clean"], "-q", "--format", "json").out == ""


def test_report_never_replaces_the_input(cli, models) -> None:
    before = models["error"].read_bytes()
    result = cli("scan", models["error"], "--report", models["error"])
    assert result.code == 2
    assert "is an input file" in result.err
    assert models["error"].read_bytes() == before


def test_report_folder_must_exist(cli, models, tmp_path: Path) -> None:
    result = cli("scan", models["error"], "--report", tmp_path / "nowhere" / "r.json")
    assert result.code == 2 and len(result.err_lines) == 1
    assert "does not exist" in result.err


def test_arch_and_arch_args(cli, tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    torch.save({"model_state_dict": M.plain_dropout_bn(p=0.5, width=4).state_dict()}, path)
    result = cli("scan", path, "--arch", FIXTURE_ARCH, "--arch-args", '{"p": 0.5, "width": 4}',
                 "--format", "json")
    assert result.code == 1, result.err
    assert json.loads(result.out)["findings"][0]["predicted_shift"] == pytest.approx(2.0)


def test_trust_and_input_shape(cli, tmp_path: Path) -> None:
    path = tmp_path / "dd.pt"
    torch.save(M.DataDependent(), path)
    assert cli("scan", path).code == 2  # refused without --trust
    result = cli("scan", path, "--trust")
    assert result.code == 2 and "--input-shape" in result.err and len(result.err_lines) == 1
    result = cli("scan", path, "--trust", "--input-shape", "2,3,8,8", "--format", "json")
    assert result.code == 1, result.err
    doc = json.loads(result.out)
    assert doc["summary"]["traced_with"] == "dynamic"
    assert any("(2, 3, 8, 8)" in note for note in doc["notes"])


def test_whole_module_with_arch_notes_it(cli, models) -> None:
    result = cli("scan", models["clean"], "--arch", FIXTURE_ARCH, "--format", "json")
    assert result.code == 0
    assert any("not needed" in note for note in json.loads(result.out)["notes"])


# --------------------------------------------------------------------------- bad input


def _state_dict(p: Path) -> None:
    torch.save(M.plain_dropout_bn().state_dict(), p)


def _torchscript(p: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(nn.Sequential(nn.Linear(2, 2), nn.ReLU())), p)


def _onnx(p: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
    )
    onnx.save(helper.make_model(graph), p)


def _truncated(p: Path) -> None:
    torch.save(M.plain_dropout_bn(), p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) * 2 // 3])


def _write(data: bytes):
    return lambda p: p.write_bytes(data)


# (id, how to make MODEL at the path, extra argv, a fragment of the message)
BAD_INPUTS = [
    ("missing", None, [], "no such file"),
    ("empty", _write(b""), [], "empty"),
    ("directory", "dir", [], "is a directory"),
    ("truncated", _truncated, [], "truncated or corrupt"),
    ("corrupt-bytes", _write(bytes(range(256)) * 16), [], "not a PyTorch file"),
    ("pickle-like-bytes", _write(b"\x80\x02" + bytes(range(200))), [], "not a torch.save file"),
    ("plain-pickle-protocol-4", _write(pickle.dumps({"w": [1.0]}, protocol=4)), [],
     "not a torch.save file"),
    ("list", lambda p: torch.save([1, 2, 3], p), [], "holds a list"),
    ("dict-of-ints", lambda p: torch.save({"a": 1, "b": 2}, p), [], "holds a dict"),
    ("refused-pickle", lambda p: torch.save(M.ModuleDropoutBN(), p), [],
     "fixtures.models.ModuleDropoutBN"),
    ("state-dict-without-arch", _state_dict, [], "--arch"),
    ("arch-does-not-import", _state_dict, ["--arch", "varshift_no_such_pkg.nets:build"],
     "cannot import"),
    ("arch-file-missing", _state_dict, ["--arch", "/nonexistent/net.py:build"], "no such file"),
    ("arch-not-callable", _state_dict,
     ["--arch", f"{TESTS / 'fixtures' / 'models.py'}:NOT_CALLABLE"], "not callable"),
    ("arch-attribute-missing", _state_dict,
     ["--arch", f"{TESTS / 'fixtures' / 'models.py'}:nope"], "no attribute 'nope'"),
    ("arch-spec-without-colon", _state_dict, ["--arch", "fixtures.models"], "pkg.module:callable"),
    ("arch-args-not-json", _state_dict, ["--arch", FIXTURE_ARCH, "--arch-args", "{p: 1}"],
     "not valid JSON"),
    ("arch-args-not-object", _state_dict, ["--arch", FIXTURE_ARCH, "--arch-args", "[0.1]"],
     "must be a JSON object"),
    ("arch-args-wrong-keyword", _state_dict,
     ["--arch", FIXTURE_ARCH, "--arch-args", '{"depth": 3}'], "unexpected keyword"),
    ("state-dict-does-not-fit", _state_dict,
     ["--arch", FIXTURE_ARCH, "--arch-args", '{"width": 4}'], "shape mismatch"),
    ("state-dict-wrong-model", _state_dict,
     ["--arch", FIXTURE_ARCH, "--arch-args", '{"name": "clean"}'], "missing key"),
    ("unknown-format", lambda p: torch.save(M.plain_clean(), p), ["--format", "xml"], "xml"),
    ("unknown-fail-on", lambda p: torch.save(M.plain_clean(), p), ["--fail-on", "info"], "info"),
    ("input-shape-letters", lambda p: torch.save(M.plain_clean(), p), ["--input-shape", "1,x,8"],
     "--input-shape"),
    ("input-shape-zero", lambda p: torch.save(M.plain_clean(), p), ["--input-shape", "0,3,8,8"],
     "--input-shape"),
    ("input-shape-empty", lambda p: torch.save(M.plain_clean(), p), ["--input-shape", ""],
     "--input-shape"),
    ("input-shape-negative", lambda p: torch.save(M.plain_clean(), p),
     ["--input-shape", "1,-3,8,8"], "--input-shape"),
    ("input-shape-does-not-fit", lambda p: torch.save(M.DataDependent(), p),
     ["--trust", "--input-shape", "1,5,8,8"], "does not run on an example input"),
    ("untraceable-without-input-shape", lambda p: torch.save(M.DataDependent(), p), ["--trust"],
     "--input-shape"),
    ("unknown-option", lambda p: torch.save(M.plain_clean(), p), ["--bogus"], "--bogus"),
    ("torchscript", _torchscript, [], "TorchScript"),
    ("onnx", _onnx, [], "ONNX"),
]


def _make_model(tmp_path: Path, make) -> Path:
    path = tmp_path / "model.pt"
    if make == "dir":
        path.mkdir()
    elif make is not None:
        make(path)
    return path


@pytest.mark.parametrize("make,extra,fragment", [pytest.param(*b[1:], id=b[0]) for b in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line(cli, tmp_path: Path, make, extra, fragment) -> None:
    model = _make_model(tmp_path, make)
    report = tmp_path / "report.json"
    result = cli("scan", model, *extra, "--report", report)
    assert result.code == 2, (result.out, result.err)
    assert len(result.err_lines) == 1, result.err
    assert result.err.startswith("varshift: error: ")
    assert fragment in result.err
    assert "Traceback" not in result.err
    assert result.out == ""
    assert not report.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"] * (make is not None)


def test_bad_input_leaves_an_existing_report_alone(cli, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    report.write_text("previous")
    result = cli("scan", tmp_path / "missing.pt", "--report", report)
    assert result.code == 2
    assert report.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


REAL_PROCESS_CASES = [
    ("missing", None, "no such file"),
    ("plain-pickle-4", _write(pickle.dumps([1.0, 2.0], protocol=4)), "not a torch.save file"),
    ("refused-legacy",
     lambda p: torch.save(M.ModuleDropoutBN(), p, _use_new_zipfile_serialization=False),
     "fixtures.models.ModuleDropoutBN"),
    ("legacy-protocol-4",
     lambda p: torch.save({"w": torch.zeros(2)}, p, _use_new_zipfile_serialization=False,
                          pickle_protocol=4),
     "refused to unpickle"),
    ("truncated", _truncated, "truncated or corrupt"),
    ("untraceable", lambda p: torch.save(M.DataDependent(), p), "--input-shape"),
]

# Runs main() once per case in one fresh interpreter (torch imports once), with the real
# warnings machinery: anything torch warns about lands on that case's stderr.
_DRIVER = """
import contextlib, io, json, sys
from varshift.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    results.append([code, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def test_bad_input_outside_pytest(tmp_path: Path) -> None:
    """Exactly one line on stderr also for what torch would warn about on its own."""
    argvs = []
    for name, make, _ in REAL_PROCESS_CASES:
        folder = tmp_path / name
        folder.mkdir()
        model = _make_model(folder, make)
        extra = ["--trust"] if name == "untraceable" else []
        argvs.append(["scan", str(model), *extra, "--report", str(folder / "r.json")])
    proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(argvs)], capture_output=True,
                          text=True, env=subprocess_env(), timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    for (name, _, fragment), (code, out, err) in zip(REAL_PROCESS_CASES, json.loads(proc.stdout)):
        assert code == 2, (name, err)
        assert len(err.splitlines()) == 1, (name, err)
        assert fragment in err and "Traceback" not in err, (name, err)
        assert out == ""
        assert not (tmp_path / name / "r.json").exists()


# --------------------------------------------------------------------------- help and version


def test_help_and_version_do_not_import_torch() -> None:
    for args in (["--help"], ["--version"], ["scan", "--help"]):
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "varshift", *args],
            capture_output=True, text=True, env=subprocess_env(), timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                    if line.startswith("import time:")}
        assert "typer" in imported  # the check below can fail
        heavy = {m for m in imported if m.split(".")[0] in ("torch", "numpy", "onnx", "onnxruntime")}
        assert not heavy, (args, sorted(heavy)[:5])
    version = run_module("--version")
    assert version.out.strip() == f"varshift {varshift.__version__}"


def test_in_process_help_and_no_args(cli) -> None:
    result = cli("--help")
    assert result.code == 0 and "scan" in result.out
    result = cli()
    assert result.code == 2
    assert "Usage: varshift" in result.err and "error" not in result.err.splitlines()[0]
    result = cli("bogus-command")
    assert result.code == 2 and len(result.err_lines) == 1
