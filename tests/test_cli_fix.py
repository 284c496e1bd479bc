"""`varshift recalibrate` (and swap's shared plumbing) end to end: real files in, real files out.

Held-out metrics are checked against cross-entropy computed here; output files against the
input file's own layout; bad input against the contract (exit 2, one line on stderr, nothing
written).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import varshift
from conftest import REPO, TESTS, Result, signal_mid_recalibrate
from fixtures import fix_models as FM
from varshift.cli import main
from varshift.loading import load_model

SAMPLES = REPO / "sample_models"
DROPOUT_BN = SAMPLES / "digits_dropout_bn.pt"
CLEAN = SAMPLES / "digits_clean.pt"
FUNCTIONAL_CKPT = SAMPLES / "digits_functional_ckpt.pt"
FUNCTIONAL_ARCH = SAMPLES / "digits_functional.py"
CALIB = SAMPLES / "digits_calib.pt"
TEST = SAMPLES / "digits_test.pt"
FIX_ARCH = f"{TESTS / 'fixtures' / 'fix_models.py'}:build"


def need(*paths: Path) -> None:
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        pytest.fail(f"committed sample model missing (git checkout sample_models/, or python sample_models/make_models.py): {', '.join(missing)}")


def run_cli(*argv: object) -> Result:
    """``varshift.cli.main`` in-process with stdout/stderr captured (usable in any fixture)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return Result(code, out.getvalue(), err.getvalue())


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(x)


def nll_acc(model: nn.Module, data: dict) -> tuple[float, float]:
    out = logits(model, data["inputs"]).double()
    return (F.cross_entropy(out, data["labels"]).item(),
            (out.argmax(1) == data["labels"]).double().mean().item())


def bn_keys(state: dict) -> set[str]:
    return {k for k in state if k.rsplit(".", 1)[-1] in
            ("running_mean", "running_var", "num_batches_tracked")}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


# --------------------------------------------------------------------------- held-out metrics


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory):
    """One CLI run on the sample: --exact with held-out data, JSON on stdout."""
    need(DROPOUT_BN, CALIB, TEST)
    folder = tmp_path_factory.mktemp("exact")
    out = folder / "fixed.pt"
    result = run_cli("recalibrate", DROPOUT_BN, "--data", CALIB, "--output", out, "--exact",
                     "--eval-data", TEST, "--format", "json")
    assert result.code == 0, result.err
    return result, json.loads(result.out), out


def test_recalibrate_json_document(exact_run) -> None:
    result, doc, out = exact_run
    assert result.err == ""
    assert doc["schema"] == "varshift.recalibrate/1" and doc["varshift_version"]
    assert doc["output"] == str(out) and doc["estimator"] == "exact"
    assert [l["name"] for l in doc["layers"]] == ["1", "5", "9"]  # execution order
    for layer in doc["layers"]:
        assert {"name", "shift_before", "shift_after"} <= layer.keys()
    assert set(doc["metrics"]) == {"before", "after"}
    for side in ("before", "after"):
        assert {"accuracy", "nll"} <= doc["metrics"][side].keys()
        assert doc["metrics"][side]["held_out"] is True


def test_exact_improves_held_out_nll_and_reports_true_numbers(exact_run) -> None:
    _, doc, out = exact_run
    test = torch.load(TEST)
    nll0, acc0 = nll_acc(load_model(DROPOUT_BN).module, test)
    nll1, acc1 = nll_acc(load_model(out).module, test)
    before, after = doc["metrics"]["before"], doc["metrics"]["after"]
    # JSON rounds to 6 significant figures.
    assert before["nll"] == pytest.approx(nll0, rel=1e-5)
    assert after["nll"] == pytest.approx(nll1, rel=1e-5)
    assert before["accuracy"] == pytest.approx(acc0, rel=1e-5)
    assert after["accuracy"] == pytest.approx(acc1, rel=1e-5)
    assert before["samples"] == after["samples"] == len(test["labels"])
    assert after["nll"] < before["nll"]
    assert not any("not held out" in n for n in doc["notes"])
    fixed = {l["name"]: l for l in doc["layers"] if l["recalibrated"]}
    assert set(fixed) == {"5", "9"}
    for layer in fixed.values():
        assert layer["shift_before"] > 1.1 and abs(layer["shift_after"] - 1) < 1e-3


