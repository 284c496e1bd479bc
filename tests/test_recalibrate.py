"""varshift.recalibrate: both estimators against independent computations written here.

Every reference below is computed the slow, obvious way (keep every norm input, concatenate,
reduce once in float64) so that it shares no code with varshift's streaming estimators.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.optim.swa_utils import update_bn

import varshift
from conftest import REPO
from fixtures import fix_models as FM
from varshift.loading import load_model

SAMPLES = REPO / "sample_models"
DROPOUT_BN = SAMPLES / "digits_dropout_bn.pt"
CALIB = SAMPLES / "digits_calib.pt"
# The sample models are committed: a test that needs them fails when they are missing.
needs_samples = pytest.mark.usefixtures()


# --------------------------------------------------------------------------- helpers


def bns(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


@torch.no_grad()
def norm_inputs(model: nn.Module, batches, names, norms_train: bool) -> dict:
    """Per norm: its inputs over all batches as (C, everything) float64, model in eval mode
    (dropout off) and, with ``norms_train``, every norm normalizing with batch statistics."""
    model.eval()
    if norms_train:
        for m in bns(model).values():
            m.train()
    seen = {n: [] for n in names}
    modules = dict(model.named_modules())
    handles = [
        modules[n].register_forward_pre_hook(
            lambda mod, args, n=n: seen[n].append(
                args[0].detach().transpose(0, 1).reshape(args[0].shape[1], -1).double()))
        for n in names
    ]
    try:
        for x, *_ in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(chunks, dim=1) for n, chunks in seen.items()}


def reference_population(model: nn.Module, batches, names) -> dict:
    """The population estimator, done naively on a copy: mean and unbiased variance."""
    flat = norm_inputs(copy.deepcopy(model), batches, names, norms_train=True)
    return {n: (v.mean(dim=1), torch.var(v, dim=1, correction=1)) for n, v in flat.items()}


def reference_exact(model: nn.Module, batches, names_in_order) -> nn.Module:
    """The exact estimator, done naively: one norm at a time in execution order, a full eval
    forward over all data each time, each norm updated before the next is measured."""
    ref = copy.deepcopy(model).eval()
    modules = dict(ref.named_modules())
    for name in names_in_order:
        flat = norm_inputs(ref, batches, [name], norms_train=False)[name]
        modules[name].running_mean.copy_(flat.mean(dim=1).float())
        modules[name].running_var.copy_(torch.var(flat, dim=1, correction=1).float())
    return ref


def assert_stats_close(norm: nn.Module, mean: torch.Tensor, var: torch.Tensor, rtol: float) -> None:
    """Variances within ``rtol`` relative. Means within ``rtol`` of the channel's standard
    deviation: a mean near zero has no meaningful relative error, its scale is the spread."""
    got_m, got_v = norm.running_mean.double(), norm.running_var.double()
    assert torch.all((got_v - var).abs() <= rtol * var.abs()), (got_v, var)
    assert torch.all((got_m - mean).abs() <= rtol * var.sqrt()), (got_m, mean)


def state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def flags(model: nn.Module) -> list:
    return [(n, type(m).__name__, m.training) for n, m in model.named_modules()]


@pytest.fixture(scope="module")
def batches():
    return FM.data(n_batches=6, batch=16)


@pytest.fixture(scope="module")
def chain(batches):
    torch.manual_seed(0)
    return FM.settle(FM.chain3(p=0.5), batches)


@pytest.fixture(scope="module")
def branches(batches):
    torch.manual_seed(0)
    return FM.settle(FM.Branches(p=0.5), batches)


@pytest.fixture(scope="module")
def sample():
    if not (DROPOUT_BN.exists() and CALIB.exists()):
        pytest.fail("committed sample model missing (git checkout sample_models/, or python sample_models/make_models.py)")
    model = load_model(DROPOUT_BN).module
    x, y = torch.load(CALIB)
    return model, [(x[i:i + 128], y[i:i + 128]) for i in range(0, len(x), 128)]


# --------------------------------------------------------------------------- population


def test_population_matches_independent_computation(chain, batches) -> None:
    model = copy.deepcopy(chain)
    bns(model)["6"].momentum = None  # cumulative averaging must not leak into the estimate
    fixed, rep = varshift.recalibrate(model, batches)
    assert rep.estimator == "population" and rep.passes == 1
    assert [l.name for l in rep.recalibrated] == ["3", "6", "9"]
    ref = reference_population(model, batches, ["3", "6", "9"])
    norms = bns(fixed)
    for name, (mean, var) in ref.items():
        assert_stats_close(norms[name], mean, var, rtol=1e-4)


@needs_samples
def test_population_matches_independent_computation_on_sample(sample) -> None:
    model, cal = sample
    fixed, rep = varshift.recalibrate(model, cal, measure=False)
    names = [l.name for l in rep.recalibrated]
    assert names == ["5", "9"]  # the Dropout (4) reaches 5 directly and 9 downstream; 1 is before it
    ref = reference_population(model, cal, names)
    for name, (mean, var) in ref.items():
        assert_stats_close(bns(fixed)[name], mean, var, rtol=1e-4)
    assert torch.equal(bns(fixed)["1"].running_var, bns(model)["1"].running_var)


def test_population_on_functional_sample_with_batchnorm1d() -> None:
    """The functional sample: functional dropouts, a BatchNorm1d on (N, C) features."""
    ckpt, arch = SAMPLES / "digits_functional_ckpt.pt", SAMPLES / "digits_functional.py"
    if not (ckpt.exists() and arch.exists() and CALIB.exists()):
        pytest.fail("committed sample model missing (git checkout sample_models/, or python sample_models/make_models.py)")
    config = torch.load(ckpt).get("config", {})
    args = {k: v for k, v in config.items() if k in ("drop_rate", "width", "hidden", "num_classes")}
    model = load_model(ckpt, arch=f"{arch}:build", arch_args=args).module
    x, y = torch.load(CALIB)
    cal = [(x[i:i + 128], y[i:i + 128]) for i in range(0, 256, 128)]
    fixed, rep = varshift.recalibrate(model, cal, measure=False)
    names = [l.name for l in rep.recalibrated]
    assert "bn2" in names and "bn3" in names and "bn1" not in names
    assert isinstance(bns(fixed)["bn3"], nn.BatchNorm1d)
    for name, (mean, var) in reference_population(model, cal, names).items():
        assert_stats_close(bns(fixed)[name], mean, var, rtol=1e-4)


def test_population_differs_from_update_bn_where_dropout_is_on(chain, batches) -> None:
    """update_bn puts the whole model in train mode: dropout (p=0.5) inflates the variance
    that reaches the norms, which the population estimator (dropout off) does not see."""
    fixed, _ = varshift.recalibrate(chain, batches, measure=False)
    swa = copy.deepcopy(chain)
    torch.manual_seed(0)
    update_bn(batches, swa)
    ref = reference_population(chain, batches, ["3"])
    _, var = ref["3"]
    ours = bns(fixed)["3"].running_var.double()
    theirs = bns(swa)["3"].running_var.double()
    assert ((ours - var).abs() / var).max() < 1e-4
    assert ((theirs - var).abs() / var).mean() > 0.2  # dropout p=0.5: roughly 2x


def test_population_differs_from_update_bn_across_batches(batches) -> None:
    """Without any dropout, update_bn still differs: it averages per-batch variances, which
    leave out the spread between batch means. Batches here have very different means."""
    torch.manual_seed(0)
    model = FM.settle(FM.clean(), batches)
    shifted = [(x + 10.0 * i, y) for i, (x, y) in enumerate(batches)]
    fixed, rep = varshift.recalibrate(model, shifted, all_norms=True, measure=False)
    assert {l.name for l in rep.recalibrated} == {"1", "4"}
    swa = copy.deepcopy(model)
    update_bn(shifted, swa)
    (mean, var), = reference_population(model, shifted, ["1"]).values()
    assert_stats_close(bns(fixed)["1"], mean, var, rtol=1e-4)
    theirs = bns(swa)["1"].running_var.double()
    # Each conv channel's mean moves with the batch offset (by the sum of its weights): the
    # mean of per-batch variances misses that spread, so it falls well short of the truth.
    assert ((theirs - var).abs() / var).mean() > 0.2


# --------------------------------------------------------------------------- exact


def test_exact_passes_equal_dependency_levels(chain, branches, batches) -> None:
    """The per-level path: one pass per level. The frontier (the default where fx traces the
    model) reads the data once whatever the levels."""
    _, rep_chain = varshift.recalibrate(chain, batches, exact=True, measure=False,
                                        exact_path="levels")
    assert rep_chain.estimator == "exact"
    assert rep_chain.passes == 3  # 3 -> 6 -> 9: a chain
    assert rep_chain.exact.path == "levels" and "exact_path='levels'" in rep_chain.exact.reason
    _, rep_br = varshift.recalibrate(branches, batches, exact=True, measure=False,
                                     exact_path="levels")
    assert {l.name for l in rep_br.recalibrated} == {"bn_a", "bn_b", "bn_c"}
    assert rep_br.passes == 2  # bn_a, bn_b side by side; then bn_c
    for model in (chain, branches):
        _, rep = varshift.recalibrate(model, batches, exact=True, measure=False)
        assert rep.exact.path == "frontier" and rep.exact.reason is None
        assert rep.passes == 1 and rep.exact.cuts == 3


@pytest.mark.parametrize("which", ["chain", "branches"])
def test_exact_gives_shift_one_in_probe(which, request, batches) -> None:
    model = request.getfixturevalue(which)
    before = {l.name: l.shift for l in varshift.probe(model, batches).layers}
    fixed, rep = varshift.recalibrate(model, batches, exact=True)
    probe = {l.name: l for l in varshift.probe(fixed, batches).layers}
    for layer in rep.recalibrated:
        assert before[layer.name] > 1.05  # there was a shift to fix
        assert abs(probe[layer.name].shift - 1.0) < 1e-3
        assert abs(layer.shift_after - 1.0) < 1e-3
        assert layer.shift_before == pytest.approx(before[layer.name], rel=1e-9)


@needs_samples
def test_exact_gives_shift_one_on_sample(sample) -> None:
    model, cal = sample
    for path, passes in (("levels", 2), ("frontier", 1)):  # levels: 5 then 9
        fixed, rep = varshift.recalibrate(model, cal, exact=True, measure=False, exact_path=path)
        assert rep.passes == passes and rep.exact.path == path
        probe = {l.name: l.shift for l in varshift.probe(fixed, cal).layers}
        for name in ("5", "9"):
            assert abs(probe[name] - 1.0) < 1e-3


@pytest.mark.parametrize("path", ["levels", "frontier"])
@pytest.mark.parametrize("which,order", [("chain", ["3", "6", "9"]),
                                         ("branches", ["bn_a", "bn_b", "bn_c"])])
def test_exact_early_stop_matches_naive_and_skips_the_tail(which, order, path, request,
                                                           batches) -> None:
    model = request.getfixturevalue(which)
    head = "13" if which == "chain" else "head"
    work = copy.deepcopy(model)
    calls = []
    work.get_submodule(head).register_forward_hook(lambda *a: calls.append(1))
    fixed, rep = varshift.recalibrate(work, batches, exact=True, measure=False, inplace=True,
                                      exact_path=path)
    ref = reference_exact(model, batches, order)
    for name in order:
        ours, theirs = bns(fixed)[name], bns(ref)[name]
        assert_stats_close(ours, theirs.running_mean.double(), theirs.running_var.double(), 1e-5)
    if path == "levels":
        # Only the first pass runs to the end; every later pass stops at its last norm, before
        # the head. A naive implementation runs the head once per batch per level.
        assert len(calls) == len(batches)
        assert rep.passes * len(batches) > len(calls)
    else:  # nothing after the last norm runs at all
        assert calls == [] and rep.passes == 1


def test_exact_with_norm_called_twice_per_forward(batches) -> None:
    """A norm shared by two paths: its statistics cover both calls, the early stop waits for
    the second call."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv_a, self.conv_b = FM.conv(3, 8), FM.conv(3, 8)
            self.drop = nn.Dropout(0.5)
            self.bn = nn.BatchNorm2d(8)
            self.conv = FM.conv(8, 8)
            self.bn_out = nn.BatchNorm2d(8)

        def forward(self, x):
            s = self.bn(self.conv_a(x)) + self.bn(self.drop(self.conv_b(x)))
            return self.bn_out(self.conv(s))

    torch.manual_seed(0)
    model = FM.settle(Twice(), batches)
    fixed, rep = varshift.recalibrate(model, batches, exact=True, measure=False)
    # The frontier cuts once per norm call; a norm called twice takes the per-level path.
    assert rep.exact.path == "levels" and rep.exact.reason == "norm bn runs 2 times per forward"
    ref = reference_exact(model, batches, ["bn", "bn_out"])
    for name in ("bn", "bn_out"):
        theirs = bns(ref)[name]
        assert_stats_close(bns(fixed)[name], theirs.running_mean.double(),
                           theirs.running_var.double(), 1e-5)


