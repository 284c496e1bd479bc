"""varshift.swap and varshift.Uout: structure changes, numbers do not (at inference)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.fx
import torch.nn as nn

import varshift
from conftest import REPO
from fixtures import fix_models as FM
from fixtures import models as M
from varshift.errors import VarshiftError
from varshift.loading import load_model

SAMPLES = REPO / "sample_models"
DROPOUT_BN = SAMPLES / "digits_dropout_bn.pt"
FUNCTIONAL_CKPT = SAMPLES / "digits_functional_ckpt.pt"
FUNCTIONAL_ARCH = SAMPLES / "digits_functional.py"
CALIB = SAMPLES / "digits_calib.pt"
TEST = SAMPLES / "digits_test.pt"


def need(*paths: Path) -> None:
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        pytest.fail(f"committed sample model missing (git checkout sample_models/, or python sample_models/make_models.py): {', '.join(missing)}")


def uouts(model: nn.Module) -> dict[str, varshift.Uout]:
    return {n: m for n, m in model.named_modules() if isinstance(m, varshift.Uout)}


def dropouts(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)}


@torch.no_grad()
def eval_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was = model.training
    try:
        return model.eval()(x)
    finally:
        model.train(was)


@pytest.fixture(scope="module")
def batches():
    return FM.data(n_batches=4, batch=16)


# --------------------------------------------------------------------------- module swaps


def test_module_dropout_becomes_uout_and_outputs_do_not_change(batches) -> None:
    torch.manual_seed(0)
    model = FM.settle(FM.chain3(p=0.5), batches)
    before = copy.deepcopy(model.state_dict())
    swapped, rep = varshift.swap(model, beta=0.2)
    assert isinstance(swapped[1], varshift.Uout) and swapped[1].beta == 0.2
    assert isinstance(model[1], nn.Dropout)  # the input is a copy's source, untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert [(e.name, e.swapped, e.replaced_with) for e in rep.entries] == [
        ("1", True, "Uout(beta=0.2)")]
    assert rep and not rep.graph_module and rep.beta == 0.2
    x = torch.cat([b[0] for b in batches])
    assert torch.equal(eval_out(swapped, x), eval_out(model, x))


def test_inplace_swap_changes_the_model(batches) -> None:
    torch.manual_seed(0)
    model = FM.chain3()
    swapped, _ = varshift.swap(model, inplace=True)
    assert swapped is model and isinstance(model[1], varshift.Uout)


def test_dropout_after_the_last_norm_is_not_swapped(batches) -> None:
    torch.manual_seed(0)
    model = FM.settle(FM.clean(), batches)
    swapped, rep = varshift.swap(model)
    assert rep.entries == [] and not uouts(swapped)
    assert list(dropouts(swapped)) == ["8"]
    assert "nothing to swap" in rep.verdict


def test_training_flags_and_state_untouched(batches) -> None:
    torch.manual_seed(0)
    model = FM.settle(FM.Branches(), batches).train()
    flags = [(n, m.training) for n, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    swapped, rep = varshift.swap(model)
    assert [(n, m.training) for n, m in model.named_modules()] == flags
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert isinstance(model.drop, nn.Dropout) and isinstance(swapped.drop, varshift.Uout)
    assert swapped.training  # the copy keeps the input's mode


# --------------------------------------------------------------------------- functional


def test_functional_dropout_is_rewritten_in_a_graph_module(batches) -> None:
    torch.manual_seed(0)
    model = FM.settle(FM.FunctionalDropout(p=0.3), batches)
    swapped, rep = varshift.swap(model, beta=0.1)
    assert isinstance(swapped, torch.fx.GraphModule) and rep.graph_module
    assert [(e.name, e.swapped) for e in rep.entries] == [(":dropout", True)]
    assert len(uouts(swapped)) == 1
    # The dropout after the last BatchNorm is not swapped; it stays a dropout that still
    # acts when the model is fine-tuned.
    assert [type(m) for m in dropouts(swapped).values()] == [nn.Dropout]
    assert next(iter(dropouts(swapped).values())).p == 0.3
    x = torch.cat([b[0] for b in batches])
    assert torch.equal(eval_out(swapped, x), eval_out(model, x))
    assert any("GraphModule" in n for n in rep.notes)


def test_calls_only_made_in_training_do_not_shift_the_names(batches) -> None:
    """scan names the training-mode calls; the rewrite works on the eval-mode graph, which
    lacks the training-only call. Each eval call must keep its own name: the p=0.2 dropout is
    swapped, the training-only one is reported as absent, the one after the last BatchNorm
    stays a dropout."""
    torch.manual_seed(0)
    model = FM.settle(FM.TrainingOnlyDropout(), batches)
    scan = {r.name: r for r in varshift.scan(model).regularizers}
    assert (scan[":dropout"].p, scan[":dropout_1"].p, scan[":dropout_2"].reaches) == (0.5, 0.2, [])
    swapped, rep = varshift.swap(model)
    assert [(e.name, e.p, e.swapped) for e in rep.entries] == [
        (":dropout", 0.5, False), (":dropout_1", 0.2, True)]
    assert "not called in eval mode" in rep.entries[0].reason
    (uout_name, _), = uouts(swapped).items()
    feeds = {str(n.target): n.args[0] for n in swapped.graph.nodes if n.op == "call_module"}
    assert feeds[uout_name].target == "bn"  # the Uout sits where the p=0.2 dropout was
    assert [m.p for m in dropouts(swapped).values()] == [0.4]
    x = torch.cat([b[0] for b in batches])
    assert torch.equal(eval_out(swapped, x), eval_out(model, x))


def sample_arch_args() -> dict:
    """The sample checkpoint's own ``config`` (its build arguments), as a user would pass it."""
    config = torch.load(FUNCTIONAL_CKPT).get("config", {})
    return {k: v for k, v in config.items() if k in ("drop_rate", "width", "hidden", "num_classes")}


