"""Modes and option objects (varshift.options): validated once at the entrance, in the
library's own words; the library and the file-level functions answer alike."""

from __future__ import annotations

import json

import pytest
import torch

import varshift
from conftest import REPO
from varshift.data import load_data
from varshift.errors import DataError, VarshiftError
from varshift.loading import load_model
from varshift.options import (CallSpec, ExactPath, FailOn, Labels, RecalibrateOptions, Session,
                              choice)

SAMPLES = REPO / "sample_models"
DROPOUT_BN = SAMPLES / "digits_dropout_bn.pt"
CALIB = SAMPLES / "digits_calib.pt"
TEST = SAMPLES / "digits_test.pt"


def test_choice_returns_members_and_names_the_parameter():
    assert choice(Labels, "last", "labels") is Labels.LAST
    assert choice(Labels, Labels.NONE, "labels") is Labels.NONE
    assert Labels.LAST == "last" and json.dumps({"m": FailOn.WARNING}) == '{"m": "warning"}'
    with pytest.raises(VarshiftError, match=r"^`exact_path` must be one of auto, frontier, "
                       r"levels, got 'fast'$"):
        choice(ExactPath, "fast", "exact_path")
    with pytest.raises(DataError):
        CallSpec(labels="first")


def test_library_errors_name_parameters_not_flags():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    batches = [torch.randn(8, 4)]
    with pytest.raises(DataError) as err:
        varshift.probe(model, batches, labels="bad")
    assert str(err.value) == "`labels` must be one of auto, none, last, got 'bad'"
    with pytest.raises(VarshiftError, match="^`max_accuracy_drop` must be >= 0"):
        varshift.recalibrate(model, batches, max_accuracy_drop=-1)
    with pytest.raises(VarshiftError, match="^`cache_mb` must be a number"):
        RecalibrateOptions(cache_mb=float("nan"))


def test_the_cli_says_the_same_in_flags(cli, tmp_path):
    res = cli("recalibrate", DROPOUT_BN, "--data", CALIB, "-o", tmp_path / "o.pt",
              "--max-accuracy-drop", "-1")
    assert res.code == 2
    assert res.err_lines == ["varshift: error: --max-accuracy-drop must be >= 0 percentage "
                             "points, got -1.0"]


def test_scan_and_scan_file_answer_alike():
    module = load_model(DROPOUT_BN).module
    for gate in ("error", "warning", "never"):
        in_memory = varshift.scan(module, fail_on=gate)
        from_file = varshift.scan_file(DROPOUT_BN, fail_on=gate)
        assert bool(in_memory) == bool(from_file)
        assert in_memory.fail_on == from_file.fail_on == gate
    assert not varshift.scan(module) and varshift.scan(module, fail_on="never")


def test_recalibrate_and_recalibrate_file_answer_alike_on_the_accuracy_guard(tmp_path):
    module = load_model(DROPOUT_BN).module
    cal = load_data(CALIB, batch_size=64, max_batches=2)
    held = load_data(TEST, batch_size=64)
    _, rep = varshift.recalibrate(module, cal, eval_batches=held, device="cpu",
                                  max_accuracy_drop=0.0)
    drop = rep.accuracy_drop
    from_file = varshift.recalibrate_file(DROPOUT_BN, CALIB, tmp_path / "o.pt", max_batches=2,
                                          eval_data=TEST, device="cpu", max_accuracy_drop=0.0)
    assert rep.max_accuracy_drop == from_file.max_accuracy_drop == 0.0
    assert drop is not None and from_file.accuracy_drop == pytest.approx(drop)
    assert bool(rep) == bool(from_file) == (not drop > 0.0)
    # the guard is part of the report from the start: the same call without it passes
    _, loose = varshift.recalibrate(module, cal, eval_batches=held, device="cpu")
    assert loose.max_accuracy_drop is None and bool(loose) == (max(
        l.shift_after for l in loose.layers if l.recalibrated) < loose.threshold)


def test_a_session_holds_no_group_outside_torchrun(tmp_path):
    """The CLI gets the process group a command started from the Session it passed in, not
    from module state: outside torchrun there is none."""
    from varshift.cli.app import _outcome

    session = Session()
    code, line = _outcome(["probe", str(DROPOUT_BN), "--data", str(CALIB), "--max-batches", "1",
                           "--quiet"], session)
    # exit 1: the shipped dropout model is shifted; no error line; no group
    assert (code, line) == (1, None) and session.dist is None


def test_swap_advises_in_the_words_of_its_caller(tmp_path, cli):
    """The library's swap() has no data to pass: it names recalibrate; swap_file and the
    command line, which take data, say to pass it."""
    module = load_model(DROPOUT_BN).module
    _, rep = varshift.swap(module)
    assert rep.verdict.endswith("recalibrate them now with `varshift.recalibrate()`)")
    from_file = varshift.swap_file(DROPOUT_BN, tmp_path / "s.pt")
    assert from_file.verdict.endswith("pass `data` to recalibrate them now)")
    res = cli("swap", DROPOUT_BN, "-o", tmp_path / "c.pt", "--format", "json")
    assert res.code == 0
    assert json.loads(res.out)["summary"]["verdict"].endswith(
        "pass --data to recalibrate them now)")