# --------------------------------------------------------------------------- the user's model


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_model_untouched_by_default(chain, batches, exact, mode) -> None:
    model = copy.deepcopy(chain).train(mode == "train")
    bns(model)["6"].momentum = None
    before_state, before_flags = state(model), flags(model)
    fixed, rep = varshift.recalibrate(model, batches, exact=exact)
    assert fixed is not model
    assert same_state(state(model), before_state)
    assert flags(model) == before_flags
    assert flags(fixed) == before_flags  # the copy comes back in the input's modes
    for name, m in bns(fixed).items():
        assert m.num_batches_tracked.item() == len(batches)
        assert m.momentum == bns(model)[name].momentum  # 0.1, None, 0.1
    assert bns(fixed)["6"].momentum is None


def test_inplace_fixes_the_model_itself(chain, batches) -> None:
    model = copy.deepcopy(chain)
    old_var = bns(model)["3"].running_var.clone()
    fixed, _ = varshift.recalibrate(model, batches, inplace=True, measure=False)
    assert fixed is model
    assert not torch.equal(bns(model)["3"].running_var, old_var)
    assert bns(model)["3"].num_batches_tracked.item() == len(batches)


def test_clean_model_is_not_touched_without_all_norms(batches) -> None:
    torch.manual_seed(0)
    model = FM.settle(FM.clean(), batches)
    fixed, rep = varshift.recalibrate(model, batches)
    assert rep.recalibrated == [] and rep.passes == 0
    assert any("nothing to recalibrate" in n for n in rep.notes)
    assert same_state(state(fixed), state(model))
    x = batches[0][0]
    with torch.no_grad():
        assert torch.equal(fixed(x), model(x))


