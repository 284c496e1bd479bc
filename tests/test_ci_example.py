"""examples/ci: the shell script that the GitHub workflow calls, run on the sample models."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, subprocess_env

SCRIPT = REPO / "examples" / "ci" / "varshift-ci.sh"
WORKFLOW = REPO / "examples" / "ci" / "github-workflow.yml"


def run_script(*args: str, out: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=600,
        env=subprocess_env(OUT=str(out), VARSHIFT=f"{sys.executable} -m varshift", **env))


def test_the_workflow_runs_the_script_and_uploads_what_it_writes() -> None:
    text = WORKFLOW.read_text()
    assert re.search(r"run: bash examples/ci/varshift-ci\.sh \"\$MODEL\" \"\$DATA\"", text)
    out = re.search(r"^\s+OUT: (\S+)", text, flags=re.M).group(1)
    assert f"sarif_file: {out}/scan.sarif" in text and f"path: {out}/" in text
    assert "upload-sarif" in text and "security-events: write" in text
    assert "upload-artifact" in text


@pytest.mark.slow
def test_fix_mode_is_green_on_the_sample_model_and_keeps_the_artifacts(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_script("sample_models/digits_dropout_bn.pt", "sample_models/digits_calib.pt",
                      out=out, EVAL_DATA="sample_models/digits_test.pt")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "export.json", "fixed-digits_dropout_bn.pt", "model.onnx", "probe.json",
        "recalibrate.html", "scan.sarif"]
    sarif = json.loads((out / "scan.sarif").read_text())
    assert [r["ruleId"] for r in sarif["runs"][0]["results"]] == ["regularizer-before-norm"]
    probe = json.loads((out / "probe.json").read_text())
    assert probe["data"] == "sample_models/digits_test.pt" and probe["summary"]["max_shift"] < 1.05
    assert json.loads((out / "export.json").read_text())["passed"] is True
    assert "<svg" in (out / "recalibrate.html").read_text()


@pytest.mark.slow
def test_check_mode_fails_on_the_unfixed_model_and_passes_the_clean_one(tmp_path: Path) -> None:
    """The unfixed model is a checkpoint plus --arch: the options after DATA reach every
    command, and the SARIF points into the file that defines the model."""
    bad = run_script("sample_models/digits_functional_ckpt.pt", "sample_models/digits_calib.pt",
                     "--arch", "sample_models/digits_functional.py:build", "--arch-args",
                     '{"drop_rate": 0.3}', out=tmp_path / "bad", MODE="check")
    assert bad.returncode == 1, bad.stderr
    assert "varshift-ci: scan: gate failed (exit 1)" in bad.stderr
    assert "varshift-ci: probe: gate failed (exit 1)" in bad.stderr
    sarif = json.loads((tmp_path / "bad" / "scan.sarif").read_text())
    uris = {r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
            for r in sarif["runs"][0]["results"]}
    assert uris == {"sample_models/digits_functional.py"}
    assert "<svg" in (tmp_path / "bad" / "probe.html").read_text()
    clean = run_script("sample_models/digits_clean.pt", "sample_models/digits_calib.pt",
                       out=tmp_path / "clean", MODE="check")
    assert clean.returncode == 0, clean.stdout[-2000:] + clean.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run_script(out=tmp_path / "a").returncode == 2
    proc = run_script("m.pt", "d.pt", out=tmp_path / "b", MODE="nope")
    assert proc.returncode == 2 and "MODE must be fix or check" in proc.stderr
    proc = run_script(str(tmp_path / "missing.pt"), "sample_models/digits_calib.pt",
                      out=tmp_path / "c")
    assert proc.returncode == 2 and "varshift: error:" in proc.stderr
    assert "scan failed with exit status 2" in proc.stderr