def test_functional_sample_model() -> None:
    need(FUNCTIONAL_CKPT, FUNCTIONAL_ARCH, TEST)
    loaded = load_model(FUNCTIONAL_CKPT, arch=f"{FUNCTIONAL_ARCH}:build",
                        arch_args=sample_arch_args())
    swapped, rep = varshift.swap(loaded.module)
    assert isinstance(swapped, torch.fx.GraphModule)
    # Every functional dropout before a BatchNorm is swapped (":dropout" feeds bn2 directly);
    # the one after the last BatchNorm stays a dropout.
    assert rep.swapped and ":dropout" in [e.name for e in rep.swapped] and not rep.skipped
    assert len(uouts(swapped)) == len(rep.swapped)
    assert [type(m) for m in dropouts(swapped).values()] == [nn.Dropout]
    x = torch.load(TEST)["inputs"][:128]
    assert torch.equal(eval_out(swapped, x), eval_out(loaded.module, x))


def test_untraceable_functional_dropout_is_listed_as_skipped() -> None:
    model = FM.UntraceableFunctional()
    x = torch.randn(2, *FM.SHAPE)
    swapped, rep = varshift.swap(model, example_input=x)
    assert [(e.name, e.swapped) for e in rep.entries] == [(":dropout", False)]
    assert rep.skipped and "torch.fx cannot trace" in rep.skipped[0].reason
    assert not rep  # not everything was swapped
    assert "could not be swapped" in rep.verdict
    assert not uouts(swapped)
    with pytest.raises(VarshiftError, match="`input_shape`"):
        varshift.swap(model)  # no example input: cannot even find it


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.1, math.nan])
def test_swap_rejects_bad_beta(beta) -> None:
    with pytest.raises(VarshiftError, match="beta"):
        varshift.swap(FM.chain3(), beta=beta)


def test_swap_rejects_unknown_target() -> None:
    with pytest.raises(VarshiftError, match="uout"):
        varshift.swap(FM.chain3(), to="dropblock")


# --------------------------------------------------------------------------- saving


