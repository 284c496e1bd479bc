"""varshift.testing: the assertions users put in their own test suites, on the real sample
model and its data, and in a real pytest run of a user's test file."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import varshift
from varshift.testing import assert_no_dropout_before_bn, assert_no_variance_shift

from conftest import REPO, subprocess_env
from fixtures import models as M


@pytest.fixture(scope="module")
def sample():
    model = torch.load(REPO / "sample_models" / "digits_dropout_bn.pt", weights_only=False)
    x, y = torch.load(REPO / "sample_models" / "digits_calib.pt")
    return model, [(x[i:i + 64], y[i:i + 64]) for i in range(0, len(x), 64)]


def test_shifted_model_fails_with_a_table_of_the_offending_layers(sample) -> None:
    model, batches = sample
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = varshift.probe(model, batches)
    with pytest.raises(AssertionError) as info:
        assert_no_variance_shift(model, batches, max_shift=1.05)
    message = str(info.value)
    bad = [l for l in probe.layers if l.shift > 1.05]
    assert [l.name for l in bad] == ["5", "9"]
    assert message.startswith(f"variance shift above 1.05x in 2 of 3 BatchNorm layers of "
                              f"Sequential ({probe.samples} samples):")
    lines = message.splitlines()
    for l in bad:  # one row per offending layer, with the probe's numbers
        row = next(r for r in lines if r.split()[:1] == [l.name])
        assert f"{l.shift:.3f}x" in row and f"{l.train_shift:.3f}x" in row and "4" in row.split()
    assert not any(r.split()[:1] == ["1"] for r in lines)  # layer 1 is within 1.05x
    assert "`fixed, report = varshift.recalibrate(model, batches, exact=True)`" in message
    assert not re.search(r"(?<![\w-])--[a-z]", message)  # a Python helper: no command-line flags
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_recalibrated_model_passes_and_the_threshold_is_inclusive(sample) -> None:
    model, batches = sample
    fixed, _ = varshift.recalibrate(model, batches, exact=True)
    report = assert_no_variance_shift(fixed, batches, max_shift=1.05)
    assert report.summary["max_shift"] <= 1.05
    worst = varshift.probe(model, batches).worst.shift
    assert_no_variance_shift(model, batches, max_shift=worst)  # at the limit: passes
    with pytest.raises(ValueError):
        assert_no_variance_shift(model, batches, max_shift=0.9)


def test_static_check_names_the_line_and_the_fix() -> None:
    import inspect

    with pytest.raises(AssertionError) as info:
        assert_no_dropout_before_bn(M.ModuleDropoutBN())
    message = str(info.value)
    lines, start = inspect.getsourcelines(M.ModuleDropoutBN.forward)
    line = start + next(i for i, t in enumerate(lines) if "self.drop(x)" in t)
    assert f"tests/fixtures/models.py:{line} in forward" in message
    assert message.startswith("1 regularizer shifts the statistics of 2 of 3 BatchNorm layers")
    assert "drop" in message and "bn1" in message and "~1.25x" in message
    assert "fix: `varshift.recalibrate(exact=True)`; or `varshift.swap` to Uout" in message


def test_static_check_passes_clean_and_uout_models_and_honours_fail_on() -> None:
    assert_no_dropout_before_bn(M.DropoutHead())  # dropout only after the last BN
    report = assert_no_dropout_before_bn(M.UoutBN())  # an info finding: negligible shift
    assert [f.severity for f in report.findings] == ["info"]
    with pytest.raises(AssertionError, match="warning"):
        assert_no_dropout_before_bn(M.plain_warning())
    assert_no_dropout_before_bn(M.plain_warning(), fail_on="error")
    with pytest.raises(AssertionError):
        assert_no_dropout_before_bn(M.DataDependent(), M.example((2, 3, 8, 8)))


def test_in_a_users_pytest_run(tmp_path: Path) -> None:
    """What a user sees: pytest prints the table, not varshift's internals."""
    test_file = tmp_path / "test_user_model.py"
    test_file.write_text(textwrap.dedent(f"""
        import torch
        from varshift.testing import assert_no_variance_shift

        def test_no_shift():
            model = torch.load({str(REPO / 'sample_models/digits_dropout_bn.pt')!r},
                               weights_only=False)
            x, y = torch.load({str(REPO / 'sample_models/digits_calib.pt')!r})
            assert_no_variance_shift(model, [x[:256], x[256:]], max_shift=1.05)
    """))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(test_file)], capture_output=True, text=True, cwd=tmp_path,
                          env=subprocess_env(), timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    e_lines = [l[1:].strip() for l in proc.stdout.splitlines() if l.startswith("E ")]
    assert e_lines[0].startswith("AssertionError: variance shift above 1.05x in 2 of 3 BatchNorm")
    assert [l.split()[0] for l in e_lines[3:5]] == ["5", "9"]
    assert "varshift/probing.py" not in proc.stdout  # the helper's frames are hidden
