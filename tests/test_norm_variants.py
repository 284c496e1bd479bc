"""Every BatchNorm variant, named in the reports: BatchNorm1d/2d/3d, SyncBatchNorm in one
process, momentum=None, affine=False, subclasses; frozen norms (reported, recalibrated only on
request); track_running_stats=False (a finding); a model that is a BatchNorm; the peers'
documented behaviour (torch's update_bn tests and fvcore's PreciseBN tests, in our words)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import varshift
from varshift.errors import VarshiftError

from fixtures import probe_models as P


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.FrozenBatchNorm2d, written out (the core venv has no torchvision):
    buffers only, no train-mode behaviour."""

    def __init__(self, n: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


class Variants(nn.Module):
    """Dropout feeds a chain of every variant; a frozen norm sits right after the dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.frozen = FrozenBatchNorm2d(4)
        self.bn2d = nn.BatchNorm2d(4, momentum=None)
        self.sync = nn.SyncBatchNorm(4)
        self.plain = nn.BatchNorm2d(4, affine=False)
        self.zero_momentum = nn.BatchNorm2d(4, momentum=0.0)
        self.conv3 = nn.Conv3d(4, 4, 1)
        self.bn3d = nn.BatchNorm3d(4)
        self.fc = nn.Linear(4, 6)
        self.bn1d = nn.BatchNorm1d(6)
        self.batchstat = nn.BatchNorm1d(6, track_running_stats=False)

    def forward(self, x):
        h = self.frozen(self.drop(self.conv(x)))
        h = self.zero_momentum(self.plain(self.sync(self.bn2d(h))))
        h = self.bn3d(self.conv3(h.unsqueeze(2))).squeeze(2)
        return self.batchstat(self.bn1d(self.fc(h.mean((2, 3)))))


def variants() -> Variants:
    torch.manual_seed(0)
    model = Variants()
    with torch.no_grad():
        model.frozen.running_var.fill_(2.0)
        model.zero_momentum.running_var.fill_(3.0)
    momenta = {}
    batches = P.chunks(P.images(160, seed=1), 16)
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum != 0.0:
            m.reset_running_stats()
            momenta[name] = m.momentum
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(1)
        model.train()
        model.sync.__class__ = nn.BatchNorm2d  # SyncBatchNorm needs a process group to train
        for x in batches:
            model(x)
        model.sync.__class__ = nn.SyncBatchNorm
    return model.eval()


def test_every_variant_is_named_and_fixed():
    model = variants()
    data = P.chunks(P.images(64, seed=2), 16)
    scan = varshift.scan(model)
    types = {n.name: n.type for n in scan.norms}
    assert types == {"frozen": "FrozenBatchNorm2d", "bn2d": "BatchNorm2d", "sync": "SyncBatchNorm",
                     "plain": "BatchNorm2d", "zero_momentum": "BatchNorm2d", "bn3d": "BatchNorm3d",
                     "bn1d": "BatchNorm1d"}
    frozen = {n.name for n in scan.norms if n.frozen}
    assert frozen == {"frozen", "zero_momentum"}
    assert {n.name for n in scan.norms if n.affected} == {"bn2d", "sync", "plain", "bn3d", "bn1d"}
    assert any("2 frozen BatchNorm layers (BatchNorm2d, FrozenBatchNorm2d)" in n for n in scan.notes)
    batch = [f for f in scan.findings if f.rule == "norm-without-running-stats"]
    assert [f.regularizer for f in batch] == ["batchstat"] and batch[0].severity == "warning"
    assert "without running statistics" in scan.verdict
    from varshift.render import render_to_string

    for fmt in ("text", "markdown", "json"):
        assert "batchstat" in render_to_string(scan, fmt)

    fixed, rep = varshift.recalibrate(model, data, exact=True)
    done = {l.name for l in rep.layers if l.recalibrated}
    assert done == {"bn2d", "sync", "plain", "bn3d", "bn1d"}
    assert torch.equal(fixed.frozen.running_var, model.frozen.running_var)
    assert torch.equal(fixed.zero_momentum.running_var, model.zero_momentum.running_var)
    after = varshift.probe(fixed, data)
    for layer in after.layers:
        if layer.name in done:
            assert layer.shift == pytest.approx(1.0, abs=1e-3), layer
    assert type(fixed.sync) is nn.SyncBatchNorm

    with_frozen, rep = varshift.recalibrate(model, data, exact=True, include_frozen=True)
    assert {l.name for l in rep.layers if l.recalibrated} == done | frozen
    after = varshift.probe(with_frozen, data)
    for layer in after.layers:
        if layer.name in done | frozen:
            assert layer.shift == pytest.approx(1.0, abs=1e-3), layer
    _, rep = varshift.recalibrate(model, data, all_norms=True)
    assert {l.name for l in rep.layers if l.recalibrated} == done | frozen


def test_include_frozen_through_the_cli(tmp_path, cli):
    model = variants()
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    (tmp_path / "arch.py").write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom test_norm_variants import Variants\n"
        "def build():\n    return Variants()\n" % str(__import__("pathlib").Path(__file__).parent))
    torch.save(P.images(32, seed=2), tmp_path / "x.pt")
    r = cli("recalibrate", path, "--arch", f"{tmp_path / 'arch.py'}:build", "--data",
            tmp_path / "x.pt", "-o", tmp_path / "o.pt", "--include-frozen", "--format", "json",
            "--fail-above", "inf")  # what is recalibrated is checked here, not the shift left
    assert r.code == 0, r.err
    import json

    layers = {l["name"]: l for l in json.loads(r.out)["layers"]}
    assert layers["frozen"]["recalibrated"] and layers["zero_momentum"]["recalibrated"]
    saved = torch.load(tmp_path / "o.pt")
    assert not torch.equal(saved["frozen.running_var"], model.frozen.running_var)


def test_lazy_batchnorm_is_refused_until_materialized():
    lazy = nn.Sequential(nn.Dropout(0.2), nn.LazyBatchNorm1d())
    with pytest.raises(VarshiftError, match="uninitialized lazy"):
        varshift.recalibrate(lazy, [torch.randn(4, 3)])
    lazy(torch.randn(4, 3))  # materialized
    fixed, rep = varshift.recalibrate(lazy.eval(), [torch.randn(8, 3)], exact=True)
    assert [l.name for l in rep.layers if l.recalibrated] == ["1"]


# --------------------------------------------------------------------------- the peers' cases


def test_a_bare_batchnorm_is_the_model():
    """torch's update_bn tests recompute the statistics of a model that is one BatchNorm; so
    does fvcore's PreciseBN test: the population mean and variance of the data."""
    for bn, shape in ((nn.BatchNorm1d(3), (40, 3)), (nn.BatchNorm2d(3), (10, 3, 4, 4)),
                      (nn.BatchNorm3d(3), (6, 3, 2, 3, 3))):
        g = P.gen(1)
        x = torch.randn(shape, generator=g) * torch.tensor([1.0, 5.0, 0.2]).reshape(
            1, 3, *[1] * (len(shape) - 2)) + 3
        chunks = list(x.split(7))
        scan = varshift.scan(bn)
        assert [(n.name, n.type) for n in scan.norms] == [("", type(bn).__name__)]
        for exact in (False, True):
            fixed, rep = varshift.recalibrate(bn, chunks, exact=exact, all_norms=True)
            dims = [0, *range(2, len(shape))]
            assert torch.allclose(fixed.running_mean, x.mean(dims), rtol=1e-5, atol=1e-6)
            assert torch.allclose(fixed.running_var, x.var(dims), rtol=1e-5, atol=1e-6)
            assert fixed.num_batches_tracked.item() == len(chunks)
            assert not rep.notes or "all_norms" not in " ".join(rep.notes)
        # the model itself is untouched (a copy is fixed)
        assert torch.equal(bn.running_mean, torch.zeros(3))
        _, rep = varshift.recalibrate(bn, chunks)  # no dropout: nothing to do, said so
        assert any("use `all_norms=True`" in n for n in rep.notes)


def test_update_bn_cases_momentum_none_and_modes_restored():
    """update_bn's tests: momentum is kept, a model in train mode stays in train mode, and
    a network of several BNs ends with population statistics (ours: exactly, per level)."""
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, momentum=None), nn.ReLU(),
                          nn.Linear(4, 3), nn.BatchNorm1d(3, momentum=0.3)).train()
    x = torch.randn(50, 5, generator=P.gen(3)) * 2 + 1
    fixed, _ = varshift.recalibrate(model, x.split(10), exact=True, all_norms=True)
    assert fixed[1].momentum is None and fixed[4].momentum == 0.3
    assert fixed.training and all(m.training for m in fixed.modules())
    with torch.no_grad():
        h1 = model[0](x)
        assert torch.allclose(fixed[1].running_var, h1.var(0), rtol=1e-5)
        fixed.eval()
        h2 = fixed[3](fixed[2](fixed[1](h1)))
        assert torch.allclose(fixed[4].running_mean, h2.mean(0), rtol=1e-5, atol=1e-6)
        assert torch.allclose(fixed[4].running_var, h2.var(0), rtol=1e-5)


def test_precise_bn_case_large_mean_small_spread():
    """fvcore's PreciseBN accumulates E[x^2] - E[x]^2 in float32 and loses a channel whose
    mean is large against its spread; varshift merges in float64."""
    bn = nn.BatchNorm1d(2)
    g = P.gen(5)
    x = torch.randn(4000, 2, generator=g, dtype=torch.float64) * torch.tensor([1e-2, 1.0],
                                                                              dtype=torch.float64)
    x = (x + torch.tensor([1e3, 0.0], dtype=torch.float64))
    fixed, _ = varshift.recalibrate(bn, x.float().split(100), all_norms=True, exact=True)
    want = x.float().double().var(0)
    assert torch.allclose(fixed.running_var.double(), want, rtol=1e-3)
