"""varshift.probe: every number against an independent computation, the paper's law, and
the promises around it (model untouched, reproducible, streaming, calibration warning).

The reference lives in ``tests/fixtures/probe_models.py`` and does not use varshift: forward
pre-hooks on deep copies collect each BatchNorm's inputs, and ``torch.var(correction=1)`` in
float64 over their concatenation gives the population variances.
"""

from __future__ import annotations

import gc
import math
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import varshift
from varshift.errors import DataError, VarshiftError
from varshift.probing import probe
from varshift.stats import ChannelMoments, batch_moments

from fixtures import probe_models as P

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_models"
REL = 1e-4
KEYS = ("running_var_mean", "eval_var_mean", "train_var_mean", "shift", "train_shift",
        "channel_shift_median", "channel_shift_max")


def sample(name: str) -> Path:
    path = SAMPLES / name
    if not path.exists():
        pytest.fail(f"committed sample model missing (git checkout sample_models/, or python sample_models/make_models.py): {path}")
    return path


def load_sample(name: str) -> nn.Module:
    return varshift.load_model(sample(name)).module


def calib_batches(size: int = 64) -> list[torch.Tensor]:
    x, _ = torch.load(sample("digits_calib.pt"), weights_only=True)
    return P.chunks(x, size)


def assert_matches_reference(report, model, batches, seed) -> dict:
    ref = P.reference_stats(model, batches, seed)
    assert [l.name for l in report.layers] == ref["order"]
    for layer in report.layers:
        want = P.expected_layer(ref, layer.name)
        for key in KEYS:
            assert getattr(layer, key) == pytest.approx(want[key], rel=REL), (layer.name, key)
    return ref


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("seed", [0, 7])
def test_numbers_match_reference(seed):
    model = P.trained_net(p=0.5)
    batches = P.chunks(P.images(96, seed=3), 16)
    rep = probe(model, batches, seed=seed)
    assert_matches_reference(rep, model, batches, seed)
    assert [l.name for l in rep.layers] == ["1", "5", "10"]
    assert [l.affected for l in rep.layers] == [False, True, True]
    assert rep.samples == 96 and rep.batches == 6
    assert rep.layers[1].shift > 1.3  # Dropout(0.5) right before it
    assert rep.layers[0].shift == pytest.approx(1.0, abs=0.15)  # same distribution, no dropout


class _StatelessTrainBN(nn.BatchNorm2d):
    """A BatchNorm subclass whose train-mode forward never touches its running statistics."""

    def forward(self, x):
        if self.training:
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        return super().forward(x)


def test_norm_that_does_not_update_running_stats_is_measured_from_its_input():
    """probe reads train-mode batch statistics from BatchNorm's scratch buffers; a norm that
    never writes them must be measured from its input instead (same numbers)."""
    model = P.trained_net(p=0.5)
    custom = _StatelessTrainBN(model[5].num_features, momentum=None)
    custom.load_state_dict(model[5].state_dict())
    model[5] = custom
    batches = P.chunks(P.images(64, seed=3), 16)
    rep = probe(model, batches, seed=0)
    assert_matches_reference(rep, model, batches, 0)
    assert rep.layers[1].name == "5" and rep.layers[1].train_shift > 1.3


def test_execution_order_repeated_and_unused_norms():
    model = P.warm_up(P.OutOfOrder(), P.chunks(P.images(64, seed=5), 16))
    batches = P.chunks(P.images(48, seed=6), 12)
    rep = probe(model, batches, seed=1)
    assert_matches_reference(rep, model, batches, 1)
    assert [l.name for l in rep.layers] == ["early", "late"]  # execution, not registration
    assert {l.name: l.calls for l in rep.layers} == {"early": 8, "late": 4}
    assert {l.name: l.affected for l in rep.layers} == {"early": False, "late": True}
    assert any("unused" in n and "never ran" in n for n in rep.notes)


def test_sample_dropout_bn_model():
    model = load_sample("digits_dropout_bn.pt")
    batches = calib_batches()
    rep = probe(model, batches, seed=0)
    assert_matches_reference(rep, model, batches, 0)
    affected = [l for l in rep.layers if l.affected]
    assert affected, "the dropout-before-BN sample must have affected norms"
    for l in affected:
        assert l.shift > 1.5, (l.name, l.shift)
        assert l.train_shift > 1.5  # the train-mode pass reproduces the shift
    for l in rep.layers:
        if not l.affected:
            assert l.shift < 1.05, (l.name, l.shift)
    assert not rep and rep.worst in affected
    assert rep.samples == sum(len(b) for b in batches)
    assert not rep.warnings


