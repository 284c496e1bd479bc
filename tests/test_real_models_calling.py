"""Real models called in other ways than ``model(x)`` (issue #9), in the real-architecture venv:
a Hugging Face ``transformers`` EfficientNet built from its config (random init, no weights)
called with ``pixel_values=``; a torchvision Faster R-CNN with FrozenBatchNorm2d, called on a
list of images through ``--call``; timm's ModelEmaV3 state. Ground truth from running them."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

import varshift

import arch_helpers as H
from fixtures.calling_models import trained

pytestmark = [pytest.mark.arch, pytest.mark.slow]


# --------------------------------------------------------------------------- transformers


def hf_efficientnet():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.EfficientNetConfig(
        image_size=32, width_coefficient=0.25, depth_coefficient=0.5, hidden_dim=320,
        num_labels=3, drop_connect_rate=0.3, dropout_rate=0.2)
    torch.manual_seed(0)
    return transformers.EfficientNetForImageClassification(cfg).eval()


def hf_batches(n: int, seed: int, size: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(size, 3, 32, 32, generator=g),
             "labels": torch.randint(0, 3, (size,), generator=g)} for _ in range(n)]


def test_hugging_face_efficientnet_with_pixel_values(tmp_path):
    model = hf_efficientnet()
    H.randomize_norms(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    truth = H.ground_truth(model, {"pixel_values": x})
    scan = varshift.scan(model, {"pixel_values": x})
    assert {n.name for n in scan.norms if n.affected} == truth.all_on
    assert len(truth.all_on) >= 10 and scan.traced_with == "dynamic"

    model = trained(model, hf_batches(6, seed=5), lambda m, b: m(pixel_values=b["pixel_values"]))
    data = hf_batches(3, seed=7)
    before = varshift.probe(model, data)
    assert max(l.shift for l in before.layers if l.affected) > 1.05
    fixed, rep = varshift.recalibrate(model, data, exact=True)
    done = {l.name for l in rep.layers if l.recalibrated}
    assert done == truth.all_on
    # labels go in as forward's own `labels` and come back out for the metrics (logits, not loss)
    assert rep.before is not None and rep.before.samples == 24
    after = varshift.probe(fixed, data)
    for layer in after.layers:
        if layer.name in done:
            assert layer.shift == pytest.approx(1.0, abs=1e-3), layer
    result = varshift.export_onnx(fixed, tmp_path / "hf.onnx", batches=data)
    assert result, result.checks
    assert result.outputs >= 1


# --------------------------------------------------------------------------- torchvision detection


CALL = '''
def call(model, batch):
    images, targets = batch
    # in training a detection model needs its targets (and returns losses)
    return model(images, targets) if model.training else model(images)
'''

DETECTOR = '''
import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d


def build():
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None,
                                   norm_layer=FrozenBatchNorm2d, trainable_layers=5)
    return FasterRCNN(backbone, num_classes=3, min_size=64, max_size=64)


def batches():
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        images = [torch.rand(3, 64, 64, generator=g) for _ in range(2)]
        targets = [{"boxes": torch.tensor([[5.0, 5.0, 40.0, 40.0]]), "labels": torch.tensor([1])}
                   for _ in range(2)]
        yield images, targets
'''


def test_torchvision_detection_with_frozen_batchnorm_through_call(tmp_path, cli):
    pytest.importorskip("torchvision")
    (tmp_path / "detector.py").write_text(DETECTOR)
    (tmp_path / "detect_call.py").write_text(CALL)
    import importlib.util

    spec = importlib.util.spec_from_file_location("detector_mod", tmp_path / "detector.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.build().eval()
    torch.save(model.state_dict(), tmp_path / "det.pt")
    arch = ["--arch", f"{tmp_path / 'detector.py'}:build"]
    call = ["--call", f"{tmp_path / 'detect_call.py'}:call"]
    data = ["--data", f"{tmp_path / 'detector.py'}:batches"]

    r = cli("scan", tmp_path / "det.pt", *arch, *data, *call, "--format", "json")
    assert r.code == 0, r.err
    scan = json.loads(r.out)
    frozen = [n for n in scan["norms"] if n["frozen"]]
    assert len(frozen) == 20 and all(n["type"] == "FrozenBatchNorm2d" for n in frozen)
    assert not any(n["affected"] for n in scan["norms"])  # frozen: training cannot shift them

    r = cli("recalibrate", tmp_path / "det.pt", *arch, *data, *call, "-o", tmp_path / "a.pt",
            "--format", "json")
    assert r.code == 0, r.err
    assert not any(l["recalibrated"] for l in json.loads(r.out)["layers"])  # not without asking

    r = cli("recalibrate", tmp_path / "det.pt", *arch, *data, *call, "-o", tmp_path / "b.pt",
            "--include-frozen", "--exact", "--format", "json")
    assert r.code == 0, r.err
    layers = json.loads(r.out)["layers"]
    assert len(layers) == 20 and all(l["recalibrated"] for l in layers)
    assert all(l["shift_after"] == pytest.approx(1.0, abs=1e-3) for l in layers)
    saved = torch.load(tmp_path / "b.pt")
    assert list(saved) == list(model.state_dict())  # the checkpoint keeps its layout
    name = "backbone.body.bn1.running_var"
    assert not torch.equal(saved[name], model.state_dict()[name])


# --------------------------------------------------------------------------- timm EMA


def test_timm_model_ema_v3_state(tmp_path, cli):
    timm = pytest.importorskip("timm")
    from timm.utils import ModelEmaV3

    arch = tmp_path / "arch.py"
    arch.write_text(textwrap.dedent('''
        import timm

        def build():
            return timm.create_model("resnet10t", num_classes=4, drop_rate=0.3,
                                     drop_block_rate=0.2, pretrained=False)
    '''))
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=4, drop_rate=0.3, drop_block_rate=0.2,
                              pretrained=False)
    ema = ModelEmaV3(model, decay=0.9)
    for _ in range(2):
        ema.update(model)
    state = {k: v.clone() for k, v in ema.state_dict().items()}  # not views of ema's tensors
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    torch.save(torch.randn(16, 3, 32, 32), tmp_path / "x.pt")
    r = cli("recalibrate", tmp_path / "ema.pt", "--arch", f"{arch}:build", "--data",
            tmp_path / "x.pt", "--all-norms", "-o", tmp_path / "out.pt", "--format", "json")
    assert r.code == 0, r.err
    out = torch.load(tmp_path / "out.pt")
    assert list(out) == list(state)
    ema.load_state_dict(out)  # loads back into the EMA wrapper
    assert not torch.equal(out["module.bn1.running_var"], state["module.bn1.running_var"])
