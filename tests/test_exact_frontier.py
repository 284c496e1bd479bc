"""recalibrate --exact on the frontier path: the same statistics as the per-level path (and
as the naive reference) at one pass over the data, within its memory budget, and no
temporary file left behind whatever happens.

The per-level path (``exact_path="levels"``) is the reference the frontier must equal; both
are checked against the naive computation in test_recalibrate.py's ``reference_exact``.
"""

from __future__ import annotations

import copy
import signal
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import varshift
from fixtures import fix_models as FM
from test_recalibrate import assert_stats_close, bns, reference_exact

MIB = 1024 * 1024


# --------------------------------------------------------------------------- models


class Residual(nn.Module):
    """Views, an in-place residual add, a parameter read through get_attr (layer scale), a
    second input with a default, and a norm whose input is a slice of a wider tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = FM.conv(3, 8)
        self.drop = nn.Dropout2d(0.4)
        self.conv1 = FM.conv(8, 8)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = FM.conv(8, 8)
        self.bn2 = nn.BatchNorm2d(8)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8).view(1, 8, 1, 1))
        self.conv3 = FM.conv(8, 16)
        self.bn3 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x, shift: float = 0.0):
        x = self.drop(F.relu(self.stem(x))) + shift
        identity = x
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) * self.scale
        out += identity  # in place, as in torchvision's ResNet
        wide = self.conv3(F.relu(out))
        y = self.bn3(wide[:, 4:12])  # a view of a wider activation
        return self.head(y.mean(dim=(2, 3)))


class HookedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = FM.conv(8, 8)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def hooked() -> nn.Module:
    """A forward hook on a container: a graph run would skip it, so the frontier must not run."""
    model = nn.Sequential(FM.conv(3, 8), nn.Dropout(0.5), HookedBlock(), HookedBlock())
    model[2].register_forward_hook(lambda m, a, out: out * 0.5)
    return model


MODELS = {
    "chain3": lambda: FM.chain3(p=0.5),
    "branches": lambda: FM.Branches(p=0.5),
    "functional": lambda: FM.FunctionalDropout(p=0.3),
    "training_only": FM.TrainingOnlyDropout,
    "residual": Residual,
}


@pytest.fixture(scope="module")
def batches():
    return FM.data(n_batches=6, batch=16)


def settled(name: str, batches) -> nn.Module:
    torch.manual_seed(0)
    return FM.settle(MODELS[name](), batches)


def stats(model: nn.Module) -> dict:
    return {n: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
            for n, m in bns(model).items()}


def assert_same_stats(a: nn.Module, b: nn.Module, rtol: float, counts: bool = True) -> None:
    for name, m in bns(a).items():
        other = bns(b)[name]
        assert_stats_close(m, other.running_mean.double(), other.running_var.double(), rtol)
        if counts:
            assert torch.equal(m.num_batches_tracked, other.num_batches_tracked)


@pytest.fixture
def tmp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where tempfile puts temporary directories during the test (empty at the start)."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


# --------------------------------------------------------------------------- the statistics


@pytest.mark.parametrize("name", list(MODELS))
def test_frontier_equals_levels_and_the_naive_reference(name, batches) -> None:
    model = settled(name, batches)
    before = stats(model)
    front, rep = varshift.recalibrate(model, batches, exact=True, measure=False)
    levels, rep_l = varshift.recalibrate(model, batches, exact=True, measure=False,
                                         exact_path="levels")
    assert rep.exact.path == "frontier" and rep.passes == 1, rep.exact
    assert rep_l.exact.path == "levels"
    assert [l.name for l in rep.recalibrated] == [l.name for l in rep_l.recalibrated]
    assert rep.recalibrated and rep.exact.cuts == len(rep.recalibrated)
    assert rep.batches == rep_l.batches == len(batches)
    assert_same_stats(front, levels, 1e-6)
    order = [l.name for l in rep.recalibrated]
    assert_same_stats(front, reference_exact(model, batches, order), 1e-5, counts=False)
    # something changed, and the input model did not
    assert any(not torch.equal(bns(front)[n].running_var, before[n][1]) for n in order)
    for n, (rm, rv, nbt) in stats(model).items():
        assert torch.equal(rm, before[n][0]) and torch.equal(rv, before[n][1])


@pytest.mark.parametrize("name", ["chain3", "residual"])
def test_probe_after_the_frontier_reads_one(name, batches) -> None:
    model = settled(name, batches)
    fixed, rep = varshift.recalibrate(model, batches, exact=True)
    assert rep.exact.path == "frontier"
    probe = {l.name: l.shift for l in varshift.probe(fixed, batches).layers}
    for layer in rep.recalibrated:
        assert layer.shift_before > 1.02
        assert abs(probe[layer.name] - 1.0) < 1e-3


def test_the_model_runs_only_up_to_the_last_norm_once_per_batch(batches) -> None:
    model = copy.deepcopy(settled("chain3", batches))
    calls: dict[str, int] = {}
    for name, m in model.named_modules():
        if name:
            m.register_forward_hook(lambda m, a, o, name=name: calls.__setitem__(
                name, calls.get(name, 0) + 1))
    varshift.recalibrate(model, batches, exact=True, measure=False, inplace=True)
    # Every module up to the last norm (9) once per batch; the norm itself is not needed;
    # the head never.
    assert calls == {str(i): len(batches) for i in range(9)}


# --------------------------------------------------------------------------- which path


def test_models_the_frontier_cannot_run_take_the_level_path(batches) -> None:
    torch.manual_seed(0)
    untraceable = FM.settle(FM.UntraceableFunctional(), batches)
    _, rep = varshift.recalibrate(untraceable, batches, exact=True, measure=False)
    assert rep.exact.path == "levels" and "torch.fx cannot trace" in rep.exact.reason
    assert any(n.startswith("exact estimator: one pass per dependency level, because torch.fx")
               for n in rep.notes)

    model = FM.settle(hooked(), batches)
    fixed, rep = varshift.recalibrate(model, batches, exact=True, measure=False)
    assert rep.exact.path == "levels"
    assert rep.exact.reason == "2 has forward hooks that a graph run would bypass"
    probe = {l.name: l.shift for l in varshift.probe(fixed, batches).layers}
    assert abs(probe["3.bn"] - 1.0) < 1e-3  # the hook's effect is part of the statistics

    with pytest.raises(varshift.VarshiftError, match="frontier path of the exact estimator cannot run"):
        varshift.recalibrate(model, batches, exact=True, measure=False, exact_path="frontier")


def test_report_json_names_the_path(batches) -> None:
    model = settled("chain3", batches)
    _, rep = varshift.recalibrate(model, batches, exact=True, measure=False, cache_mb=64)
    doc = rep.to_dict()
    assert doc["exact"]["path"] == "frontier" and doc["exact"]["cache_mb"] == 64
    assert doc["exact"]["spilled_mb"] == 0
    _, rep = varshift.recalibrate(model, batches, measure=False)
    assert rep.to_dict()["exact"] is None


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "a lot"])
def test_bad_cache_budget_is_refused(bad, batches) -> None:
    model = settled("chain3", batches)
    with pytest.raises(varshift.VarshiftError, match="`cache_mb` must be a number"):
        varshift.recalibrate(model, batches, exact=True, cache_mb=bad)


# --------------------------------------------------------------------------- memory budget


def test_budget_is_respected_by_spilling_and_gives_the_same_statistics(batches, tmp_root) -> None:
    model = settled("chain3", batches)
    # At every cut of chain3 the only value alive is the conv output that feeds the norm:
    # 16 x 8 x 8 x 8 float32 per batch.
    per_batch = 16 * 8 * 8 * 8 * 4 / MIB
    in_memory, rep = varshift.recalibrate(model, batches, exact=True, measure=False)
    assert rep.exact.peak_mb == pytest.approx(len(batches) * per_batch)
    assert rep.exact.kept_mb == pytest.approx(len(batches) * per_batch)
    assert rep.exact.spilled_mb == 0

    budget = 2.5 * per_batch  # room for two batches' values
    spilled, rep = varshift.recalibrate(model, batches, exact=True, measure=False,
                                        cache_mb=budget)
    assert rep.exact.kept_mb <= budget
    assert rep.exact.kept_mb == pytest.approx(2 * per_batch)
    # 3 cuts; at each, the 4 batches that do not fit go through the disk
    assert rep.exact.spilled_mb == pytest.approx(3 * 4 * per_batch)
    assert "through a temporary directory" in rep.notes[-1]
    for name, m in bns(in_memory).items():  # the same numbers, bit for bit
        assert torch.equal(m.running_mean, bns(spilled)[name].running_mean)
        assert torch.equal(m.running_var, bns(spilled)[name].running_var)
    assert list(tmp_root.iterdir()) == []


@pytest.mark.parametrize("name", ["residual", "branches"])
def test_spilling_everything_keeps_views_and_in_place_writes(name, batches, tmp_root) -> None:
    model = settled(name, batches)
    kept, _ = varshift.recalibrate(model, batches, exact=True, measure=False)
    spilled, rep = varshift.recalibrate(model, batches, exact=True, measure=False, cache_mb=0)
    assert rep.exact.kept_mb == 0 and rep.exact.spilled_mb > 0
    for n, m in bns(kept).items():
        assert torch.equal(m.running_var, bns(spilled)[n].running_var)
        assert torch.equal(m.running_mean, bns(spilled)[n].running_mean)
    assert list(tmp_root.iterdir()) == []


# --------------------------------------------------------------------------- clean up


def _spill_dirs(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.name.startswith("varshift-exact-")]


def _raise_on_call(model: nn.Module, leaf: str, call: int, exc, root: Path, seen: list) -> None:
    """Make ``leaf`` raise on its ``call``-th call, after checking that spilling is under way
    (so the test shows that a directory existed and was removed)."""
    count = [0]

    def hook(module, args, output):
        count[0] += 1
        if count[0] == call:
            seen.extend(_spill_dirs(root))
            exc()

    model.get_submodule(leaf).register_forward_hook(hook)


def test_no_temporary_files_after_an_exception_inside_the_model(batches, tmp_root) -> None:
    model = copy.deepcopy(settled("chain3", batches))
    seen: list = []

    def boom():
        raise RuntimeError("the model failed")

    # conv 5 runs in the second stage; its 3rd call is on batch 2, after all 6 were spilled
    _raise_on_call(model, "5", 3, boom, tmp_root, seen)
    with pytest.raises(varshift.VarshiftError, match="batch 2 of DATA.*the model failed"):
        varshift.recalibrate(model, batches, exact=True, measure=False, cache_mb=0, inplace=True)
    assert seen and not seen[0].exists()
    assert list(tmp_root.iterdir()) == []


def test_no_temporary_files_after_ctrl_c(batches, tmp_root) -> None:
    model = copy.deepcopy(settled("chain3", batches))
    seen: list = []
    # A real SIGINT, delivered by Python's handler as KeyboardInterrupt mid-run.
    _raise_on_call(model, "8", 2, lambda: signal.raise_signal(signal.SIGINT), tmp_root, seen)
    with pytest.raises(KeyboardInterrupt):
        varshift.recalibrate(model, batches, exact=True, measure=False, cache_mb=0, inplace=True)
    assert seen and not seen[0].exists()
    assert list(tmp_root.iterdir()) == []


def test_no_temporary_files_after_bad_input(batches, tmp_root) -> None:
    model = settled("chain3", batches)
    bad = [*batches[:3], (torch.randn(16, 5, 8, 8), None), *batches[3:]]
    with pytest.raises(varshift.VarshiftError, match="batch 3 of DATA does not fit the model"):
        varshift.recalibrate(model, bad, exact=True, measure=False, cache_mb=0)
    assert list(tmp_root.iterdir()) == []


def test_no_temporary_files_after_success(batches, tmp_root) -> None:
    model = settled("residual", batches)
    _, rep = varshift.recalibrate(model, batches, exact=True, cache_mb=0.01)
    assert rep.exact.spilled_mb > 0
    assert list(tmp_root.iterdir()) == []


# --------------------------------------------------------------------------- the CLI


def test_cli_cache_mb(cli, tmp_path: Path, tmp_root: Path, batches) -> None:
    import json

    model_path, data_path = tmp_path / "model.pt", tmp_path / "data.pt"
    torch.save(settled("chain3", batches), model_path)
    torch.save(torch.cat([x for x, _ in batches]), data_path)
    outs = {}
    for budget in ("0", "100"):
        out = tmp_path / f"fixed{budget}.pt"
        result = cli("recalibrate", model_path, "--data", data_path, "--batch-size", 16,
                     "--exact", "--cache-mb", budget, "--output", out, "--format", "json")
        assert result.code == 0, result.err
        doc = json.loads(result.out)
        assert doc["exact"]["path"] == "frontier" and doc["passes"] == 1
        assert (doc["exact"]["spilled_mb"] > 0) == (budget == "0")
        outs[budget] = torch.load(out, weights_only=False)
    for name, m in bns(outs["0"]).items():
        assert torch.equal(m.running_var, bns(outs["100"])[name].running_var)
    assert list(tmp_root.iterdir()) == []
    result = cli("recalibrate", model_path, "--data", data_path, "--exact", "--cache-mb", "-5",
                 "--output", tmp_path / "x.pt")
    assert result.code == 2 and len(result.err.splitlines()) == 1
    assert result.err.startswith("varshift: error: --cache-mb must be a number")
    assert not (tmp_path / "x.pt").exists()


def test_a_norm_that_never_runs_is_left_alone(batches) -> None:
    """With --all-norms, a BatchNorm the forward never calls is a target with no input: both
    paths leave it as it was."""
    torch.manual_seed(0)
    model = FM.settle(FM.Branches(p=0.5), batches)
    model.spare = nn.BatchNorm2d(8)  # registered, never called
    spare = stats(model)["spare"]
    for path in ("frontier", "levels"):
        fixed, rep = varshift.recalibrate(model, batches, exact=True, all_norms=True,
                                          measure=False, exact_path=path)
        assert rep.exact.path == path
        assert all(torch.equal(a, b) for a, b in zip(stats(fixed)["spare"], spare))
        assert not torch.equal(bns(fixed)["bn_c"].running_var, bns(model)["bn_c"].running_var)


def test_a_norm_that_does_not_fit_its_input_is_a_data_error(batches) -> None:
    """The last norm never runs on the frontier path (its statistics are all it needs), yet
    a norm whose input has the wrong channel count fails as a forward pass would."""
    torch.manual_seed(0)
    model = FM.settle(FM.chain3(p=0.5), batches)
    model[9] = nn.BatchNorm2d(5)
    for path in ("frontier", "levels"):
        with pytest.raises(varshift.VarshiftError, match="DATA does not fit the model"):
            varshift.recalibrate(model, batches, exact=True, measure=False, all_norms=True,
                                 exact_path=path)


def test_cli_swap_exact_passes_the_budget_on(cli, tmp_path: Path, tmp_root: Path,
                                             batches) -> None:
    import json

    model_path, data_path = tmp_path / "model.pt", tmp_path / "data.pt"
    torch.save(settled("chain3", batches), model_path)
    torch.save(torch.cat([x for x, _ in batches]), data_path)
    result = cli("swap", model_path, "--data", data_path, "--batch-size", 16, "--exact",
                 "--cache-mb", "0", "--output", tmp_path / "swapped.pt", "--format", "json")
    assert result.code == 0, result.err
    doc = json.loads(result.out)["recalibration"]
    assert doc["exact"]["path"] == "frontier" and doc["exact"]["cache_mb"] == 0
    assert doc["exact"]["spilled_mb"] > 0 and doc["passes"] == 1
    assert list(tmp_root.iterdir()) == []
