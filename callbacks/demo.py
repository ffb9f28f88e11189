"""A small instrumented training: a CNN on scikit-learn's digits with probe recording (``actpat demo``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from actpat.callbacks.patterns import ActivationPatternCallback


class DemoResult(NamedTuple):
    """Where :func:`run_demo` wrote: ``run_dir`` (shards) and ``logs_dir`` (TensorBoard, metrics)."""

    run_dir: Path
    logs_dir: Path


class DigitsCNN(pl.LightningModule):
    """Two 3x3 conv layers (BatchNorm, ReLU) and a dense ReLU layer on 8x8 digits, 10 classes."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def digits_dataset() -> TensorDataset:
    """scikit-learn's 1797 8x8 digits, scaled to [0, 1], as ``(N, 1, 8, 8)`` float and int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return TensorDataset(x, torch.tensor(digits.target, dtype=torch.int64))


def run_demo(
    out_dir: str | os.PathLike, *, epochs: int = 5, fast: bool = False, seed: int = 0, progress: bool = False
) -> DemoResult:
    """Train :class:`DigitsCNN` on the digits with probe recording every 0.2 epoch.

    Parameters
    ----------
    out_dir : path
        TensorBoard logs go to ``out_dir/logs/version_*``, shards next to them in ``activation_patterns``.
    epochs : int, default 5
    fast : bool, default False
        One epoch of 10 batches and a 128-sample probe, for smoke tests (a few seconds).
    seed : int, default 0
    progress : bool, default False
        Show Lightning's progress bar.

    Returns
    -------
    DemoResult
        ``(run_dir, logs_dir)``: the shard directory (``open_run(run_dir)``) and the TensorBoard log dir.
    """
    pl.seed_everything(seed, verbose=False)
    data = digits_dataset()
    probe = Subset(data, range(128 if fast else 512))  # a fixed subset of the training set, no augmentation
    callback = ActivationPatternCallback(probe=probe, probe_every=0.2, probe_mode="train")
    trainer = pl.Trainer(
        max_epochs=1 if fast else epochs,
        limit_train_batches=10 if fast else 1.0,
        logger=TensorBoardLogger(Path(out_dir), name="logs"),
        callbacks=[callback],
        accelerator="cpu",
        devices=1,
        enable_progress_bar=progress,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=5,
    )
    trainer.fit(DigitsCNN(), DataLoader(data, batch_size=64, shuffle=True))
    return DemoResult(run_dir=Path(callback.run_dir), logs_dir=Path(trainer.log_dir))


__all__ = ["DemoResult", "DigitsCNN", "run_demo"]
