"""export_onnx: real exporter, real onnxruntime, real files (no mocks)."""

from __future__ import annotations

import itertools
import json
import os
from collections import OrderedDict

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

from varshift.errors import DataError, OutputError, VarshiftError
from varshift.export import ExportError, check_onnx_parity, export_onnx
from varshift.render import render_to_string
from varshift.reports import ParityResult
from varshift.uout import Uout

RANDOM_OPS = {"Dropout", "RandomUniform", "RandomUniformLike", "RandomNormal",
              "RandomNormalLike", "Bernoulli", "Multinomial"}


# --------------------------------------------------------------------------- fixtures


def conv_bn_dropout() -> nn.Module:
    """Conv -> Dropout -> BN (the variance-shift pattern), with non-default BN statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Dropout(0.3), nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 3, padding=1), nn.Dropout2d(0.2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(8, 5),
    )
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 12, 12))
    return model


def uout_model() -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(6, 16), Uout(0.3), nn.BatchNorm1d(16), nn.ReLU(), Uout(0.1), nn.Linear(16, 3))
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 6))
    return model


class Zeta(nn.Module):
    """Neither exporter has a translation for torch.special.zeta."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.special.zeta(self.lin(x).abs() + 2.0, torch.tensor(1.0))


class Skewed(nn.Module):
    """Adds ``offset`` to its output only while being exported: a file that differs from the
    model by a known amount."""

    def __init__(self, offset: float) -> None:
        super().__init__()
        self.offset = offset
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.BatchNorm1d(8))

    def forward(self, x):
        y = self.net(x)
        if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
            y = y + self.offset
        return y


class TwoHeads(nn.Module):
    """Two inputs, a dict output (like torchvision's segmentation models)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Dropout(0.2), nn.BatchNorm2d(4))
        self.b = nn.Linear(5, 4)

    def forward(self, image, vec):
        feat = self.a(image).mean(dim=(2, 3))
        return OrderedDict(out=feat + self.b(vec), aux=(feat.sigmoid(), vec * 2))


class BranchOnData(nn.Module):
    """Python control flow on a tensor value: torch.export refuses it, TorchScript traces it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return -self.lin(x)


def op_types(path) -> set[str]:
    graph = onnx.load(str(path)).graph
    return {n.op_type for n in graph.node}


def run_ort(path, *inputs: torch.Tensor) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}
    return sess.run(None, feed)


def snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, m.training) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()])


def assert_same(before, after) -> None:
    state0, modes0, grads0 = before
    state1, modes1, grads1 = after
    assert state0.keys() == state1.keys()
    for k in state0:
        assert torch.equal(state0[k], state1[k]), k
    assert modes0 == modes1
    assert grads0 == grads1


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def dropout_export(tmp_path_factory):
    """conv_bn_dropout in train mode (one BN in eval: a mixed model), exported once."""
    model = conv_bn_dropout()
    model[3].eval()
    x = torch.randn(3, 3, 12, 12)
    before, rng = snapshot(model), torch.get_rng_state()
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    result = export_onnx(model, out, x, opset=18)
    return {"model": model, "x": x, "out": out, "result": result, "before": before,
            "after": snapshot(model), "rng_before": rng, "rng_after": torch.get_rng_state()}


def check_one_file(out, make, shape) -> None:
    """The file itself, without the result object: batch sizes 1 and 7, eval reference."""
    assert not op_types(out) & RANDOM_OPS  # dropout and Uout export to nothing
    reference = make().eval()
    for batch in (1, 7):
        x = torch.randn(batch, *shape[1:])
        (got,) = run_ort(out, x)
        with torch.no_grad():
            want = reference(x).numpy()
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_dropout_model_one_file_batch_1_and_7(dropout_export):
    result = dropout_export["result"]
    assert result and result.passed
    assert result.max_abs_diff <= 1e-4
    assert result.batch_sizes == [1, 3, 7]
    assert result.exporter == "torch.export"
    check_one_file(dropout_export["out"], conv_bn_dropout, (3, 3, 12, 12))


def test_train_mode_model_untouched(dropout_export):
    assert_same(dropout_export["before"], dropout_export["after"])
    assert dropout_export["model"].training and not dropout_export["model"][3].training
    assert torch.equal(dropout_export["rng_before"], dropout_export["rng_after"])


def test_uout_model_untouched_and_quiet(tmp_path, capfd):
    model = uout_model().eval()
    x = torch.randn(2, 6)
    before = snapshot(model)
    capfd.readouterr()
    result = export_onnx(model, tmp_path / "u.onnx", x)
    captured = capfd.readouterr()
    assert captured.out == ""  # nothing on stdout, not even the exporter's progress lines
    assert "[torch.onnx]" not in captured.err
    assert result and result.max_abs_diff <= 1e-4 and result.batch_sizes == [1, 2, 7]
    assert_same(before, snapshot(model))
    check_one_file(tmp_path / "u.onnx", uout_model, (2, 6))


def test_unexportable_model_raises_and_leaves_no_file(tmp_path, capfd):
    out = tmp_path / "zeta.onnx"
    with pytest.raises(ExportError) as info:
        export_onnx(Zeta(), out, torch.randn(3, 4))
    message = str(info.value)
    assert isinstance(info.value, VarshiftError)
    assert "\n" not in message and "Zeta" in message and "zeta" in message.replace("Zeta", "")
    assert info.value.log  # the swallowed exporter output is kept for debugging
    assert not out.exists()
    assert os.listdir(tmp_path) == []  # no temporary file either
    assert capfd.readouterr().out == ""


