"""The Lightning callback with a real ``lightning`` Trainer: 2 epochs on CPU, then the
before/after shifts it logged are checked against ``varshift.probe`` on the same model and
data."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

pytestmark = pytest.mark.arch
L = pytest.importorskip("lightning")

import varshift  # noqa: E402
from varshift.lightning import RecalibrateBatchNorm  # noqa: E402


class Net(L.LightningModule):
    """linear -> Dropout(0.5) -> linear -> BatchNorm1d (affected) -> relu -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(32, 32)
        self.bn = nn.BatchNorm1d(32)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.fc2(self.drop(torch.relu(self.fc1(x)))))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def loader(seed: int, n: int = 384, shuffle: bool = False):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 8, generator=g) + 2.0 * nn.functional.one_hot(y, 8).float()
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=32, shuffle=shuffle, generator=g)


class Snapshot(L.Callback):
    """Keeps a copy of the module as it is when fitting ends, before the next callback."""

    def on_fit_end(self, trainer, pl_module):
        self.model = copy.deepcopy(pl_module)


def fit(tmp_path: Path, *extra, exact: bool = False):
    torch.manual_seed(0)
    model = Net()
    snap = Snapshot()
    cb = RecalibrateBatchNorm(loader(1), exact=exact, eval_dataloader=loader(2))
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, default_root_dir=tmp_path,
        logger=L.pytorch.loggers.CSVLogger(tmp_path), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[*extra, snap, cb],
    )
    trainer.fit(model, loader(0, shuffle=True))
    return model, snap.model, cb, trainer


@pytest.mark.parametrize("exact", [False, True])
def test_callback_recalibrates_and_matches_probe(tmp_path: Path, exact: bool) -> None:
    model, before_model, cb, trainer = fit(tmp_path, exact=exact)
    report = cb.report
    assert report.estimator == ("exact" if exact else "population")
    assert [l.name for l in report.recalibrated] == ["bn"]

    probe_before = varshift.probe(before_model, loader(1))
    probe_after = varshift.probe(model, loader(1))
    (layer,) = report.layers
    assert layer.shift_before == pytest.approx(probe_before.layers[0].shift, rel=1e-6)
    assert layer.shift_after == pytest.approx(probe_after.layers[0].shift, rel=1e-6)
    assert layer.shift_before > 1.3  # Dropout(0.5) before the BN: a real shift
    assert layer.shift_after < (1.0 + 1e-4 if exact else 1.05)
    assert model.training == before_model.training  # the mode Lightning left is kept

    doc = json.loads(Path(cb.written).read_text())
    assert Path(cb.written) == Path(trainer.log_dir) / "varshift-recalibrate.json"
    assert doc["schema"] == "varshift.recalibrate/1" and doc["metrics"]["after"]["held_out"]
    assert doc["layers"][0]["shift_after"] == pytest.approx(layer.shift_after, rel=1e-5)

    with open(Path(trainer.log_dir) / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    logged = {k: float(v) for row in rows for k, v in row.items() if k.startswith("varshift/") and v}
    assert logged["varshift/bn/shift_before"] == pytest.approx(layer.shift_before, rel=1e-6)
    assert logged["varshift/bn/shift_after"] == pytest.approx(layer.shift_after, rel=1e-6)
    assert logged["varshift/max_shift_after"] == pytest.approx(layer.shift_after, rel=1e-6)
    assert "varshift/nll_after" in logged


def test_callback_runs_after_stochastic_weight_averaging(tmp_path: Path) -> None:
    """SWA's extra BatchNorm epoch runs in training mode (dropout on); the callback runs after
    SWA has put the averaged weights in the model, and fixes what that epoch recorded."""
    swa = L.pytorch.callbacks.StochasticWeightAveraging(swa_lrs=0.02, swa_epoch_start=1)
    model, before_model, cb, trainer = fit(tmp_path, swa)
    # the snapshot (taken after SWA's on_train_end) is what the callback started from
    (layer,) = cb.report.layers
    assert layer.shift_before == pytest.approx(
        varshift.probe(before_model, loader(1)).layers[0].shift, rel=1e-6)
    assert layer.shift_before > 1.3 and layer.shift_after < 1.05
    assert layer.shift_after == pytest.approx(
        varshift.probe(model, loader(1)).layers[0].shift, rel=1e-6)