def test_sample_clean_model():
    model = load_sample("digits_clean.pt")
    batches = calib_batches()
    rep = probe(model, batches, seed=0)
    assert_matches_reference(rep, model, batches, 0)
    assert rep.layers
    for l in rep.layers:
        assert l.affected is False
        assert l.shift < 1.05 and l.train_shift < 1.02, (l.name, l.shift)
    assert rep and not rep.warnings


def test_sample_functional_checkpoint():
    sample("digits_functional_ckpt.pt")
    loaded = varshift.load_model(
        sample("digits_functional_ckpt.pt"), arch=f"{sample('digits_functional.py')}:build",
        arch_args={"drop_rate": 0.3},
    )
    model = loaded.module
    batches = calib_batches(128)
    rep = probe(model, batches, seed=3)
    assert_matches_reference(rep, model, batches, 3)
    by = {l.name: l for l in rep.layers}
    assert list(by) == ["bn1", "bn2", "bn3"]
    assert not by["bn1"].affected and by["bn1"].shift < 1.05
    assert by["bn2"].affected and by["bn2"].shift > 1.3
    assert by["bn3"].affected


# --------------------------------------------------------------------------- the paper's law


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_shift_follows_one_over_one_minus_p(p):
    """Zero-mean input x ~ N(0, 1) -> Dropout(p) -> BatchNorm1d(momentum=None).

    Training records Var(x m / (1-p)) = 1/(1-p); inference sees Var(x) = 1: shift 1/(1-p).

    Sampling error, with d channels (independent: the identity keeps them so):
    * running_var_mean R: a cumulative average of per-batch unbiased variances over
      n_train = 200 * 256 samples per channel. The dropped-out y = x m / (1-p) has
      E[y^4] / E[y^2]^2 = 3 / (1-p), so relative SE(R) = sqrt((3/(1-p) - 1) / (d n_train)):
      at d = 64 that is 0.64e-3 (p = 0.1) to 1.2e-3 (p = 0.5).
    * eval_var_mean E over n_cal = 16 * 256 Gaussian samples: relative SE(E) =
      sqrt(2 / (d n_cal)) = 2.8e-3.
    The shift R / E has relative SE sqrt(se_R^2 + se_E^2) <= 3.1e-3; we allow 5 SE.
    """
    d, b = 64, 256
    n_train, n_cal = 200 * b, 16 * b
    model = P.law_model(p, d)
    P.warm_up(model, P.chunks(torch.randn(n_train, d, generator=P.gen(11)), b), seed=12)
    assert model[2].num_batches_tracked.item() == 200
    cal = P.chunks(torch.randn(n_cal, d, generator=P.gen(13)), b)
    rep = probe(model, cal, seed=0)
    (layer,) = rep.layers
    assert layer.affected is True
    se = math.sqrt((3 / (1 - p) - 1) / (d * n_train) + 2 / (d * n_cal))
    want = 1 / (1 - p)
    assert layer.shift == pytest.approx(want, rel=5 * se)
    assert layer.running_var_mean > layer.eval_var_mean  # the train variance is the larger
    # The train-mode pass on the calibration data reproduces it (both from n_cal samples:
    # relative SE sqrt((3/(1-p) - 1 + 2) / (d n_cal)) <= 4.4e-3, 5 SE allowed).
    se_t = math.sqrt((3 / (1 - p) + 1) / (d * n_cal))
    assert layer.train_shift == pytest.approx(want, rel=5 * se_t)


def test_shift_with_nonzero_mean_follows_design_formula():
    """docs/concepts.md: for input mean c and variance v, Dropout(p) makes the train variance
    (v + p c^2) / ((1-p) v) times the eval one. c = 1, v = 1, p = 0.3: 1.3 / 0.7 = 1.857.

    Same sample sizes as above; the fourth moment of x m / (1-p) is larger with c = 1
    (relative SE of R about 1.5e-3, of E 2.8e-3), so 2% is over 5 SE."""
    p, d, b = 0.3, 64, 256
    model = P.law_model(p, d)
    P.warm_up(model, P.chunks(torch.randn(200 * b, d, generator=P.gen(21)) + 1, b), seed=22)
    rep = probe(model, P.chunks(torch.randn(16 * b, d, generator=P.gen(23)) + 1, b))
    assert rep.layers[0].shift == pytest.approx((1 + p) / (1 - p), rel=0.02)


