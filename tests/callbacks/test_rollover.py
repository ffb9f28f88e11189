"""Probe values and batch mode share one writer across many shard rollovers: every record at every
expected step, exact (the first probe after a rollover used to fail with KeyError('values'))."""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from actpat.callbacks import ActivationPatternCallback
from actpat.recorder import open_run
from actpat.recorder.recorder import ActivationRecorder


class _Net(pl.LightningModule):
    def __init__(self, taps: dict):
        super().__init__()
        self.fc, self.act, self.head = nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)
        self.act.register_forward_pre_hook(lambda module, args: _tap(taps, args[0]))

    def forward(self, x):
        return self.head(self.act(self.fc(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _tap(taps: dict, z: torch.Tensor) -> None:
    """The test's own record of every pre-activation: probes run without grad, training with it."""
    split = "train" if torch.is_grad_enabled() else "probe"
    taps.setdefault((split, taps["trainer"].global_step), []).append(z.detach().clone())


def test_probe_values_and_batches_survive_every_rollover(tmp_path, monkeypatch):
    # Shards of about 1 KB: a rollover every few records, between and inside probes.
    monkeypatch.setitem(ActivationRecorder.__init__.__kwdefaults__, "max_shard_bytes", 1000)
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 6), torch.randint(0, 3, (64,)))
    probe = TensorDataset(torch.randn(20, 6), torch.randint(0, 3, (20,)))
    taps: dict = {}
    cb = ActivationPatternCallback(
        tmp_path / "run", batch_every_n_steps=1, probe=probe, probe_every=1, probe_batch_size=8,
        probe_values="all", live_stats=False, on_error="raise",
    )  # fmt: skip
    trainer = pl.Trainer(max_epochs=2, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    taps["trainer"] = trainer
    trainer.fit(_Net(taps), DataLoader(data, batch_size=16, shuffle=True))

    run = open_run(tmp_path / "run")
    assert len(run.shards) >= 6 and not run.losses, run.shards
    assert run.steps("act", "train").tolist() == list(range(8))
    assert run.steps("act", "probe").tolist() == list(range(9))
    assert run.site_info("act")["value_units"] == tuple(range(12))
    for (split, step), parts in ((k, v) for k, v in taps.items() if k != "trainer"):
        z = torch.cat(parts)
        got = run.read("act", step, split)
        on = np.unpackbits(got.bits, axis=1, count=12, bitorder="little").astype(bool)
        np.testing.assert_array_equal(on, (z > 0).numpy(), err_msg=f"{split} step {step}")
        if split == "probe":
            np.testing.assert_array_equal(got.sample_ids, np.arange(20))
            np.testing.assert_array_equal(got.values, z.to(torch.float16).numpy())
        else:
            assert got.values is None
