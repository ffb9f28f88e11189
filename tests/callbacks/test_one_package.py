"""The callback with only one of the two Lightning packages importable (the other blocked in a subprocess)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import pytest

SCRIPT = """
import sys
sys.modules[{blocked!r}] = None  # importlib.util.find_spec({blocked!r}) is None: as if not installed
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import {package} as pl
from actpat.callbacks import ActivationPatternCallback
from actpat.callbacks._lightning import CALLBACK_BASES
from actpat.recorder import open_run

class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

torch.manual_seed(0)
data = TensorDataset(torch.randn(32, 4), torch.arange(32) % 2)
cb = ActivationPatternCallback(probe=TensorDataset(torch.randn(8, 4), torch.arange(8) % 2), probe_every=2,
                               live_stats=False, out_dir={out!r})
trainer = pl.Trainer(max_steps=4, callbacks=[cb], logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)
trainer.fit(Net(), DataLoader(data, batch_size=8))
assert {blocked!r} not in {{base.__module__.split(".")[0] for base in CALLBACK_BASES}}, CALLBACK_BASES
run = open_run({out!r})
print("SITES", run.sites, "STEPS", run.steps("net.1", "probe").tolist())
"""


@pytest.mark.slow
@pytest.mark.parametrize("package, blocked", [("pytorch_lightning", "lightning"), ("lightning.pytorch", "pytorch_lightning")])
def test_the_callback_works_with_only_one_lightning_package(tmp_path, package, blocked):
    if importlib.util.find_spec(package.split(".")[0]) is None:
        pytest.skip(f"{package} is not installed")
    script = SCRIPT.format(package=package, blocked=blocked, out=str(tmp_path / "run"))
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SITES ['net.1'] STEPS [0, 2, 4]" in out.stdout, out.stdout