# --------------------------------------------------------------------------- model untouched


def _mixed_modes(model: nn.Module) -> nn.Module:
    """Train mode overall, but one norm and the dropout frozen in eval: probe must put back
    exactly this, not a uniform mode."""
    model.train()
    for m in model.modules():
        if isinstance(m, (nn.Dropout, nn.BatchNorm1d)):
            m.eval()
    return model


def test_model_untouched_after_probe():
    model = _mixed_modes(P.trained_net())
    before = P.snapshot(model)
    rng = torch.get_rng_state()
    probe(model, P.chunks(P.images(64, seed=4), 16), seed=5)
    P.assert_same(before, model)
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("call", [1, 2, 3, 4])
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_model_untouched_when_forward_raises(call, exc):
    """Calls alternate eval, train: calls 2 and 4 raise with the scratch buffers swapped in
    and the model in train mode. A user error becomes a DataError; Ctrl-C passes through."""
    torch.manual_seed(0)
    model = P.RaisesOnCall(call, exc=exc)
    P.warm_up(model.net, P.chunks(P.images(64, seed=1), 16))
    model = _mixed_modes(model)
    before = P.snapshot(model)
    rng = torch.get_rng_state()
    expected = DataError if exc is RuntimeError else exc
    with pytest.raises(expected, match=f"boom on call {call}"):
        probe(model, P.chunks(P.images(64, seed=2), 16), seed=0)
    assert model.calls == call
    P.assert_same(before, model)
    assert torch.equal(torch.get_rng_state(), rng)


def test_model_untouched_when_a_batch_does_not_fit():
    model = _mixed_modes(P.trained_net())
    before = P.snapshot(model)
    rng = torch.get_rng_state()
    bad = [P.images(8, seed=1), P.images(8, shape=(5, 8, 8))]  # the 2nd batch has 5 channels
    with pytest.raises(DataError) as info:
        probe(model, bad, seed=0)
    msg = str(info.value)
    assert "batch 1" in msg and "(8, 5, 8, 8)" in msg and "(N, 3, H, W)" in msg
    assert "\n" not in msg
    P.assert_same(before, model)
    assert torch.equal(torch.get_rng_state(), rng)


def test_empty_data_and_single_sample_batches():
    model = P.trained_net()
    with pytest.raises(DataError, match="no batches"):
        probe(model, [])
    # one sample: the train-mode BatchNorm1d's statistics are read from its input (#9)
    one = probe(model, [P.images(1)])
    assert one.samples == 1 and all(l.eval_var_mean == l.eval_var_mean for l in one.layers)


# --------------------------------------------------------------------------- reproducibility


def test_same_seed_same_report_whatever_the_callers_rng():
    model = P.trained_net()
    batches = P.chunks(P.images(64, seed=8), 16)
    torch.manual_seed(123)
    a = probe(model, batches, seed=4).to_dict()
    torch.manual_seed(456)
    torch.rand(10)
    b = probe(model, batches, seed=4).to_dict()
    assert a == b


def test_different_seed_changes_only_the_train_mode_numbers():
    model = P.trained_net()
    batches = P.chunks(P.images(64, seed=8), 16)
    a, b = probe(model, batches, seed=1), probe(model, batches, seed=2)
    for la, lb in zip(a.layers, b.layers):
        assert la.eval_var_mean == lb.eval_var_mean
        assert la.running_var_mean == lb.running_var_mean
        assert la.shift == lb.shift
        if la.affected:
            assert la.train_var_mean != lb.train_var_mean
        else:
            assert la.train_var_mean == lb.train_var_mean  # no dropout upstream


# --------------------------------------------------------------------------- streaming


def test_probe_streams_a_generator_without_keeping_batches_or_activations():
    """50 batches from a generator: each input batch and each activation is released once
    the next batch is under way, and nothing is alive after probe returns."""
    model = P.trained_net()
    inputs: list[weakref.ref] = []
    acts: list[weakref.ref] = []
    leaks: list[str] = []

    def keep_ref(mod, args, out):
        acts.append(weakref.ref(out))
        alive = [i for i, r in enumerate(acts[:-4]) if r() is not None]  # 2 forwards a batch
        if alive:
            leaks.append(f"activations {alive} alive at forward {len(acts)}")

    handle = model[4].register_forward_hook(keep_ref)

    def gen():
        for i in range(50):
            x = P.images(8, seed=1000 + i)
            inputs.append(weakref.ref(x))
            alive = [j for j, r in enumerate(inputs[:-3]) if r() is not None]
            if alive:
                leaks.append(f"batches {alive} alive at batch {i}")
            yield x

    try:
        rep = probe(model, gen(), seed=0)
    finally:
        handle.remove()
    gc.collect()
    assert rep.batches == 50 and rep.samples == 400
    assert not leaks, leaks[:3]
    assert all(r() is None for r in inputs + acts)
    # ... and the streamed numbers are still the population statistics
    assert_matches_reference(rep, model, [P.images(8, seed=1000 + i) for i in range(50)], 0)