def test_generator_batches_are_reused_for_every_pass(chain, batches) -> None:
    """A one-shot iterator is enough for the multi-pass exact estimator."""
    fixed_gen, rep = varshift.recalibrate(chain, (b for b in batches), exact=True, measure=False)
    fixed_list, _ = varshift.recalibrate(chain, batches, exact=True, measure=False)
    assert rep.batches == len(batches)
    assert same_state(state(fixed_gen), state(fixed_list))


def test_population_without_measuring_streams_a_generator(chain, batches) -> None:
    """The population estimator alone reads the data once: a generator is streamed, each batch
    released once the next is under way, and the result equals the in-memory one."""
    import gc
    import weakref

    refs: list[weakref.ref] = []
    leaks: list[int] = []

    def gen():
        for i, (x, y) in enumerate(batches):
            x = x.clone()
            refs.append(weakref.ref(x))
            gc.collect()
            leaks.extend(j for j, r in enumerate(refs[:-3]) if r() is not None)
            yield x, y

    fixed_gen, rep = varshift.recalibrate(chain, gen(), measure=False)
    fixed_list, _ = varshift.recalibrate(chain, batches, measure=False)
    assert rep.batches == len(batches) and rep.samples == sum(len(x) for x, _ in batches)
    assert not leaks, leaks
    assert same_state(state(fixed_gen), state(fixed_list))