def test_failed_export_keeps_existing_file(tmp_path):
    out = tmp_path / "keep.onnx"
    out.write_bytes(b"precious")
    with pytest.raises(ExportError):
        export_onnx(Zeta(), out, torch.randn(3, 4))
    assert out.read_bytes() == b"precious"
    assert os.listdir(tmp_path) == ["keep.onnx"]


def test_parity_result_bool_and_json(dropout_export):
    result, out = dropout_export["result"], dropout_export["out"]
    assert isinstance(result, ParityResult)
    assert bool(result) is True
    doc = json.loads(json.dumps(result.to_dict()))
    assert doc["schema"] == "varshift.export/1"
    assert doc["output"] == str(out)
    assert doc["passed"] is True
    assert 0 <= doc["max_abs_diff"] <= 1e-4 and doc["max_rel_diff"] >= 0
    assert doc["batch_sizes"] == [1, 3, 7]
    assert doc["opset"] == 18 and doc["outputs"] == 1
    assert doc["exporter"] == "torch.export"
    assert doc["file_size"] == out.stat().st_size
    assert [c["batch_size"] for c in doc["checks"]] == [3, 1, 7]
    assert "varshift_version" in doc
    for fmt in ("text", "markdown"):
        rendered = render_to_string(result, fmt)
        assert str(out) in rendered and "batch size 7" in rendered


def test_edited_initializer_fails_parity(dropout_export, tmp_path):
    model, x = dropout_export["model"], dropout_export["x"]
    proto = onnx.load(str(dropout_export["out"]))
    init = max(proto.graph.initializer, key=lambda t: len(t.dims))  # a weight tensor
    array = onnx.numpy_helper.to_array(init).copy()
    array.flat[0] += 0.5
    init.CopyFrom(onnx.numpy_helper.from_array(array, init.name))
    out = tmp_path / "edited.onnx"
    onnx.save(proto, str(out))

    assert check_onnx_parity(model, dropout_export["out"], x)  # the original still passes
    result = check_onnx_parity(model, out, x)
    assert not result and result.passed is False
    assert result.max_abs_diff > 1e-3
    assert result.to_dict()["passed"] is False
    assert "FAILED" in render_to_string(result, "text")


def test_parity_failure_keeps_file(tmp_path):
    out = tmp_path / "skewed.onnx"
    result = export_onnx(Skewed(0.1), out, torch.randn(4, 4))
    assert result.passed is False
    assert 0.09 < result.max_abs_diff < 0.11
    assert out.is_file() and result.file_size == out.stat().st_size
    assert all(not c.passed and c.error is None for c in result.checks)


def test_zero_tolerance_catches_tiny_difference(tmp_path):
    model, x, out = Skewed(1e-6), torch.randn(4, 4), tmp_path / "a.onnx"
    assert export_onnx(model, out, x)  # within the default tolerance
    strict = check_onnx_parity(model, out, x, atol=0, rtol=0)
    assert not strict and strict.max_abs_diff > 0


def test_dict_output_two_inputs_and_calibration_pairs(tmp_path):
    torch.manual_seed(2)
    model = TwoHeads()
    batches = (((torch.randn(n, 3, 6, 6), torch.randn(n, 5)), torch.zeros(n))
               for n in itertools.cycle([5, 3]))  # endless: only a few are read
    out = tmp_path / "two.onnx"
    result = export_onnx(model, out, None, batches=batches)
    assert result, result.checks
    assert result.outputs == 3
    assert result.batch_sizes == [1, 3, 5, 7]
    got = run_ort(out, torch.randn(7, 3, 6, 6), torch.randn(7, 5))
    assert [g.shape for g in got] == [(7, 4), (7, 4), (7, 5)]


def test_falls_back_to_torchscript_exporter(tmp_path):
    torch.manual_seed(3)
    x = torch.rand(4, 4) + 0.1  # positive: every check takes the traced branch
    result = export_onnx(BranchOnData(), tmp_path / "b.onnx", x)
    assert result.exporter == "torchscript"
    assert result.passed
    assert any("torch.export exporter failed" in n for n in result.notes)
    assert any("tracer warning" in n for n in result.notes)


def test_bad_paths_and_inputs(tmp_path):
    model = uout_model()
    with pytest.raises(OutputError):
        export_onnx(model, tmp_path, torch.randn(2, 6))
    with pytest.raises(OutputError):
        export_onnx(model, tmp_path / "missing" / "m.onnx", torch.randn(2, 6))
    with pytest.raises(DataError):
        export_onnx(model, tmp_path / "m.onnx")
    with pytest.raises(DataError):
        export_onnx(model, tmp_path / "m.onnx", "not a tensor")
    with pytest.raises(DataError):  # calibration data that does not fit the model
        export_onnx(model, tmp_path / "m.onnx", batches=[torch.randn(4, 5)])
    with pytest.raises(VarshiftError, match="atol"):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 6), atol=-1)
    assert os.listdir(tmp_path) == []