@pytest.mark.parametrize("shape", [(7, 5), (7, 5, 3), (7, 5, 4, 3), (7, 5, 2, 2, 2)])
def test_channel_moments_merged_equal_one_shot(shape):
    gen = P.gen(0)
    parts = [torch.randn((n, *shape[1:]), generator=gen) * 3 + 2 for n in (1, 7, 2, 30, 5)]
    cm = ChannelMoments()
    for part in parts:
        cm.add(part)
    whole = P._channels_first(torch.cat(parts))
    assert cm.count == whole.shape[1]
    torch.testing.assert_close(cm.mean, whole.mean(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cm.var, whole.var(1, correction=1), rtol=1e-6, atol=0)
    torch.testing.assert_close(cm.biased_var, whole.var(1, correction=0), rtol=1e-6, atol=0)


def test_chan_merge_precision_with_a_large_mean():
    """Batch sizes from 1 to 100000 and a mean of 1e4 around a spread of 1: float64 Chan
    merging keeps 1e-9 relative; E[x^2] - E[x]^2 would lose about 8 digits here."""
    gen = P.gen(1)
    sizes = [1, 100_000, 2, 3, 37, 1, 4096, 9]
    parts = [1e4 + torch.randn(n, 3, dtype=torch.float64, generator=gen) for n in sizes]
    parts += [1e4 + torch.randn(n, 3, 2, 2, dtype=torch.float64, generator=gen) for n in (1, 500)]
    cm = ChannelMoments()
    for part in parts:
        cm.add(part)
    whole = torch.cat([P._channels_first(part) for part in parts], 1)
    ref_mean = whole.mean(1)
    ref_var = ((whole - ref_mean[:, None]) ** 2).sum(1) / (whole.shape[1] - 1)  # two-pass
    assert cm.count == whole.shape[1]
    torch.testing.assert_close(cm.mean, ref_mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(cm.var, ref_var, rtol=1e-9, atol=0)
    # merge() from precomputed moments, wildly different counts, the big batch last
    cm2 = ChannelMoments()
    for part in reversed(parts):
        cm2.merge(*batch_moments(part))
    torch.testing.assert_close(cm2.var, ref_var, rtol=1e-9, atol=0)


# --------------------------------------------------------------------------- calibration warning


def test_warns_when_calibration_data_does_not_look_like_training_data():
    model = P.trained_net()
    ok = probe(model, P.chunks(P.images(64, seed=9), 16))
    assert not ok.warnings
    scaled = probe(model, P.chunks(P.images(64, seed=9, scale=5.0), 16))
    assert len(scaled.warnings) == 1
    assert "calibration data may not look like the training data" in scaled.warnings[0]
    assert "1" in scaled.warnings[0]  # names the unaffected layer


def test_warning_on_sample_model_with_scaled_data():
    model = load_sample("digits_dropout_bn.pt")
    assert not probe(model, calib_batches()).warnings
    rep = probe(model, [b * 5 for b in calib_batches()])
    assert rep.warnings and "training data" in rep.warnings[0]


def test_uninitialized_lazy_model_is_refused_untouched():
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.Dropout(0.5), nn.LazyBatchNorm2d())
    with pytest.raises(VarshiftError, match="uninitialized lazy"):
        probe(model, [P.images(8)])
    assert type(model[2]) is nn.LazyBatchNorm2d  # a forward would have materialized it


def test_progress_callback():
    model = P.trained_net()
    calls = []
    probe(model, P.chunks(P.images(40), 10), progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    calls.clear()
    probe(model, iter(P.chunks(P.images(40), 10)), progress=lambda *a: calls.append(a))
    assert calls == [(1, None), (2, None), (3, None), (4, None)]  # a generator: length unknown


def test_no_norms_is_an_empty_report():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    rep = probe(model, [torch.randn(8, 4)])
    assert rep.layers == [] and rep and rep.summary["max_shift"] == 1.0
