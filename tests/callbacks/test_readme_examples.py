"""The README's prober examples (a plain loop and Fabric), run as written, write the callback's shards.

The code is taken from the README itself (the block after each ``<!-- example: NAME -->`` marker), so
the examples cannot drift from what is tested. Each runs on the same model, data and seed as a
``Trainer.fit`` with the callback; every probe record must be equal, bit for bit.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
from torch.utils.data import DataLoader

from actpat.callbacks import ActivationPatternCallback
from actpat.recorder import open_run

README = Path(__file__).resolve().parents[2] / "README.md"
EPOCHS = 2


def example(name: str) -> str:
    """The code block that follows ``<!-- example: name -->`` in the README."""
    match = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)\n```", README.read_text(), re.DOTALL)
    assert match, f"no example {name!r} in the README"
    return match.group(1)


_spec = importlib.util.spec_from_file_location("actpat_test_toys", Path(__file__).resolve().parents[1] / "toys.py")
toys = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toys)
ToyNet, toy_data = toys.ToyNet, toys.toy_data
TRAIN, PROBE = toy_data(320, 0), toy_data(40, 1)  # 5 steps of 64 per epoch: a probe at every step


@pytest.fixture(scope="module")
def callback_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("callback")
    cb = ActivationPatternCallback(probe=PROBE, probe_every=0.2, probe_batch_size=64, live_stats=False)
    pl.seed_everything(0, verbose=False)
    model = ToyNet()
    trainer = pl.Trainer(
        max_epochs=EPOCHS, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, accelerator="cpu", devices=1, callbacks=[cb], default_root_dir=root,
    )
    trainer.fit(model, DataLoader(TRAIN, batch_size=64, shuffle=True))
    return Path(cb.run_dir)


def _run_example(name: str, tmp_path: Path, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)
    pl.seed_everything(0, verbose=False)
    namespace = {"model": ToyNet(), "train_set": TRAIN, "probe_set": PROBE, "epochs": EPOCHS}
    exec(compile(example(name), f"README.md:{name}", "exec"), namespace)
    return namespace


def _assert_same_records(expected: Path, got: Path) -> None:
    live, loop = open_run(expected), open_run(got)
    assert loop.sites == live.sites and loop.splits == ["probe"]
    assert live.steps(live.sites[0], "probe").tolist() == list(range(2 * 5 + 1))
    for site in live.sites:
        assert loop.steps(site, "probe").tolist() == live.steps(site, "probe").tolist()
        for step in live.steps(site, "probe").tolist():
            a, b = live.read(site, step, "probe"), loop.read(site, step, "probe")
            np.testing.assert_array_equal(b.bits, a.bits, err_msg=f"{site} at step {step}")
            np.testing.assert_array_equal(b.sample_ids, a.sample_ids)
            np.testing.assert_array_equal(b.labels, a.labels)
            assert (b.epoch, b.split) == (a.epoch, a.split), (site, step)


@pytest.mark.usefixtures("every_probe_gets_statistics")
def test_plain_loop_example_writes_the_callbacks_shards(callback_run, tmp_path, monkeypatch):
    _run_example("plain-loop", tmp_path, monkeypatch)
    _assert_same_records(callback_run, tmp_path / "runs" / "plain" / "patterns")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "runs" / "plain" / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("actpat/jaccard_init/net.6")] == list(range(11))


def test_fabric_example_writes_the_callbacks_shards(callback_run, tmp_path, monkeypatch):
    pytest.importorskip("lightning")
    _run_example("fabric", tmp_path, monkeypatch)
    _assert_same_records(callback_run, tmp_path / "runs" / "fabric" / "patterns")
