"""Modules varshift inserts take the mode of what they replace; fixes keep every flag.

A fresh ``nn.Module`` is in training mode. A ``Uout`` put into an eval-mode model that kept
that default would add noise at inference until the user happened to call ``.eval()``. These
tests run the swapped model *without* calling ``.eval()`` or ``.train()`` on it.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

import varshift
from fixtures import fix_models as FM
from fixtures import models as M
from varshift.loading import load_model


def issue_model() -> nn.Sequential:
    """Two module dropouts, each right before a BatchNorm1d."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.Dropout(0.5), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 16), nn.Dropout(0.3), nn.BatchNorm1d(16), nn.Linear(16, 3),
    )


class FunctionalMLP(nn.Module):
    """The same shape with ``F.dropout(x, p, self.training)`` in a nested block's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.bn1 = nn.BatchNorm1d(16)
        self.block = _DropBlock(0.3)
        self.bn2 = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = F.dropout(self.fc1(x), 0.5, self.training)
        x = self.block(torch.relu(self.bn1(x)))
        return self.head(self.bn2(x))


class _DropBlock(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.p = p

    def forward(self, x):
        return F.dropout(self.fc(x), self.p, self.training)


def inputs(n: int = 64, features: int = 6) -> torch.Tensor:
    return torch.randn(n, features, generator=torch.Generator().manual_seed(3)) + 0.5


def settled(model: nn.Module) -> nn.Module:
    """Running statistics as training leaves them (dropout on), then eval mode."""
    torch.manual_seed(1)
    with torch.no_grad():
        model.train()
        for _ in range(5):
            model(inputs())
    return model.eval()


def flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def uouts(model: nn.Module) -> list[varshift.Uout]:
    return [m for m in model.modules() if isinstance(m, varshift.Uout)]


@pytest.mark.parametrize("build", [issue_model, FunctionalMLP], ids=["module", "functional"])
def test_swapped_eval_model_is_identical_at_inference(build) -> None:
    model = settled(build())
    x = inputs()
    with torch.no_grad():
        expected = model(x)
    swapped, rep = varshift.swap(model, beta=0.3)
    assert sum(e.swapped for e in rep.entries) == 2
    assert len(uouts(swapped)) == 2
    assert not any(flags(swapped).values()), flags(swapped)
    torch.manual_seed(123)  # Uout would draw from here if it were (wrongly) active
    with torch.no_grad():
        got = swapped(x)  # no .eval(): the model was in eval mode when it was swapped
    assert torch.equal(got, expected)


@pytest.mark.parametrize("build", [issue_model, FunctionalMLP], ids=["module", "functional"])
def test_swapped_train_model_stays_in_training_mode(build) -> None:
    model = settled(build()).train()
    swapped, _ = varshift.swap(model, beta=0.3)
    assert all(flags(swapped).values()), flags(swapped)
    assert all(u.training for u in uouts(swapped))
    # Uout acts in training: two calls on the same input differ.
    x = inputs()
    with torch.no_grad():
        assert not torch.equal(swapped(x), swapped(x))


def test_uout_takes_the_mode_of_the_module_it_replaces() -> None:
    """Mixed modes: a model in training with one dropout frozen in eval mode."""
    model = settled(issue_model()).train()
    model[5].eval()
    swapped, _ = varshift.swap(model)
    assert isinstance(swapped[1], varshift.Uout) and swapped[1].training
    assert isinstance(swapped[5], varshift.Uout) and not swapped[5].training
    assert flags(model) == {**flags(swapped)}  # same names, same flags


def test_functional_uout_takes_the_mode_of_the_calling_module() -> None:
    model = settled(FunctionalMLP()).train()
    model.block.eval()  # the block's own F.dropout(..., self.training) is off
    swapped, _ = varshift.swap(model)
    assert isinstance(swapped, torch.fx.GraphModule)
    by_mode = sorted(u.training for u in uouts(swapped))
    assert by_mode == [False, True]
    assert swapped.training and swapped.fc1.training and not swapped.block.fc.training


@pytest.mark.parametrize("build", [issue_model, FunctionalMLP], ids=["module", "functional"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_cli_swap_file_keeps_the_modes(cli, tmp_path, build, mode) -> None:
    """The file `varshift swap` writes loads back with the input's modes; an eval-mode input
    gives the same outputs without `.eval()`. (The functional model becomes a GraphModule,
    and its class lives in this test file: both need --trust.)"""
    model = settled(build()).train(mode == "train")
    src, out = tmp_path / "model.pt", tmp_path / "swapped.pt"
    torch.save(model, src)
    trust = ["--trust"] if build is FunctionalMLP else []
    result = cli("swap", src, "--output", out, "--beta", "0.3", "--quiet", *trust)
    assert result.code == 0, result.err
    loaded = load_model(out, trust=bool(trust)).module
    assert isinstance(loaded, torch.fx.GraphModule) == (build is FunctionalMLP)
    assert len(uouts(loaded)) == 2
    assert set(flags(loaded).values()) == {mode == "train"}
    if mode == "eval":
        x = inputs()
        torch.manual_seed(5)
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))


# --------------------------------------------------------------------------- every fixture


def _fixtures() -> list:
    """(id, build, input) for every fixture model that runs on a plain tensor."""
    image = M.example()
    cases = [
        ("issue_model", issue_model, inputs()),
        ("FunctionalMLP", FunctionalMLP, inputs()),
        ("TransformerThenBN", M.TransformerThenBN,
         torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(0))),
    ]
    cases.append(("AlphaDropoutBN", M.AlphaDropoutBN, inputs(8, 16)))
    for name in ("ModuleDropoutBN", "FunctionalDropoutBN", "Dropout2dBN", "DropPathResidual", "DropBlockBN", "ResidualAdd", "ConcatBN", "SharedDropout",
                 "SharedNorm", "InactiveDropout", "DropoutHead", "SubclassBN",
                 "AlwaysOnDropout", "UoutBN"):
        cases.append((name, getattr(M, name), image))
    for name in ("plain_dropout_bn", "plain_warning", "plain_clean"):
        cases.append((name, getattr(M, name), image))
    for name in ("chain3", "clean", "Branches", "FunctionalDropout", "TrainingOnlyDropout"):
        cases.append((f"fix.{name}", getattr(FM, name), FM.data(1, 8)[0][0]))
    return cases


def _mode_params():
    for case_id, build, x in _fixtures():
        for mode in ("eval", "train"):
            yield pytest.param(build, x, mode, id=f"{case_id}-{mode}")


def _check_flags_follow_parents(model: nn.Module, mode: bool) -> None:
    assert model.training is mode
    for name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            assert child.training == parent.training, (
                f"{name}.{child_name}: training={child.training} under a parent with "
                f"training={parent.training}"
            )


@pytest.mark.parametrize("build,x,mode", list(_mode_params()))
def test_every_fixture_keeps_uniform_modes_after_swap_and_recalibrate(build, x, mode) -> None:
    torch.manual_seed(0)
    model = build()
    with torch.no_grad():
        model.eval()(x)  # materialize nothing lazy; just check it runs on x
    model.train(mode == "train")
    before = flags(model)

    swapped, _ = varshift.swap(model)
    _check_flags_follow_parents(swapped, mode == "train")
    fixed, _ = varshift.recalibrate(model, [x, x])
    _check_flags_follow_parents(fixed, mode == "train")
    assert flags(fixed) == before
    assert flags(model) == before  # the input's flags are untouched
