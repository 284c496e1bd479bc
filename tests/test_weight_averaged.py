"""SWA / EMA checkpoints: AveragedModel (``module.`` keys + ``n_averaged``) and a timm-style
EMA wrapper (``module.`` keys) load with --arch, recalibrate, and are written back in their
own layout. And the caller's global RNG state, with a shuffling DataLoader."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from fixtures import probe_models as P

ARCH = '''
import sys
sys.path.insert(0, {tests!r})
from fixtures.probe_models import dropout_bn_net

def build():
    return dropout_bn_net()
'''


class EmaLike(nn.Module):
    """What timm's ModelEmaV2/V3 save: the averaged copy under ``module``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(model)


def averaged(kind: str) -> nn.Module:
    model = P.trained_net(seed=3)
    if kind == "swa":
        avg = AveragedModel(model)
    elif kind == "ema":
        avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    else:
        return EmaLike(model)
    for seed in range(3):  # a few "epochs": perturbed weights averaged in
        other = P.trained_net(seed=seed)
        avg.update_parameters(other)
    return avg


@pytest.mark.parametrize("kind", ["swa", "ema", "timm-ema"])
def test_weight_averaged_checkpoint_round_trip(tmp_path, cli, kind):
    import pathlib

    avg = averaged(kind)
    state = avg.state_dict()
    torch.save(state, tmp_path / "avg.pt")
    (tmp_path / "arch.py").write_text(ARCH.format(tests=str(pathlib.Path(__file__).parent)))
    torch.save(P.images(64, seed=4), tmp_path / "x.pt")
    r = cli("recalibrate", tmp_path / "avg.pt", "--arch", f"{tmp_path / 'arch.py'}:build",
            "--data", tmp_path / "x.pt", "--all-norms", "--exact", "-o", tmp_path / "out.pt",
            "--format", "json")
    assert r.code == 0, r.err
    out = torch.load(tmp_path / "out.pt")
    assert list(out) == list(state)  # same keys, same order, n_averaged kept
    if kind != "timm-ema":
        assert torch.equal(out["n_averaged"], state["n_averaged"])
        import json

        assert any("n_averaged=3" in n for n in json.loads(r.out)["notes"])
    changed = {k for k in state if not torch.equal(out[k], state[k])}
    assert changed and all(k.startswith("module.") and "running" in k or
                           k.endswith("num_batches_tracked") for k in changed)
    # loads back into the wrapper, and every BatchNorm now holds the population statistics
    restored = copy.deepcopy(avg)
    restored.load_state_dict(out)
    rep = __import__("varshift").probe(restored.module, [P.images(64, seed=4)])
    assert all(l.shift == pytest.approx(1.0, abs=1e-3) for l in rep.layers)


# --------------------------------------------------------------------------- RNG state (#9)


def test_global_rng_untouched_by_a_shuffling_dataloader():
    """Iterating a shuffling DataLoader draws from the global generator: probe and
    recalibrate leave its state as they found it, also for the first batch they peek."""
    from torch.utils.data import DataLoader, TensorDataset

    import varshift

    model = P.trained_net()
    loader = DataLoader(TensorDataset(P.images(48, seed=6)), batch_size=16, shuffle=True)
    torch.manual_seed(77)
    state = torch.get_rng_state()
    varshift.probe(model, loader)
    assert torch.equal(torch.get_rng_state(), state)
    varshift.recalibrate(model, loader, exact=True)
    assert torch.equal(torch.get_rng_state(), state)
    varshift.recalibrate(model, loader, measure=False)  # streamed: one pass
    assert torch.equal(torch.get_rng_state(), state)
