"""A tiny model, data and independent truth shared by the tests of the prober, callback and replay.

The network has what a probe must not disturb: Conv + BatchNorm + ReLU, Dropout, a dense ReLU. The
truth never calls the library: the tests' own hooks, packed with ``np.packbits``. Tests load this file
by its path.
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import TensorDataset


def body() -> nn.Sequential:
    """Sites ``2`` (conv, 4 channels on 4x4) and ``6`` (dense, 10 units); Dropout at index 4."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Dropout(0.3), nn.Linear(64, 10), nn.ReLU(), nn.Linear(10, 3),
    )


class Net(nn.Module):
    """:func:`body` as a plain module (sites ``net.2``, ``net.6``)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = body()

    def forward(self, x):
        return self.net(x)


class ToyNet(pl.LightningModule):
    """:func:`body` as a LightningModule trained with SGD (sites ``net.2``, ``net.6``)."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        self.net = body()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def toy_data(n: int = 64, seed: int = 0) -> TensorDataset:
    """``n`` random 1x4x4 inputs and labels in {0, 1, 2}."""
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def relu_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The test's own hooks: the input of every nn.ReLU of one forward of ``model``, by module path."""
    seen, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.ReLU):
            handles.append(module.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0].clone())))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def channel_bits(z: torch.Tensor) -> np.ndarray:
    """Channel patterns of ``z``, packed little-endian by numpy."""
    on = (z > 0).cpu().numpy()
    if on.ndim > 2:
        on = np.moveaxis(on, 1, -1).reshape(-1, on.shape[1])
    return np.packbits(on, axis=1, bitorder="little")