def test_swapped_module_loads_with_the_safe_loader(tmp_path: Path, batches) -> None:
    torch.manual_seed(0)
    swapped, _ = varshift.swap(FM.settle(FM.chain3(), batches), beta=0.3)
    path = tmp_path / "swapped.pt"
    torch.save(swapped, path)
    loaded = load_model(path)  # no trust: Uout is on the allow-list
    assert loaded.form == "module" and not loaded.trusted
    assert isinstance(loaded.module[1], varshift.Uout) and loaded.module[1].beta == 0.3
    x = batches[0][0]
    assert torch.equal(eval_out(loaded.module, x), eval_out(swapped, x))


def test_cli_swap_writes_a_safe_whole_module(cli, tmp_path: Path) -> None:
    need(DROPOUT_BN, TEST)
    out = tmp_path / "swapped.pt"
    result = cli("swap", DROPOUT_BN, "--output", out, "--beta", "0.2", "--format", "json")
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    assert doc["schema"] == "varshift.swap/1" and doc["output"] == str(out)
    assert [(e["name"], e["replaced_with"]) for e in doc["swapped"]] == [("4", "Uout(beta=0.2)")]
    assert doc["skipped"] == [] and doc["recalibration"] is None
    loaded = load_model(out)
    assert isinstance(loaded.module[4], varshift.Uout)
    original = load_model(DROPOUT_BN).module
    x = torch.load(TEST)["inputs"][:128]
    assert torch.equal(eval_out(loaded.module, x), eval_out(original, x))


def test_cli_swap_with_data_also_recalibrates(cli, tmp_path: Path) -> None:
    need(DROPOUT_BN, CALIB)
    out = tmp_path / "swapped.pt"
    result = cli("swap", DROPOUT_BN, "--output", out, "--data", CALIB, "--max-batches", "2",
                 "--format", "json")
    assert result.code == 0, result.err
    rec = json.loads(result.out)["recalibration"]
    assert rec is not None and rec["schema"] == "varshift.recalibrate/1"
    assert [l["name"] for l in rec["layers"] if l["recalibrated"]] == ["5", "9"]
    assert rec["batches"] == 2
    saved = load_model(out).module
    assert isinstance(saved[4], varshift.Uout)
    assert saved[5].num_batches_tracked.item() == 2
    original = load_model(DROPOUT_BN).module
    assert not torch.equal(saved[5].running_var, original[5].running_var)
    # The population estimator's statistics, computed here: regularizers off (Uout is the
    # identity in eval mode), norms on batch statistics, inputs of 5 and 9 over both batches.
    x = torch.load(CALIB, weights_only=True)[0][:128]
    model = load_model(DROPOUT_BN).module.eval()
    seen: dict = {5: [], 9: []}
    for i in seen:
        model[i].register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].double()))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.train()
    with torch.no_grad():
        for batch in x.split(64):
            model(batch)
    for i in (5, 9):
        flat = torch.cat(seen[i]).transpose(0, 1).flatten(1)
        torch.testing.assert_close(saved[i].running_var.double(), flat.var(dim=1), rtol=1e-4, atol=0)
        torch.testing.assert_close(saved[i].running_mean.double(), flat.mean(dim=1), rtol=1e-4,
                                   atol=1e-6)


ARCH_FILE = """
import torch.nn as nn


class Net(nn.Module):
    def __init__(self, p=0.3):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.drop = nn.Dropout(p)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.bn(self.drop(self.fc1(x))))


def build(p=0.3):
    return Net(p)
"""


def test_swapped_checkpoint_model_reloads_with_its_arch(tmp_path: Path) -> None:
    """A checkpoint cannot carry Uout, so swap writes a whole module of the --arch class; a
    fresh process loads it again with --trust and the same --arch (the class's module)."""
    from conftest import run_module

    (tmp_path / "mynet.py").write_text(ARCH_FILE)
    torch.manual_seed(0)
    ckpt, out = tmp_path / "ckpt.pt", tmp_path / "swapped.pt"
    torch.save({"epoch": 3, "state_dict": _mynet_state(tmp_path)}, ckpt)
    arch = f"{tmp_path / 'mynet.py'}:build"
    swapped = run_module("swap", ckpt, "--arch", arch, "--output", out, "--format", "json",
                         cwd=tmp_path)
    assert swapped.code == 0, swapped.err
    assert any("--trust" in n for n in json.loads(swapped.out)["notes"])
    refused = run_module("scan", out, cwd=tmp_path)
    assert refused.code == 2 and "mynet.Net" in refused.err
    scanned = run_module("scan", out, "--trust", "--arch", arch, "--format", "json", cwd=tmp_path)
    assert scanned.code == 0, scanned.err
    regs = json.loads(scanned.out)["regularizers"]
    assert [(r["name"], r["type"], r["p"]) for r in regs] == [("drop", "Uout", 0.1)]
    notes = json.loads(scanned.out)["notes"]  # --arch was needed (its class is in the pickle)
    assert any("used only to import its classes" in n for n in notes), notes
    assert not any("not needed" in n for n in notes), notes


