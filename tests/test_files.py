"""The file-level functions (varshift.*_file): what the CLI runs, callable from Python.

Each is checked against the in-memory API run independently on the same file, and the files
it writes against the input's own layout.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import varshift
from conftest import REPO, subprocess_env
from varshift.data import load_data
from varshift.loading import load_model

SAMPLES = REPO / "sample_models"
DROPOUT_BN = SAMPLES / "digits_dropout_bn.pt"
FUNCTIONAL_CKPT = SAMPLES / "digits_functional_ckpt.pt"
ARCH = f"{SAMPLES / 'digits_functional.py'}:build"
CALIB = SAMPLES / "digits_calib.pt"
TEST = SAMPLES / "digits_test.pt"


def test_recalibrate_file_keeps_the_checkpoint_form_and_matches_the_api(tmp_path):
    out = tmp_path / "fixed.pt"
    rep = varshift.recalibrate_file(FUNCTIONAL_CKPT, CALIB, out, arch=ARCH,
                                    arch_args={"drop_rate": 0.3}, max_batches=2, device="cpu")
    assert rep.output == str(out) and rep.source == str(FUNCTIONAL_CKPT)
    original = torch.load(FUNCTIONAL_CKPT, weights_only=True)
    written = torch.load(out, weights_only=True)
    assert isinstance(written, dict) and written.keys() == original.keys()

    # the same fix through the in-memory API, on the same model and batches
    module = load_model(FUNCTIONAL_CKPT, arch=ARCH, arch_args={"drop_rate": 0.3}).module
    fixed, api_rep = varshift.recalibrate(module, load_data(CALIB, max_batches=2))
    state = fixed.state_dict()
    changed = {l.name for l in api_rep.recalibrated}
    assert changed == {"bn2", "bn3"}
    for layer in changed:
        key = f"{layer}.running_var"
        file_key = next(k for k in _flatten(written) if k.endswith(key))
        torch.testing.assert_close(_flatten(written)[file_key], state[key])
    assert [l.shift_after for l in rep.layers] == pytest.approx(
        [l.shift_after for l in api_rep.layers], rel=1e-6)
    assert bool(rep) and rep.threshold == 1.1


def _flatten(obj, prefix=""):
    out = {}
    for k, v in obj.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
    return out


def test_max_accuracy_drop_is_a_gate(tmp_path):
    # Recalibrating the sample model costs one held-out image (99.60% -> 99.40%, README):
    # a guard of 0.1 points fails, 0.3 passes.
    kw = dict(exact=False, eval_data=TEST, max_batches=4, device="cpu")
    strict = varshift.recalibrate_file(DROPOUT_BN, CALIB, tmp_path / "a.pt",
                                       max_accuracy_drop=0.1, **kw)
    drop = 100 * (strict.before.accuracy - strict.after.accuracy)
    assert strict.accuracy_drop == pytest.approx(drop)
    assert drop > 0.1 and not strict
    loose = varshift.recalibrate_file(DROPOUT_BN, CALIB, tmp_path / "b.pt",
                                      max_accuracy_drop=drop + 0.05, **kw)
    assert loose and loose.to_dict()["summary"]["passed"] is True


def test_recalibrate_fail_above_and_accuracy_guard_on_the_cli(cli, tmp_path):
    args = ["recalibrate", DROPOUT_BN, "--data", CALIB, "--max-batches", "4", "--device", "cpu",
            "--eval-data", TEST, "--format", "json"]
    tight = cli(*args, "--output", tmp_path / "a.pt", "--max-accuracy-drop", "0.1")
    doc = json.loads(tight.out)
    assert tight.code == 1 and doc["summary"]["passed"] is False
    assert doc["summary"]["accuracy_drop"] > 0.1
    after = max(l["shift_after"] for l in doc["layers"] if l["recalibrated"])
    # population estimator on 4 batches: the shift afterwards is just above 1
    low = cli(*args, "--output", tmp_path / "b.pt", "--fail-above", f"{max(1.0, after - 1e-4)}")
    assert low.code == 1
    ok = cli(*args, "--output", tmp_path / "c.pt", "--fail-above", "1.1")
    assert ok.code == 0, ok.err
    bad = cli(*args, "--output", tmp_path / "d.pt", "--max-accuracy-drop", "-1")
    assert bad.code == 2 and "--max-accuracy-drop" in bad.err and not (tmp_path / "d.pt").exists()


def test_deprecated_seed_warns(cli, tmp_path):
    res = cli("recalibrate", DROPOUT_BN, "--data", CALIB, "--max-batches", "1", "--output",
              tmp_path / "o.pt", "--seed", "3", "--quiet")
    assert res.code == 0
    assert res.err_lines == [
        "varshift: warning: --seed does nothing for recalibrate (it draws nothing at random) "
        "and will be removed"
    ]


def test_export_seed_seeds_the_example_input(tmp_path):
    a = varshift.export_file(DROPOUT_BN, tmp_path / "a.onnx", input_shape="2,1,8,8", seed=1)
    b = varshift.export_file(DROPOUT_BN, tmp_path / "b.onnx", input_shape=(2, 1, 8, 8), seed=1)
    c = varshift.export_file(DROPOUT_BN, tmp_path / "c.onnx", input_shape="2,1,8,8", seed=2)
    assert a and b and c
    # same seed, same inputs, same differences; another seed, other inputs
    assert a.max_abs_diff == b.max_abs_diff
    assert (a.max_abs_diff, a.max_rel_diff) != (c.max_abs_diff, c.max_rel_diff)


def test_scan_file_fail_on(tmp_path):
    rep = varshift.scan_file(DROPOUT_BN)
    assert not rep and rep.summary["fail_on"] == "error"
    never = varshift.scan_file(DROPOUT_BN, fail_on="never")
    assert never and never.findings == rep.findings
    with pytest.raises(varshift.VarshiftError, match="`fail_on` must be one of error, warning, never"):
        varshift.scan_file(DROPOUT_BN, fail_on="sometimes")


def test_console_script_and_module_resolve_modules_alike(tmp_path):
    """`varshift` (the console script) and `python -m varshift` both import --arch modules
    from the current directory."""
    (tmp_path / "mynets.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Dropout(0.5), nn.BatchNorm2d(4))\n"
    )
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Dropout(0.5),
                                   torch.nn.BatchNorm2d(4)).state_dict(), tmp_path / "sd.pt")
    # a console script is a file elsewhere: Python puts its folder, not the current one, on
    # sys.path (unlike `python -m`)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "varshift_script.py").write_text("from varshift.cli import run\nrun()\n")
    env = subprocess_env()
    args = ["scan", "sd.pt", "--arch", "mynets:build", "--format", "json"]
    as_script = subprocess.run([sys.executable, str(bin_dir / "varshift_script.py"), *args],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    as_module = subprocess.run([sys.executable, "-m", "varshift", *args], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=120)
    assert as_script.returncode == as_module.returncode == 1, (as_script.stderr, as_module.stderr)
    assert json.loads(as_script.stdout)["findings"] == json.loads(as_module.stdout)["findings"]


def test_probe_after_swap_without_data_blames_the_swap_not_the_data(tmp_path):
    """Uout keeps the variance, so the BatchNorms of a swapped model that was not recalibrated
    still hold dropout's statistics: probe says so instead of suspecting the data."""
    out = tmp_path / "swapped.pt"
    varshift.swap_file(DROPOUT_BN, out)
    rep = varshift.probe_file(out, CALIB, max_batches=2, device="cpu")
    assert not rep and rep.worst.name == "5" and rep.worst.train_shift < 1.05
    assert "Uout upstream (4)" in rep.verdict and "recalibrate" in rep.verdict
    assert "calibration data may differ" not in rep.verdict
    fixed = varshift.recalibrate_file(out, CALIB, tmp_path / "fixed.pt", max_batches=2,
                                      device="cpu")
    assert fixed and varshift.probe_file(tmp_path / "fixed.pt", CALIB, max_batches=2,
                                         device="cpu")


def test_file_functions_print_nothing(tmp_path, capsys):
    """Library functions return reports; only the CLI prints."""
    varshift.scan_file(DROPOUT_BN)
    varshift.probe_file(DROPOUT_BN, CALIB, max_batches=1, device="cpu")
    varshift.recalibrate_file(DROPOUT_BN, CALIB, tmp_path / "r.pt", max_batches=1, device="cpu")
    varshift.swap_file(DROPOUT_BN, tmp_path / "s.pt")
    out, err = capsys.readouterr()
    assert out == "" and err == ""


def test_file_functions_refuse_bad_outputs_before_any_work(tmp_path):
    """Output paths are checked first: nothing is loaded, nothing written."""
    with pytest.raises(varshift.VarshiftError, match="is an input file"):
        varshift.recalibrate_file(DROPOUT_BN, CALIB, CALIB)
    with pytest.raises(varshift.VarshiftError, match="same file"):
        varshift.swap_file(DROPOUT_BN, tmp_path / "x.pt", onnx=tmp_path / "x.pt",
                           input_shape="1,1,8,8")
    assert list(tmp_path.iterdir()) == []
