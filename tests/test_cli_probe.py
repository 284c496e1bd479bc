"""``varshift probe`` on the command line: exit codes, the JSON contract (docs/json.md), the
other formats, --report, --quiet, no control codes off a terminal, bad usage."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from fixtures import probe_models as P

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_models"
ANSI = re.compile(r"\x1b\[")
LAYER_KEYS = {"name", "type", "affected", "running_var_mean", "eval_var_mean", "train_var_mean",
              "shift", "train_shift", "channel_shift_median", "channel_shift_max"}
NUMBER_KEYS = ("running_var_mean", "eval_var_mean", "train_var_mean", "shift", "train_shift",
               "channel_shift_median", "channel_shift_max")


def sample(name: str) -> Path:
    path = SAMPLES / name
    if not path.exists():
        pytest.fail(f"committed sample model missing (git checkout sample_models/, or python sample_models/make_models.py): {path}")
    return path


@pytest.fixture
def shifted() -> list[str]:
    """The shipped dropout-before-BN model and its calibration data, as CLI arguments."""
    return [str(sample("digits_dropout_bn.pt")), "--data", str(sample("digits_calib.pt"))]


@pytest.fixture
def small(tmp_path) -> list[str]:
    """A tiny whole-module model (torch.nn only) and matching data, written to tmp_path."""
    torch.save(P.trained_net(), tmp_path / "net.pt")
    torch.save(P.images(64, seed=5), tmp_path / "x.pt")
    return [str(tmp_path / "net.pt"), "--data", str(tmp_path / "x.pt"), "--device", "cpu"]


def probe_json(cli, args) -> dict:
    res = cli("probe", *args, "--format", "json")
    assert res.code in (0, 1), res.err
    doc = json.loads(res.out)
    assert res.code == (0 if doc["summary"]["passed"] else 1)  # exit code = bool(report)
    return doc


# --------------------------------------------------------------------------- exit codes


def test_exit_1_by_default_when_shifted(cli, shifted):
    """The default threshold is the one the verdict uses (1.1): SHIFTED means exit 1, as
    scan's default fails on its errors and bool(report) is False."""
    res = cli("probe", *shifted)
    assert res.code == 1, res.err
    assert res.err == ""  # no progress bar or anything else off a terminal
    assert "SHIFTED" in res.out and not ANSI.search(res.out)
    never = cli("probe", *shifted, "--fail-above", "inf")
    assert never.code == 0 and never.err == ""


def test_fail_above_threshold(cli, shifted):
    worst = probe_json(cli, shifted)["summary"]["max_shift"]
    assert worst > 1.5
    below = cli("probe", *shifted, "--fail-above", f"{worst - 0.2:.3f}")
    assert below.code == 1 and below.err == ""
    above = cli("probe", *shifted, "--fail-above", f"{worst + 0.2:.3f}")
    assert above.code == 0 and above.err == ""
    assert "OK" in above.out  # the threshold is the report's too


def test_clean_sample_model_passes_a_tight_threshold(cli):
    res = cli("probe", sample("digits_clean.pt"), "--data", sample("digits_calib.pt"),
              "--fail-above", "1.1")
    assert res.code == 0, res.err


@pytest.mark.parametrize("value", ["0.5", "0.999", "nan", "-1"])
def test_fail_above_below_one_is_usage_error(cli, shifted, value):
    res = cli("probe", *shifted, "--fail-above", value)
    assert res.code == 2 and len(res.err_lines) == 1 and "--fail-above" in res.err
    assert "Traceback" not in res.err and res.out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(cli, small):
    res = cli("probe", *small[:-2], "--device", "cuda")
    assert res.code == 2 and len(res.err_lines) == 1
    assert "CUDA is not available" in res.err and "Traceback" not in res.err


@pytest.mark.parametrize("argv,fragment", [
    (["--data"], "--data"),                     # option without its value
    ([], "--data"),                             # --data missing altogether
])
def test_usage_errors(cli, tmp_path, argv, fragment):
    torch.save(P.trained_net(), tmp_path / "m.pt")
    res = cli("probe", tmp_path / "m.pt", *argv)
    assert res.code == 2 and len(res.err_lines) == 1 and fragment in res.err


def test_missing_model_file(cli, tmp_path, shifted):
    res = cli("probe", tmp_path / "nope.pt", *shifted[1:])
    assert res.code == 2 and len(res.err_lines) == 1 and "no such file" in res.err


# --------------------------------------------------------------------------- JSON


