"""Models and data for bench/run.py (seeded, built on the fly, nothing downloaded)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def bn_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def give_bn_stats(model: nn.Module, batches) -> None:
    """Realistic running statistics: train-mode passes (dropout on, as in training) with
    momentum=None (cumulative average), then momentum back and eval mode."""
    saved = [(m, m.momentum) for m in bn_modules(model)]
    for m, _ in saved:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for b in batches:
        model(b[0] if isinstance(b, (tuple, list)) else b)
    for m, momentum in saved:
        m.momentum = momentum
    model.eval()


def random_batches(n: int, shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def densenet(size: int, batch: int, n_batches: int, seed: int = 0):
    """torchvision densenet121(drop_rate=0.2), weights=None, with BN statistics from
    train-mode passes over the benchmark inputs. Returns (model, batches)."""
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.densenet121(weights=None, drop_rate=0.2)
    batches = random_batches(n_batches, (batch, 3, size, size), seed + 1)
    give_bn_stats(model, batches)
    return model, batches


def digits_sequential():
    """sample_models/digits_dropout_bn.pt (varshift.loading.load_model) and its calibration
    data as (inputs, labels) batches of 64."""
    from varshift.loading import load_model

    model = load_model(SAMPLES / "digits_dropout_bn.pt").module.eval()
    return model, _digits_batches()


def digits_functional():
    """sample_models/digits_functional_ckpt.pt built by digits_functional.py:build."""
    from varshift.loading import load_model

    loaded = load_model(SAMPLES / "digits_functional_ckpt.pt",
                        arch=str(SAMPLES / "digits_functional.py") + ":build",
                        arch_args={"drop_rate": 0.3})
    return loaded.module.eval(), _digits_batches()


def _digits_batches(batch: int = 64):
    x, y = torch.load(SAMPLES / "digits_calib.pt", weights_only=True)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)]


# --------------------------------------------------------------------------- memory


class MemNet(nn.Module):
    """Cheap compute, big activations (8 MB per layer at batch 32, 32x32): a per-batch leak
    of activations would add ~0.8 GB at 100 batches."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width), nn.ReLU(),
            nn.Dropout(0.3),
            nn.Conv2d(width, width, 1, bias=False),
            nn.BatchNorm2d(width), nn.ReLU(),
            nn.Dropout2d(0.2),
            nn.Conv2d(width, width, 1, bias=False),
            nn.BatchNorm2d(width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        return self.head(self.features(x))


MEM_SHAPE = (32, 3, 32, 32)


def one_shot_batches(n: int, seed: int = 0, shape=MEM_SHAPE) -> Iterator[torch.Tensor]:
    """A generator: each batch is made when asked for, so the data never grows."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield torch.randn(shape, generator=g)


class OnTheFly:
    """A re-iterable (like a DataLoader) that makes each batch on the fly, seeded: the same
    batches on every iteration, at most one alive at a time."""

    def __init__(self, n: int, seed: int = 0, shape=MEM_SHAPE) -> None:
        self.n, self.seed, self.shape = n, seed, shape

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[torch.Tensor]:
        return one_shot_batches(self.n, self.seed, self.shape)


# --------------------------------------------------------------------------- precision


class PrecisionNet(nn.Module):
    """Two BatchNorms whose inputs have channel means of 1e3..1e4 and a spread of ~1.

    ``conv1 - relu - drop1 - conv2(bias 1e3..1e4) - bn2 (BatchNorm2d) - relu - pool - fc1 -
    relu - drop2 - fc2(bias 1e3..1e4) - bn3 (BatchNorm1d) - relu - fc3``. Both BNs are reached
    by a dropout, so varshift recalibrates them by default.
    """

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.drop1 = nn.Dropout(0.2)
        self.conv2 = nn.Conv2d(16, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.pool = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(channels * 4 * 4, 64)
        self.drop2 = nn.Dropout(0.2)
        self.fc2 = nn.Linear(64, channels)
        self.bn3 = nn.BatchNorm1d(channels)
        self.fc3 = nn.Linear(channels, 10)

    def forward(self, x):
        x = self.drop1(torch.relu(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.flatten(self.pool(x), 1)
        x = self.drop2(torch.relu(self.fc1(x)))
        x = torch.relu(self.bn3(self.fc2(x)))
        return self.fc3(x)


@torch.no_grad()
def precision_net(n_batches: int = 16, batch: int = 64, seed: int = 0):
    """PrecisionNet with BN inputs of channel mean U(1e3, 1e4) and std ~1 (dropout off),
    BN statistics from train-mode passes. Returns (model, batches)."""
    torch.manual_seed(seed)
    model = PrecisionNet()
    batches = random_batches(n_batches, (batch, 3, 8, 8), seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    # Scale each layer feeding a BN so that its output has std ~1 per channel (dropout off,
    # upstream BN normalizing with batch statistics), then give it a large bias.
    for layer, bn in ((model.conv2, model.bn2), (model.fc2, model.bn3)):
        layer.bias.zero_()
        x = _bn_inputs(model, batches, bn)
        dims = [0, *range(2, x.ndim)]
        std = x.double().std(dim=dims).float()
        shape = (-1,) + (1,) * (layer.weight.ndim - 1)
        layer.weight.div_(std.view(shape))
        layer.bias.copy_(torch.empty(layer.bias.shape).uniform_(1e3, 1e4, generator=g))
    give_bn_stats(model, batches)
    return model, batches


@torch.no_grad()
def _bn_inputs(model: nn.Module, batches, bn: nn.Module) -> torch.Tensor:
    """``bn``'s inputs over ``batches`` (float32), population convention (see reference)."""
    return reference_inputs(model, batches)[bn]


@torch.no_grad()
def reference_inputs(model: nn.Module, batches) -> dict[nn.Module, torch.Tensor]:
    """Every BN's input over all batches with dropout off and the BNs normalizing with batch
    statistics (varshift's population convention), on a copy."""
    work = copy.deepcopy(model)
    mapping = dict(zip(bn_modules(work), bn_modules(model)))
    seen: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in bn_modules(model)}
    handles = [
        m.register_forward_pre_hook(lambda mod, args: seen[mapping[mod]].append(args[0].clone()))
        for m in mapping
    ]
    work.eval()
    for m in mapping:
        m.train()
    for b in batches:
        work(b)
    for h in handles:
        h.remove()
    return {m: torch.cat(xs) for m, xs in seen.items()}


def reference_stats(model: nn.Module, batches) -> dict[nn.Module, tuple]:
    """float64 population mean and unbiased variance of every BN's input (and the count)."""
    out = {}
    for m, x in reference_inputs(model, batches).items():
        x = x.double()
        dims = [0, *range(2, x.ndim)]
        var, mean = torch.var_mean(x, dim=dims, correction=1)
        out[m] = (mean, var, x.numel() // x.shape[1])
    return out
