"""recalibrate --exact on real architectures: the frontier path gives the per-level path's
statistics (1e-6 relative) on every model of test_real_architectures.py that it handles, and
probe afterwards reads 1.000 for every recalibrated norm. The model fx cannot trace takes the
per-level path and says why.
"""

from __future__ import annotations

import pytest
import torch

import varshift
from test_recalibrate import assert_stats_close, bns

torchvision = pytest.importorskip("torchvision")

from test_real_architectures import BY_ID, randomize_norms  # noqa: E402

pytestmark = pytest.mark.arch

#: (case, all_norms): the cases with affected norms, and ResNet-18 (in-place residual adds)
#: with every norm recalibrated.
FRONTIER = [
    ("densenet121", False),
    ("efficientnet_b0", False),
    ("deeplabv3", False),
    ("timm_resnet18_dropblock", False),
    ("timm_efficientnet_b0", False),
    ("resnet18", True),
]


def build(case_id: str, batches: int = 3, batch: int = 4):
    case = BY_ID[case_id]
    torch.manual_seed(0)
    model = case.build()
    randomize_norms(model)
    model.eval()
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(batch, 3, case.size, case.size, generator=gen) for _ in range(batches)]
    return model, data


@pytest.mark.parametrize("case_id,all_norms", FRONTIER, ids=[c for c, _ in FRONTIER])
def test_frontier_equals_levels_and_probe_reads_one(case_id: str, all_norms: bool) -> None:
    model, data = build(case_id)
    front, rep = varshift.recalibrate(model, data, exact=True, all_norms=all_norms,
                                      measure=False)
    levels, rep_l = varshift.recalibrate(model, data, exact=True, all_norms=all_norms,
                                         measure=False, exact_path="levels")
    assert rep.exact.path == "frontier", rep.exact
    assert rep.passes == 1
    names = [l.name for l in rep.recalibrated]
    assert names and names == [l.name for l in rep_l.recalibrated]
    ours, theirs = bns(front), bns(levels)
    for name in names:
        assert_stats_close(ours[name], theirs[name].running_mean.double(),
                           theirs[name].running_var.double(), 1e-6)
        assert torch.equal(ours[name].num_batches_tracked, theirs[name].num_batches_tracked)
    probe = {l.name: l.shift for l in varshift.probe(front, data).layers}
    off = {n: probe[n] for n in names if abs(probe[n] - 1.0) > 1e-3}
    assert not off, off


def test_model_fx_cannot_trace_takes_the_level_path() -> None:
    model, data = build("timm_mobilevit_xxs", batches=2, batch=2)
    fixed, rep = varshift.recalibrate(model, data, exact=True, measure=False)
    assert rep.exact.path == "levels"
    assert rep.exact.reason.startswith("torch.fx cannot trace the model")
    assert any(n.startswith("exact estimator: one pass per dependency level") for n in rep.notes)
    probe = {l.name: l.shift for l in varshift.probe(fixed, data).layers}
    assert all(abs(probe[l.name] - 1.0) < 1e-3 for l in rep.recalibrated)