def test_json_contract_and_numbers(cli, small, tmp_path):
    doc = probe_json(cli, small + ["--batch-size", "16", "--seed", "3"])
    assert doc["schema"] == "varshift.probe/1"
    import varshift

    assert doc["varshift_version"] == varshift.__version__
    assert [l["name"] for l in doc["layers"]] == ["1", "5", "10"]
    for layer in doc["layers"]:
        assert LAYER_KEYS <= layer.keys()
        assert layer["type"] in ("BatchNorm2d", "BatchNorm1d")
    assert [l["affected"] for l in doc["layers"]] == [False, True, True]
    summary = doc["summary"]
    assert {"max_shift", "worst_layer", "samples"} <= summary.keys()
    assert summary["samples"] == 64
    worst = max(doc["layers"], key=lambda l: l["shift"])
    assert summary["worst_layer"] == worst["name"] and summary["max_shift"] == worst["shift"]
    # the numbers, against the independent reference (JSON keeps 6 significant figures)
    model = torch.load(tmp_path / "net.pt", weights_only=False)
    x = torch.load(tmp_path / "x.pt")
    ref = P.reference_stats(model, P.chunks(x, 16), seed=3)
    for layer in doc["layers"]:
        want = P.expected_layer(ref, layer["name"])
        for key in NUMBER_KEYS:
            assert layer[key] == pytest.approx(want[key], rel=1e-4), (layer["name"], key)


def test_json_on_the_functional_checkpoint(cli):
    arch = sample("digits_functional.py")
    doc = probe_json(cli, [sample("digits_functional_ckpt.pt"), "--arch", f"{arch}:build",
                           "--arch-args", '{"drop_rate": 0.3}', "--data", sample("digits_test.pt"),
                           "--max-batches", "3", "--batch-size", "100"])
    by = {l["name"]: l for l in doc["layers"]}
    assert list(by) == ["bn1", "bn2", "bn3"]
    assert by["bn2"]["affected"] and by["bn2"]["shift"] > 1.3
    assert doc["summary"]["samples"] == 300


def test_npy_data_same_numbers_as_pt(cli):
    a = probe_json(cli, [sample("digits_dropout_bn.pt"), "--data", sample("digits_calib.pt")])
    b = probe_json(cli, [sample("digits_dropout_bn.pt"), "--data", sample("digits_calib.npy")])
    assert a["layers"] == b["layers"]


# --------------------------------------------------------------------------- formats and files


def test_markdown(cli, shifted):
    res = cli("probe", *shifted, "--format", "markdown")
    assert res.code == 1  # shifted
    lines = res.out.splitlines()
    assert lines[0].startswith("### ") and "**Verdict (shifted):**" in res.out
    table = [l for l in lines if l.startswith("|")]
    assert "running var" in table[0] and "shift" in table[0]
    assert set(table[1]) <= set("|-: ")
    assert len(table) == 2 + 3  # header, rule, one row per BatchNorm
    assert not ANSI.search(res.out)


@pytest.mark.parametrize("name,kind", [("r.json", "json"), ("r.md", "markdown"), ("r.txt", "text")])
def test_report_file(cli, shifted, tmp_path, name, kind):
    out = tmp_path / name
    res = cli("probe", *shifted, "--report", out)
    assert res.code == 1 and res.out.strip()  # shifted; stdout still has the text report
    written = out.read_text()
    if kind == "json":
        assert json.loads(written)["schema"] == "varshift.probe/1"
    elif kind == "markdown":
        assert written.startswith("### ")
    else:
        assert "Variance shift per BatchNorm" in written
    assert not ANSI.search(written)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary left behind


def test_report_refuses_to_overwrite_the_model(cli, tmp_path, shifted):
    model = tmp_path / "m.pt"
    model.write_bytes(Path(shifted[0]).read_bytes())
    res = cli("probe", model, *shifted[1:], "--report", model)
    assert res.code == 2 and len(res.err_lines) == 1
    assert model.read_bytes() == Path(shifted[0]).read_bytes()


def test_quiet(cli, shifted, tmp_path):
    res = cli("probe", *shifted, "--quiet", "--fail-above", "1.2", "--report", tmp_path / "r.json")
    assert res.code == 1 and res.out == "" and res.err == ""
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["max_shift"] > 1.2


def test_text_report_has_no_control_codes_off_a_terminal(cli, shifted):
    res = cli("probe", *shifted)
    assert not ANSI.search(res.out) and "\r" not in res.out
    for name in ("1", "5", "9"):
        assert re.search(rf"^\W*{name}\s", res.out, re.M)


def test_calibration_warning_in_every_format(cli, tmp_path):
    torch.save(P.trained_net(), tmp_path / "net.pt")
    torch.save(P.images(64, seed=5, scale=5.0), tmp_path / "x5.pt")
    args = [tmp_path / "net.pt", "--data", tmp_path / "x5.pt"]
    doc = probe_json(cli, args)
    assert len(doc["warnings"]) == 1 and "training data" in doc["warnings"][0]
    assert "warning:" in cli("probe", *args).out
    assert "**warning:**" in cli("probe", *args, "--format", "markdown").out
    torch.save(P.images(64, seed=5), tmp_path / "x1.pt")
    assert probe_json(cli, [tmp_path / "net.pt", "--data", tmp_path / "x1.pt"])["warnings"] == []


def test_python_dash_m(tmp_path):
    """The real entry point in a subprocess: exit code and one stderr line (a smoke test)."""
    from conftest import run_module

    res = run_module("probe", sample("digits_dropout_bn.pt"), "--data", tmp_path / "no.pt")
    assert res.code == 2 and len(res.err_lines) == 1 and "no such file" in res.err