@torch.no_grad()
def _eval_norm_inputs(model: nn.Module, x: torch.Tensor, indices) -> dict:
    """The float64 inputs of ``model[i]`` for ``i`` in ``indices``, the model in eval mode."""
    seen: dict = {i: [] for i in indices}
    handles = [model[i].register_forward_pre_hook(
        lambda m, args, i=i: seen[i].append(args[0].double())) for i in indices]
    try:
        model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return {i: torch.cat(v) for i, v in seen.items()}


def test_whole_module_output_loads_safely_with_new_stats(exact_run) -> None:
    _, doc, out = exact_run
    loaded = load_model(out)  # no --trust: still a torch.nn-only pickle
    assert loaded.form == "module" and not loaded.trusted
    original = load_model(DROPOUT_BN).module
    new, old = loaded.module, original
    assert torch.equal(new[1].running_var, old[1].running_var)  # not affected: untouched
    # The exact estimator's statistics, computed here: each norm's input on the inference
    # path (the fixed model in eval mode: BN 9's input already sees BN 5's new statistics),
    # population mean and unbiased variance over all 512 calibration images.
    inputs = _eval_norm_inputs(new, torch.load(CALIB, weights_only=True)[0], (5, 9))
    for i in (5, 9):
        flat = inputs[i].transpose(0, 1).flatten(1)
        torch.testing.assert_close(new[i].running_var.double(), flat.var(dim=1), rtol=1e-4, atol=0)
        torch.testing.assert_close(new[i].running_mean.double(), flat.mean(dim=1), rtol=1e-4,
                                   atol=1e-6)
        assert not torch.allclose(new[i].running_var, old[i].running_var, rtol=0.05)
        assert new[i].num_batches_tracked.item() == doc["batches"]
        assert new[i].momentum == old[i].momentum
        assert new[i].running_var.double().mean().item() == pytest.approx(
            next(l for l in doc["layers"] if l["name"] == str(i))["running_var_after"], rel=1e-5)
    # Everything but the recalibrated buffers is bit-identical.
    changed = {f"{i}.{b}" for i in (5, 9) for b in ("running_mean", "running_var", "num_batches_tracked")}
    for key, value in old.state_dict().items():
        if key not in changed:
            assert torch.equal(new.state_dict()[key], value), key


def test_without_eval_data_metrics_are_flagged_as_calibration(tmp_path: Path) -> None:
    need(DROPOUT_BN, CALIB)
    report = tmp_path / "report.json"
    result = run_cli("recalibrate", DROPOUT_BN, "--data", CALIB, "--output", tmp_path / "o.pt",
                     "--max-batches", "2", "--report", report)
    assert result.code == 0, result.err
    assert "not held out" in " ".join(result.out.split())  # the text report says so too
    doc = json.loads(report.read_text())
    assert doc["estimator"] == "population" and doc["batches"] == 2
    assert any("not held out" in n for n in doc["notes"])
    assert doc["metrics"]["before"]["held_out"] is False
    assert doc["metrics"]["before"]["samples"] == 128


def test_clean_model_unchanged_without_all_norms(tmp_path: Path) -> None:
    need(CLEAN, CALIB, TEST)
    out = tmp_path / "clean_fixed.pt"
    result = run_cli("recalibrate", CLEAN, "--data", CALIB, "--output", out, "--max-batches", "2",
                     "--format", "json")
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    assert not any(l["recalibrated"] for l in doc["layers"])
    a, b = load_model(CLEAN).module, load_model(out).module
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    x = torch.load(TEST)["inputs"]
    assert torch.equal(logits(a, x), logits(b, x))


def test_clean_model_changes_only_slightly_with_all_norms(tmp_path: Path) -> None:
    """No regularizer reaches the clean model's norms: their running statistics were already
    right, and recalibrating them only trades the EMA for the population estimate."""
    need(CLEAN, CALIB, TEST)
    out = tmp_path / "clean_all.pt"
    result = run_cli("recalibrate", CLEAN, "--data", CALIB, "--output", out, "--all-norms",
                     "--format", "json")
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    assert all(l["recalibrated"] for l in doc["layers"])
    assert all(l["shift_before"] < 1.05 for l in doc["layers"])
    x = torch.load(TEST)["inputs"]
    la, lb = logits(load_model(CLEAN).module, x), logits(load_model(out).module, x)
    assert not torch.equal(la, lb)
    # On the generated samples: 0.06 logit standard deviations here, against 1.9 for the
    # dropout model's exact recalibration; 0.15 separates "slightly" from "a real fix".
    assert (la - lb).abs().max() < 0.15 * la.std()
    assert (la.argmax(1) == lb.argmax(1)).double().mean() >= 0.99


