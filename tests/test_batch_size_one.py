"""Batches of one sample and BatchNorm inputs with one value per channel: the estimators read
such a batch's statistics from the norm's input (torch refuses to normalize it with batch
statistics) and give the statistics of one big batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import varshift
from varshift.data import load_data

from fixtures import probe_models as P


def running(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (m.running_mean.double().clone(), m.running_var.double().clone())
            for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def assert_close(a: dict, b: dict, names) -> None:
    for n in names:
        scale = a[n][1].max().sqrt().item()  # means near 0 compare against the spread
        for x, y in zip(a[n], b[n]):
            assert torch.allclose(x, y, rtol=1e-6, atol=1e-6 * scale), (n, (x - y).abs().max())


def vector_net() -> nn.Sequential:
    """Linear -> Dropout -> BatchNorm1d on (N, C): one value per channel per sample."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 6), nn.Dropout(0.4), nn.BatchNorm1d(6, momentum=None),
                          nn.ReLU(), nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    return P.warm_up(model, [torch.randn(16, 5, generator=P.gen(i)) + 1 for i in range(10)])


def tiny_map_net() -> nn.Sequential:
    """Convs down to a 1x1 map, Dropout, BatchNorm2d there."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1),
                          nn.Dropout(0.3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    return P.warm_up(model, P.chunks(P.images(160, seed=9), 16))


CASES = {
    "vector": (vector_net, lambda n, s: torch.randn(n, 5, generator=P.gen(s)) + 1),
    "1x1 map": (tiny_map_net, lambda n, s: P.images(n, seed=s)),
    "conv net": (P.trained_net, lambda n, s: P.images(n, seed=s)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("split", ["ones", "last one"])
def test_exact_statistics_equal_one_big_batch(case, split):
    build, data = CASES[case]
    model = build()
    x = data(17, 3)
    batches = [x[i:i + 1] for i in range(17)] if split == "ones" else [x[:16], x[16:]]
    big, _ = varshift.recalibrate(model, [x], exact=True, all_norms=True, measure=False)
    small, _ = varshift.recalibrate(model, batches, exact=True, all_norms=True, measure=False)
    assert_close(running(big), running(small), running(big))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("split", ["ones", "last one"])
def test_population_and_probe_run_on_single_samples(case, split):
    """The population estimator's first norm sees the same inputs however the data is
    batched: its statistics equal one big batch's. Probe's eval variances too; and nothing
    alarming is said."""
    build, data = CASES[case]
    model = build()
    x = data(17, 3)
    batches = [x[i:i + 1] for i in range(17)] if split == "ones" else [x[:16], x[16:]]
    big, _ = varshift.recalibrate(model, [x], all_norms=True, measure=False)
    small, rep = varshift.recalibrate(model, batches, all_norms=True, measure=False)
    first = next(iter(running(big)))
    assert_close(running(big), running(small), [first])
    assert all(torch.isfinite(v).all() for pair in running(small).values() for v in pair)
    ref = varshift.probe(model, [x])
    got = varshift.probe(model, batches)
    for a, b in zip(ref.layers, got.layers):
        assert b.eval_var_mean == pytest.approx(a.eval_var_mean, rel=1e-6)
        assert b.train_var_mean == b.train_var_mean  # measured, not NaN
    assert not [w for w in got.warnings if "per channel" in w]


def test_cli_batch_size_one(tmp_path, cli, save):
    model = vector_net()
    path = save(model, "m.pt")
    x = torch.randn(9, 5, generator=P.gen(2)) + 1
    torch.save(x, tmp_path / "x.pt")
    # probe measures a shifted model (it would fail at 1.1x); the population estimator's
    # downstream norm sees an upstream one normalize single samples, so only the exact
    # estimator is held to the 1.1x line here
    for args in (["probe", "--fail-above", "inf"], ["recalibrate", "-o", tmp_path / "o.pt", "--exact"],
                 ["recalibrate", "-o", tmp_path / "p.pt", "--fail-above", "inf"]):
        r = cli(*args, path, "--data", tmp_path / "x.pt", "--batch-size", 1, "--quiet")
        assert r.code == 0, r.err
        assert r.err == ""


def test_bare_batchnorm_one_sample_batches():
    bn = nn.BatchNorm1d(3)
    x = torch.randn(7, 3, generator=P.gen(0)) * 3 + 2
    fixed, _ = varshift.recalibrate(bn, [x[i:i + 1] for i in range(7)], all_norms=True,
                                    measure=False)
    assert torch.allclose(fixed.running_mean, x.mean(0), atol=1e-6)
    assert torch.allclose(fixed.running_var, x.var(0), atol=1e-5)