def _mynet_state(folder: Path) -> dict:
    """The state dict of mynet.build() (trained stats do not matter here)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_mynet_for_state", folder / "mynet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build().state_dict()


# --------------------------------------------------------------------------- Uout


def test_uout_is_the_identity_in_eval() -> None:
    x = torch.randn(64, 8)
    u = varshift.Uout(0.5).eval()
    assert torch.equal(u(x), x)
    assert torch.equal(varshift.Uout(0.0).train()(x), x)


def test_uout_variance_factor() -> None:
    """Zero-mean input: Var(x (1 + r)) = Var(x) (1 + beta^2/3) for r ~ U(-beta, beta).

    On the same x, the ratio of second moments sum x^2 (1+r)^2 / sum x^2 is a weighted mean of
    (1+r)^2, whose variance is 4 Var(r) + Var(r^2) = 4 b^2/3 + 4 b^4/45 (0.339 for b = 0.5);
    with N = 2^20 standard normals its standard error is sqrt(0.339 * E[x^4] / N) ~ 1e-3.
    The tolerance 5e-3 is five standard errors; the effect tested (0.083) is 80 of them.
    """
    beta, n = 0.5, 2**20
    torch.manual_seed(0)
    x = torch.randn(n, dtype=torch.float64)
    y = varshift.Uout(beta).train()(x)
    ratio = (y.square().sum() / x.square().sum()).item()
    assert ratio == pytest.approx(1 + beta**2 / 3, abs=5e-3)
    assert ((y - x).abs() <= beta * x.abs() + 1e-12).all()  # |r| <= beta


def test_uout_noise_has_zero_mean() -> None:
    """On a constant input c, y - x = c r: mean 0, standard error c beta / sqrt(3 N)
    (5.6e-4 for c = 2, beta = 0.5, N = 2^20); tolerance 3e-3, about five of them. A
    one-sided noise such as U(0, beta) would be off by c beta / 2 = 0.5."""
    beta, n, c = 0.5, 2**20, 2.0
    torch.manual_seed(1)
    x = torch.full((n,), c, dtype=torch.float64)
    y = varshift.Uout(beta).train()(x)
    assert (y - x).mean().item() == pytest.approx(0.0, abs=3e-3)
    assert (y - x).std().item() == pytest.approx(c * beta / math.sqrt(3), rel=1e-2)


@pytest.mark.parametrize("beta", [-1, -0.01, math.nan])
def test_uout_rejects_negative_beta(beta) -> None:
    with pytest.raises(ValueError, match="beta"):
        varshift.Uout(beta=beta)


def test_dropout_inside_torch_layers() -> None:
    """A TransformerEncoderLayer's dropout submodules are swapped; MultiheadAttention's
    dropout is an argument, not a module: listed as skipped, with what to do."""

    torch.manual_seed(0)
    model, x = M.TransformerThenBN().eval(), torch.randn(3, 5, 16)
    swapped, rep = varshift.swap(model)
    assert {e.name for e in rep.swapped} == {"enc.dropout", "enc.dropout1", "enc.dropout2"}
    assert [(e.name, "argument" in e.reason) for e in rep.skipped] == [("enc.self_attn:dropout", True)]
    assert all(isinstance(getattr(swapped.enc, n), varshift.Uout)
               for n in ("dropout", "dropout1", "dropout2"))
    assert torch.equal(swapped.eval()(x), model(x))
    assert not rep