# --------------------------------------------------------------------------- checkpoints


def _import_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_checkpoint_round_trip(tmp_path: Path) -> None:
    need(FUNCTIONAL_CKPT, FUNCTIONAL_ARCH, CALIB)
    original = torch.load(FUNCTIONAL_CKPT)
    config = {k: v for k, v in original.get("config", {}).items()
              if k in ("drop_rate", "width", "hidden", "num_classes")}
    out = tmp_path / "ckpt_fixed.pt"
    result = run_cli("recalibrate", FUNCTIONAL_CKPT, "--arch", f"{FUNCTIONAL_ARCH}:build",
                     "--arch-args", json.dumps(config), "--data", CALIB, "--max-batches", "4",
                     "--output", out, "--format", "json")
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    fixed_norms = {l["name"] for l in doc["layers"] if l["recalibrated"]}
    assert "bn2" in fixed_norms and "bn1" not in fixed_norms

    saved = torch.load(out, weights_only=True)  # still plain tensors and containers
    assert list(saved) == list(original)
    for key in original:
        if key != "model_state_dict":
            assert repr(saved[key]) == repr(original[key]), key  # epoch, optimizer, config
    old_sd, new_sd = original["model_state_dict"], saved["model_state_dict"]
    assert list(new_sd) == list(old_sd)
    changed = {k for k in new_sd if not torch.equal(new_sd[k], old_sd[k])}
    expected = {f"{n}.{b}" for n in fixed_norms
                for b in ("running_mean", "running_var", "num_batches_tracked")}
    assert changed == expected
    for key in old_sd:
        assert new_sd[key].dtype == old_sd[key].dtype

    # What the user's training script does: build, load_state_dict, carry on.
    arch = _import_file(FUNCTIONAL_ARCH, "digits_functional_for_test")
    model = arch.build(**config)
    model.load_state_dict(torch.load(out)["model_state_dict"])
    assert model.bn2.num_batches_tracked.item() == 4


def _prefixed_checkpoint(batches, drop_nbt: bool = False) -> tuple[dict, nn.Module]:
    """A DataParallel-style checkpoint: ``module.`` keys, an optimizer, extra entries."""
    torch.manual_seed(0)
    model = FM.settle(FM.chain3(p=0.5), batches)
    wrapped = nn.DataParallel(model)  # on CPU it only adds the prefix
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    wrapped(batches[0][0]).sum().backward()
    opt.step()
    FM.settle(model, batches)  # the step moved the weights: statistics to match
    state = wrapped.state_dict()
    if drop_nbt:  # a checkpoint from before PyTorch 0.4.1
        state = type(state)((k, v) for k, v in state.items() if not k.endswith("num_batches_tracked"))
    ckpt = {"epoch": 12, "state_dict": state, "optimizer": opt.state_dict(), "best_acc": 0.91,
            "note": "dp run"}
    return ckpt, model


