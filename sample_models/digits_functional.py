"""A small digits classifier whose dropout is functional (``F.dropout`` in ``forward``).

This file is self-contained (it imports only torch) so that varshift can build the model
from it::

    varshift scan sample_models/digits_functional_ckpt.pt \\
        --arch sample_models/digits_functional.py:build --arch-args '{"drop_rate": 0.3}'

Input: float32 images of shape (N, 1, 8, 8), pixel values scaled to [0, 1] (the raw 0..16
values of scikit-learn's ``load_digits`` divided by 16). Output: logits of shape (N, 10).

Three functional dropouts, all with rate ``drop_rate``:

- ``conv2 -> dropout -> bn2`` (the Wide-ResNet placement): reaches ``bn2`` directly and
  ``bn3`` downstream;
- ``fc1 -> dropout -> bn3``: reaches ``bn3`` (a BatchNorm1d) directly;
- ``bn3 -> relu -> dropout -> fc2``: after the last BatchNorm, harmless.

In training ``bn2`` and ``bn3`` record the variance of dropped-out activations, which
inference never sees (variance shift).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class FunctionalDigitNet(nn.Module):
    """conv-BN-ReLU, conv-dropout-BN-ReLU-pool, linear-dropout-BN1d-ReLU-dropout-linear."""

    def __init__(self, drop_rate: float = 0.3, width: int = 16, hidden: int = 64,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.drop_rate = float(drop_rate)
        self.conv1 = nn.Conv2d(1, width, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc1 = nn.Linear(2 * width * 4 * 4, hidden, bias=False)
        self.bn3 = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.conv2(x)
        x = F.dropout(x, self.drop_rate, self.training)  # upstream of bn2 (direct) and bn3
        x = F.relu(self.bn2(x))
        x = F.max_pool2d(x, 2)  # 8x8 -> 4x4
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = F.dropout(x, self.drop_rate, self.training)  # upstream of bn3 (direct)
        x = F.relu(self.bn3(x))
        x = F.dropout(x, self.drop_rate, self.training)  # after the last BN: harmless
        return self.fc2(x)


def build(drop_rate: float = 0.3, width: int = 16, hidden: int = 64,
          num_classes: int = 10) -> nn.Module:
    """Build an untrained :class:`FunctionalDigitNet` (load the checkpoint's state dict into it)."""
    return FunctionalDigitNet(drop_rate=drop_rate, width=width, hidden=hidden,
                              num_classes=num_classes)