@pytest.mark.parametrize("drop_nbt", [False, True])
def test_prefixed_checkpoint_round_trip(tmp_path: Path, drop_nbt: bool) -> None:
    batches = FM.data(n_batches=4, batch=16)
    ckpt, model = _prefixed_checkpoint(batches, drop_nbt)
    src, data, out = tmp_path / "ckpt.pt", tmp_path / "calib.pt", tmp_path / "ckpt_fixed.pt"
    torch.save(ckpt, src)
    torch.save((torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])), data)
    result = run_cli("recalibrate", src, "--arch", FIX_ARCH, "--data", data, "--batch-size", "16",
                     "--output", out, "--quiet")
    assert result.code == 0, result.err
    assert result.out == ""

    saved = torch.load(out, weights_only=True)
    assert list(saved) == list(ckpt)
    assert saved["epoch"] == 12 and saved["best_acc"] == 0.91 and saved["note"] == "dp run"
    assert repr(saved["optimizer"]) == repr(ckpt["optimizer"])
    old_sd, new_sd = ckpt["state_dict"], saved["state_dict"]
    assert list(new_sd) == list(old_sd)  # prefixes kept; nothing added or dropped
    assert all(k.startswith("module.") for k in new_sd)
    changed = {k for k in new_sd if not torch.equal(new_sd[k], old_sd[k])}
    assert changed == {f"module.{i}.{b}" for i in (3, 6, 9)
                       for b in ("running_mean", "running_var")
                       + (() if drop_nbt else ("num_batches_tracked",))}

    # The same statistics the API computes.
    expected, _ = varshift.recalibrate(model, batches, measure=False)
    for i in (3, 6, 9):
        assert torch.allclose(new_sd[f"module.{i}.running_var"], expected[i].running_var,
                              rtol=1e-6, atol=0)

    # The user's way back: strip DataParallel's prefix, plain load_state_dict.
    user = FM.chain3()
    stripped = {k.removeprefix("module."): v for k, v in torch.load(out)["state_dict"].items()}
    user.load_state_dict(stripped, strict=not drop_nbt)
    assert torch.equal(user[3].running_var, new_sd["module.3.running_var"])


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def small(tmp_path: Path) -> dict[str, Path]:
    """A torch.nn-only whole module and data that fits it."""
    torch.manual_seed(0)
    batches = FM.data(n_batches=2, batch=8)
    model, data = tmp_path / "model.pt", tmp_path / "calib.pt"
    torch.save(FM.chain3(), model)
    torch.save(torch.cat([b[0] for b in batches]), data)
    return {"model": model, "data": data, "dir": tmp_path}


def assert_usage_error(result: Result, *, mentions: str | None = None) -> None:
    assert result.code == 2, (result.code, result.err)
    assert len(result.err_lines) == 1, result.err
    assert "Traceback" not in result.err
    assert result.err.startswith("varshift: error:")
    if mentions is not None:
        assert mentions in result.err, result.err


def test_swap_onnx_without_inputs_is_refused_before_writing(cli, small) -> None:
    """swap --onnx needs inputs to check parity; it says so before writing anything."""
    out, onnx = small["dir"] / "swapped.pt", small["dir"] / "swapped.onnx"
    result = cli("swap", small["model"], "--output", out, "--onnx", onnx)
    assert_usage_error(result, mentions="--input-shape")
    assert not out.exists() and not onnx.exists()


def test_output_equal_to_input_is_refused(cli, small) -> None:
    before = small["model"].read_bytes()
    result = cli("recalibrate", small["model"], "--data", small["data"], "--output", small["model"])
    assert_usage_error(result, mentions="input")
    assert small["model"].read_bytes() == before
    assert leftovers(small["dir"]) == []


@pytest.mark.parametrize("spelling", ["./model.pt", "sub/../model.pt", "{abs}"])
def test_output_equal_to_input_by_another_path_is_refused(cli, small, monkeypatch, spelling) -> None:
    monkeypatch.chdir(small["dir"])
    (small["dir"] / "sub").mkdir()
    before = small["model"].read_bytes()
    out = spelling.format(abs=small["model"])
    result = cli("recalibrate", "model.pt", "--data", "calib.pt", "--output", out)
    assert_usage_error(result, mentions="input")
    assert small["model"].read_bytes() == before
    assert leftovers(small["dir"]) == []


def test_swap_output_equal_to_input_is_refused(cli, small) -> None:
    before = small["model"].read_bytes()
    result = cli("swap", small["model"], "--output", small["model"])
    assert_usage_error(result, mentions="input")
    assert small["model"].read_bytes() == before


def test_output_folder_missing(cli, small) -> None:
    out = small["dir"] / "no" / "such" / "fixed.pt"
    result = cli("recalibrate", small["model"], "--data", small["data"], "--output", out)
    assert_usage_error(result, mentions="does not exist")
    assert not out.parent.exists()


def test_output_folder_unwritable(cli, small) -> None:
    folder = small["dir"] / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as a user (root?) that can write to a 0o500 folder")
        out = folder / "fixed.pt"
        result = cli("recalibrate", small["model"], "--data", small["data"], "--output", out)
        assert_usage_error(result, mentions="not writable")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


def test_missing_data_option(cli, small) -> None:
    out = small["dir"] / "fixed.pt"
    result = cli("recalibrate", small["model"], "--output", out)
    assert_usage_error(result, mentions="--data")
    assert not out.exists()


def test_data_file_missing(cli, small) -> None:
    out = small["dir"] / "fixed.pt"
    result = cli("recalibrate", small["model"], "--data", small["dir"] / "nope.pt", "--output", out)
    assert_usage_error(result, mentions="nope.pt")
    assert not out.exists()


def test_corrupt_data_file(cli, small) -> None:
    bad = small["dir"] / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 this is not a torch file" * 10)
    out = small["dir"] / "fixed.pt"
    result = cli("recalibrate", small["model"], "--data", bad, "--output", out)
    assert_usage_error(result, mentions="bad.pt")
    assert not out.exists() and leftovers(small["dir"]) == []


def test_data_that_does_not_fit_the_model(cli, small) -> None:
    wrong = small["dir"] / "wrong.pt"
    torch.save(torch.randn(16, 5), wrong)
    out = small["dir"] / "fixed.pt"
    for command in (["recalibrate"], ["recalibrate", "--exact"], ["swap"]):
        result = cli(*command, small["model"], "--data", wrong, "--output", out)
        assert_usage_error(result, mentions="does not fit")
        assert not out.exists() and leftovers(small["dir"]) == []


def test_interrupt_leaves_nothing(tmp_path: Path) -> None:
    """SIGINT in the middle of a real run: exit 130, no output, no temporary file."""
    # 0.5 s: well inside the run (60 batches x 50 ms per pass, several passes)
    returncode, err = signal_mid_recalibrate(tmp_path, signal.SIGINT, start_timeout=60, settle=0.5)
    assert returncode == 130, err
    assert "Traceback" not in err
    assert not (tmp_path / "fixed.pt").exists()
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "started"]


def _interrupted_run(tmp_path: Path) -> tuple[Result, Path]:
    """A real SIGINT, in-process, while recalibrate reads its data."""
    torch.manual_seed(0)
    model, out = tmp_path / "model.pt", tmp_path / "fixed.pt"
    torch.save(FM.chain3(), model)
    try:
        result = run_cli("recalibrate", model, "--output", out,
                         "--data", f"{TESTS / 'fixtures' / 'fix_models.py'}:interrupted_batches")
    except KeyboardInterrupt:  # must not escape main(): it would end the whole test session
        pytest.fail("KeyboardInterrupt escaped varshift.cli.main")
    return result, out


def test_sigint_in_process_exits_130_and_writes_nothing(tmp_path: Path) -> None:
    result, out = _interrupted_run(tmp_path)
    assert result.code == 130
    assert "Traceback" not in result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_sigint_says_so_on_stderr(tmp_path: Path) -> None:
    result, _ = _interrupted_run(tmp_path)
    assert len(result.err.strip().splitlines()) == 1 and "interrupted" in result.err


@pytest.mark.parametrize("flag", ["--output", "--report"])
def test_output_equal_to_data_is_refused(cli, small, flag) -> None:
    before = small["data"].read_bytes()
    outputs = {"--output": small["dir"] / "fixed.pt", flag: small["data"]}
    result = cli("recalibrate", small["model"], "--data", small["data"], "--quiet",
                 *[a for k, v in outputs.items() for a in (k, v)])
    assert small["data"].read_bytes() == before
    assert_usage_error(result, mentions="input")


class _CtrlCWhileSaving(nn.Module):
    """A layer whose pickling is interrupted: Ctrl-C arriving while torch.save writes."""

    def __reduce_ex__(self, protocol):
        raise KeyboardInterrupt


@pytest.mark.parametrize("form", ["module", "checkpoint-module"])
def test_interrupt_while_saving_leaves_nothing(tmp_path: Path, form: str) -> None:
    from varshift.loading import LoadedModel
    from varshift.saving import save_like

    module = nn.Sequential(nn.Linear(4, 4), _CtrlCWhileSaving())
    container = {"epoch": 1, "model": module} if form != "module" else module
    loaded = LoadedModel(module, tmp_path / "in.pt", form, container,
                         ("model",) if form != "module" else ())
    out = tmp_path / "fixed.pt"
    with pytest.raises(KeyboardInterrupt):
        save_like(loaded, module, out)
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary file
