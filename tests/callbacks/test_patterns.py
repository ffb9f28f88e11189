"""ActivationPatternCallback on a real Trainer, against independent truth.

The truth here never calls the library's packing or counting: the tests hook the ReLUs themselves,
pack with ``np.packbits`` and count rows with ``collections.Counter``. The subprocess tests (kill and
resume, DDP) import this file as a module to share the tiny model.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from actpat.callbacks.patterns import ActivationPatternCallback
from actpat.recorder import open_run
from actpat.recorder.prober import ProbeForwardError

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
ACCELERATORS = {"cpu": "cpu", "cuda": "gpu"}  # Lightning's name of each device of the `device` fixture


# ---------------------------------------------------------------------- tiny model and data
_spec = importlib.util.spec_from_file_location("actpat_test_toys", Path(__file__).resolve().parents[1] / "toys.py")
toys = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toys)
ToyNet, toy_data, relu_inputs, channel_bits = toys.ToyNet, toys.toy_data, toys.relu_inputs, toys.channel_bits


class ToyData(pl.LightningDataModule):
    def __init__(self, n: int = 64, batch_size: int = 8) -> None:
        super().__init__()
        self.n, self.batch_size = n, batch_size

    def train_dataloader(self):
        return DataLoader(toy_data(self.n), batch_size=self.batch_size, shuffle=True)


def make_trainer(root, callbacks=(), **kwargs) -> pl.Trainer:
    options = dict(
        max_epochs=2, logger=CSVLogger(root), enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, deterministic=True, default_root_dir=root, accelerator="cpu", devices=1,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **options)


def fit(root, callbacks=(), seed: int = 0, **kwargs) -> ToyNet:
    pl.seed_everything(seed, verbose=False)
    model = ToyNet()
    make_trainer(root, callbacks, **kwargs).fit(model, DataLoader(toy_data(), batch_size=8, shuffle=True))
    return model


# ---------------------------------------------------------------------- bit-identical training
@pytest.mark.parametrize("probe_mode", ["train", "eval"])
@pytest.mark.parametrize("probe_copy", [True, False])
def test_training_is_bit_identical_with_the_callback(tmp_path, probe_mode, probe_copy, device):
    accelerator = ACCELERATORS[device]
    plain = fit(tmp_path / "plain", accelerator=accelerator)
    cb = ActivationPatternCallback(probe=toy_data(24, seed=1), probe_every=0.2, probe_mode=probe_mode,
                                   probe_batch_size=10, batch_every_n_steps=3, probe_copy=probe_copy)
    recorded = fit(tmp_path / "recorded", [cb], accelerator=accelerator)
    for (key, a), b in zip(plain.state_dict().items(), recorded.state_dict().values()):
        assert torch.equal(a, b), key  # weights and BatchNorm buffers
    run = open_run(cb.run_dir)
    assert run.steps("net.2", "probe").tolist() == [0, 2, 4, 5, 7, 8, 10, 12, 13, 15, 16]
    assert run.steps("net.2", "train").tolist() == [0, 3, 6, 9, 12, 15]


# ---------------------------------------------------------------------- probe = recomputation from weights
class SaveWeights(pl.Callback):
    def __init__(self):
        self.weights = {}

    def on_train_start(self, trainer, pl_module):
        self.weights[trainer.global_step] = copy.deepcopy(pl_module.state_dict())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights[trainer.global_step] = copy.deepcopy(pl_module.state_dict())


@pytest.mark.parametrize("probe_mode", ["train", "eval"])
def test_probe_patterns_equal_recomputation_from_saved_weights(tmp_path, probe_mode, device):
    probe = toy_data(24, seed=1)
    cb = ActivationPatternCallback(probe=probe, probe_every=4, probe_mode=probe_mode, probe_batch_size=10,
                                   live_stats=False)
    saver = SaveWeights()
    fit(tmp_path, [cb, saver], max_epochs=1, accelerator=ACCELERATORS[device])
    run = open_run(cb.run_dir)
    steps = run.steps("net.6", "probe").tolist()
    assert steps == [0, 4, 8]
    # The truth runs on the fit's device.
    for step in steps:
        model = ToyNet().to(device)
        model.load_state_dict(saver.weights[step])
        model.train(probe_mode == "train")
        model.net[4].eval()  # the probe runs without dropout noise
        truth: dict[str, list] = {}
        with torch.no_grad():
            for start in range(0, len(probe), 10):  # the probe's batches: BatchNorm sees these in train mode
                for site, z in relu_inputs(model, probe.tensors[0][start : start + 10].to(device)).items():
                    truth.setdefault(site, []).append(channel_bits(z))
        assert sorted(truth) == sorted(run.sites)
        for site, parts in truth.items():
            p = run.read(site, step, "probe")
            np.testing.assert_array_equal(p.bits, np.concatenate(parts), err_msg=f"{site} at step {step}")
            positions = 16 if site == "net.2" else 1
            np.testing.assert_array_equal(p.sample_ids, np.repeat(np.arange(24), positions))
            np.testing.assert_array_equal(p.labels, np.repeat(probe.tensors[1].numpy(), positions))


def test_probe_values_store_float16_pre_activations_of_the_probe_only(tmp_path):
    probe = toy_data(12, seed=2)
    cb = ActivationPatternCallback(probe=probe, probe_every=4, probe_mode="eval", probe_batch_size=12,
                                   batch_every_n_steps=4, live_stats=False, probe_values="all")
    saver = SaveWeights()
    fit(tmp_path, [cb, saver], max_epochs=1)
    run = open_run(cb.run_dir)
    model = ToyNet()
    model.load_state_dict(saver.weights[4])
    model.eval()
    with torch.no_grad():
        z = relu_inputs(model, probe.tensors[0])["net.6"].numpy()
    p = run.read("net.6", 4, "probe")
    np.testing.assert_allclose(p.values.astype(np.float32), z, rtol=2e-3, atol=2e-3)
    assert run.read("net.6", 4, "train").values is None


def test_module_types_add_sites(tmp_path):
    class TanhNet(ToyNet):
        def __init__(self):
            super().__init__()
            self.net[6] = nn.Tanh()

    cb = ActivationPatternCallback(probe=toy_data(8), probe_every=8, live_stats=False, module_types=[nn.Tanh])
    pl.seed_everything(0, verbose=False)
    make_trainer(tmp_path, [cb], max_epochs=1).fit(TanhNet(), DataLoader(toy_data(), batch_size=8))
    run = open_run(cb.run_dir)
    assert run.sites == ["net.2", "net.6"] and run.site_info("net.6")["module_type"] == "Tanh"


# ---------------------------------------------------------------------- live stats = brute force from the shards
def _entropy(counter: Counter) -> float:
    n = sum(counter.values())
    return -sum(c / n * math.log2(c / n) for c in counter.values())


def _brute_force(rows: list[tuple], labels: list[int], n_units: int, init: Counter, last: Counter | None) -> dict:
    a = Counter(rows)
    n = len(rows)
    out = {
        "entropy": _entropy(a),
        "normalized_entropy": _entropy(a) / min(n_units, math.log2(n)),
        "distinct": len(a),
        "top_mass": max(a.values()) / n,
        "mutual_information": _entropy(a) + _entropy(Counter(labels)) - _entropy(Counter(zip(rows, labels))),
    }
    for name, ref in (("init", init), ("last", last)):
        if ref is None:
            continue
        out[f"jaccard_{name}"] = len(a.keys() & ref.keys()) / len(a.keys() | ref.keys())
        keys = a.keys() | ref.keys()
        out[f"weighted_jaccard_{name}"] = sum(min(a[k], ref[k]) for k in keys) / sum(max(a[k], ref[k]) for k in keys)
    return out


@pytest.mark.usefixtures("every_probe_gets_statistics")
@pytest.mark.parametrize("n_classes", [None, "probe", 7])
def test_logged_live_stats_equal_brute_force_counts_of_the_shards(tmp_path, n_classes):
    cb = ActivationPatternCallback(probe=toy_data(40, seed=2), probe_every=0.5, probe_batch_size=16,
                                   n_classes=n_classes)
    fit(tmp_path, [cb])
    run = open_run(cb.run_dir)
    metrics = pd.read_csv(Path(cb.run_dir).parent / "metrics.csv")
    checked = 0
    for site in run.sites:
        init = last = None
        for step in run.steps(site, "probe").tolist():
            p = run.read(site, step, "probe")
            rows = [tuple(r) for r in p.unpack().astype(int).tolist()]
            a = Counter(rows)
            truth = _brute_force(rows, p.labels.tolist(), p.n_units, init or a, last)
            if n_classes is not None:  # the reference implementation's convention, from its formulas
                c = len(set(p.labels.tolist())) if n_classes == "probe" else n_classes
                joint = _entropy(Counter(zip(rows, p.labels.tolist())))
                truth["conditional_entropy_nominal"] = joint - math.log2(c)
                truth["mutual_information_nominal"] = _entropy(a) - joint + math.log2(c)
            else:
                assert not any("nominal" in column for column in metrics.columns)
            row = metrics[metrics["step"] == step]
            for metric, value in truth.items():
                logged = row[f"actpat/{metric}/{site}"].dropna()
                assert len(logged) == 1, (metric, site, step)
                assert logged.iloc[0] == pytest.approx(value, rel=1e-9, abs=1e-12), (metric, site, step)
                checked += 1
            init, last = init or a, a
    assert checked > 50


@pytest.mark.usefixtures("every_probe_gets_statistics")
def test_tensorboard_logger_gets_scalars_and_a_custom_scalars_layout(tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = ActivationPatternCallback(probe=toy_data(16, seed=2), probe_every=0.5)
    fit(tmp_path, [cb], logger=TensorBoardLogger(tmp_path), max_epochs=1)
    events = EventAccumulator(str(Path(cb.run_dir).parent)).Reload()
    assert "actpat/entropy/net.2" in events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("actpat/jaccard_init/net.6")] == [0, 4, 8]
    layout = [name for name in os.listdir(Path(cb.run_dir).parent) if name.startswith("events")]
    assert layout  # the layout is a summary in the same event files
    assert b"custom_scalars" in b"".join((Path(cb.run_dir).parent / name).read_bytes() for name in layout)


# ---------------------------------------------------------------------- state, errors, arguments
def test_state_dict_round_trip_and_state_key(tmp_path):
    a = ActivationPatternCallback(batch_every_n_steps=1, live_stats=False)
    b = ActivationPatternCallback(batch_every_n_steps=2, live_stats=False)
    assert a.state_key != b.state_key
    b.batch_every_n_steps = 1
    assert a.state_key == b.state_key  # a setting changed after a read changes the key too
    b.batch_every_n_steps, b.out_dir = 2, tmp_path / "b"
    assert str(tmp_path / "b") in b.state_key and "batch_every_n_steps': 2" in b.state_key
    b.probe_every = 1.0
    assert "'probe_every': 1.0," in b.state_key
    b.probe_every = 1  # equal to 1.0, but optimizer steps instead of epochs: another key
    assert "'probe_every': 1," in b.state_key
    fit(tmp_path, [a], max_epochs=1)
    state = a.state_dict()
    assert state["last_batch_step"] == 7 and state["run_dir"] == str(a.run_dir)
    b.load_state_dict(state)
    assert b.state_dict() == state
    b.load_state_dict({})  # an older checkpoint without the keys still loads
    assert b.state_dict()["last_probe_step"] == -1


class BreaksLater(Dataset):
    """A probe set that serves the first probe, then fails (a network share gone at hour ten)."""

    def __init__(self):
        self.served = 0

    def __len__(self):
        return 4

    def __getitem__(self, i):
        self.served += 1
        if self.served > len(self):
            raise RuntimeError("broken probe sample")
        return torch.zeros(1, 4, 4), 0


def test_an_error_after_recording_worked_warns_once_and_training_continues(tmp_path):
    # Without the device cache, every probe reads the probe set from its loader again.
    cb = ActivationPatternCallback(probe=BreaksLater(), probe_every=1, live_stats=False, probe_cache_bytes=0)
    with pytest.warns(UserWarning, match="broken probe sample") as record:
        model = fit(tmp_path, [cb], max_epochs=1)
    messages = [str(w.message) for w in record if "actpat" in str(w.message)]
    assert len(messages) == 2, messages  # the error once, and once more in the summary at the end of fit
    assert "stops for the rest of this fit" in messages[0] and "the probe at step 1 failed" in messages[0]
    assert "stopped early" in messages[1] and "broken probe sample" in messages[1]
    assert model.trainer.global_step == 8
    assert open_run(cb.run_dir).steps("net.2", "probe").tolist() == [0]  # the init probe worked and stays
    reasons = open_run(cb.run_dir).stop_reasons  # what `actpat info` shows
    assert len(reasons) == 1 and "the probe at step 1 failed" in reasons[0].reason
    assert "broken probe sample" in reasons[0].reason
    strict = ActivationPatternCallback(probe=BreaksLater(), probe_every=1, live_stats=False, on_error="raise",
                                       probe_cache_bytes=0)
    with pytest.raises(RuntimeError, match="broken probe sample"):
        fit(tmp_path / "strict", [strict], max_epochs=1)


def test_invalid_arguments_are_rejected_with_the_value():
    with pytest.raises(ValueError, match="nothing|something to record"):
        ActivationPatternCallback()
    with pytest.raises(ValueError, match="probe_mode.*'test'"):
        ActivationPatternCallback(batch_every_n_steps=1, probe_mode="test")
    with pytest.raises(ValueError, match="shuffles"):
        ActivationPatternCallback(probe=DataLoader(toy_data(8), shuffle=True))
    with pytest.raises(ValueError, match="probe_every.*-1"):
        ActivationPatternCallback(probe=toy_data(8), probe_every=-1)
    with pytest.raises(ValueError, match=r"`n_classes` to be None, an int >= 1 or \"probe\", but got 'all'"):
        ActivationPatternCallback(probe=toy_data(8), n_classes="all")


def test_one_callback_reused_by_a_second_trainer_records_a_new_run(tmp_path):
    # A seed sweep or a re-run notebook cell: the second fit recorded nothing into the first's directory.
    cb = ActivationPatternCallback(probe=toy_data(24, seed=1), probe_every=0.5, probe_batch_size=12,
                                   live_stats=False, batch_every_n_steps=4)
    runs = []
    for seed in range(2):
        fit(tmp_path / f"seed{seed}", [cb], seed=seed)
        runs.append(cb.run_dir)
    assert runs[0] != runs[1] and runs[1].is_relative_to(tmp_path / "seed1")
    for run_dir in runs:
        run = open_run(run_dir)
        assert run.steps("net.2", "probe").tolist() == [0, 4, 8, 12, 16]
        assert run.steps("net.2", "train").tolist() == [0, 4, 8, 12]
        assert not run.stop_reasons


def test_the_same_trainer_fitting_again_continues_its_run(tmp_path, recwarn):
    # Training for longer in a notebook: raise max_epochs and fit again. The first fit's end-of-fit probe is at
    # the step where the second fit starts; the second fit neither probes it again nor takes it for another run's.
    cb = ActivationPatternCallback(probe=toy_data(24, seed=1), probe_every=0.5, probe_batch_size=12,
                                   live_stats=False, batch_every_n_steps=4)
    pl.seed_everything(0, verbose=False)
    model, data = ToyNet(), DataLoader(toy_data(), batch_size=8, shuffle=True)
    trainer = make_trainer(tmp_path, [cb], max_epochs=1)
    trainer.fit(model, data)
    first = cb.run_dir
    trainer.fit_loop.max_epochs = 2
    trainer.fit(model, data)
    assert trainer.global_step == 16 and cb.run_dir == first
    run = open_run(first)
    assert run.steps("net.2", "probe").tolist() == [0, 4, 8, 12, 16]  # one probe per schedule point, none twice
    assert run.steps("net.2", "train").tolist() == [0, 4, 8, 12]
    assert not run.stop_reasons and not run.losses
    assert not [w for w in recwarn if "actpat" in str(w.message)], [str(w.message) for w in recwarn]
    # Another module fitted by that Trainer is not this run's continuation: refused before training, as a new fit.
    trainer.fit_loop.max_epochs = 3
    with pytest.raises(ValueError, match="no probe records at or after step 16.*fitted another module before, so this is a new fit"):
        trainer.fit(ToyNet(), data)


@pytest.mark.parametrize("on_error", ["warn", "raise"])
def test_failing_live_statistics_stop_themselves_not_the_recording(tmp_path, monkeypatch, on_error):
    def broken(patterns, references, n_classes=None):
        raise ZeroDivisionError("a broken statistic")

    monkeypatch.setattr("actpat.analysis.live.live_measures", broken)
    cb = ActivationPatternCallback(probe=toy_data(24, seed=1), probe_every=0.5, probe_batch_size=12,
                                   on_error=on_error)
    if on_error == "raise":
        with pytest.raises(Exception, match="a broken statistic"):
            fit(tmp_path, [cb])
        return
    with pytest.warns(UserWarning, match="(?s)a broken statistic.*Live statistics stop.*go on being recorded"):
        fit(tmp_path, [cb])
    run = open_run(cb.run_dir)
    assert run.steps("net.2", "probe").tolist() == [0, 4, 8, 12, 16]  # every probe, before and after the failure
    assert not run.stop_reasons
    logged = Path(cb.run_dir).parent / "metrics.csv"  # written only where something was logged
    assert not logged.exists() or not any(c.startswith("actpat/") for c in pd.read_csv(logged).columns)


class HandedCSVLogger(CSVLogger):
    """A CSVLogger that notes the steps at which it was handed live statistics."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.handed: list[int] = []

    def log_metrics(self, metrics, step=None) -> None:
        if any(key.startswith("actpat/") for key in metrics):
            self.handed.append(step)
        super().log_metrics(metrics, step)


class SavedLiveStats(pl.Callback):
    """At the end of each epoch: the steps of live statistics handed to the logger, and those in its file."""

    def __init__(self) -> None:
        self.seen: list[tuple[list[int], list[int]]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        path = Path(trainer.logger.log_dir) / "metrics.csv"
        table = pd.read_csv(path) if path.exists() else pd.DataFrame()
        column = "actpat/entropy/net.2"
        in_file = sorted(table.dropna(subset=[column])["step"].tolist()) if column in table else []
        self.seen.append((list(trainer.logger.handed), in_file))


@pytest.mark.usefixtures("every_probe_gets_statistics")
def test_live_stats_reach_the_logger_file_while_training_also_when_the_module_logs_nothing(tmp_path, monkeypatch):
    # ToyNet logs nothing itself, so Lightning never saves its loggers during fit: the callback does.
    monkeypatch.setattr("actpat.callbacks._trainer.LiveLog.SAVE_SECONDS", 0.0)  # at each probe's statistics
    cb = ActivationPatternCallback(probe=toy_data(16, seed=1), probe_every=4, probe_batch_size=8)
    seen = SavedLiveStats()
    fit(tmp_path, [cb, seen], max_epochs=3, logger=HandedCSVLogger(tmp_path))
    assert seen.seen[-1][0], "no live statistics reached the logger during the fit"
    for handed, in_file in seen.seen:
        assert in_file == handed
    final = pd.read_csv(Path(cb.run_dir).parent / "metrics.csv").dropna(subset=["actpat/entropy/net.2"])
    assert sorted(final["step"].tolist()) == [0, 4, 8, 12, 16, 20, 24]


def test_live_log_saves_the_loggers_at_most_every_save_seconds(monkeypatch):
    from actpat.callbacks._trainer import LiveLog

    class Logger:
        def __init__(self) -> None:
            self.logged, self.saves = [], 0

        def log_metrics(self, metrics, step) -> None:
            self.logged.append((step, metrics))

        def save(self) -> None:
            self.saves += 1

    clock = [100.0]
    monkeypatch.setattr("actpat.callbacks._trainer.time.monotonic", lambda: clock[0])
    loggers = [Logger(), Logger()]
    log = LiveLog(type("Trainer", (), {"loggers": loggers, "is_global_zero": True})())
    saves = []
    for step, now in enumerate([100.0, 101.0, 104.9, 105.0, 105.1, 111.0]):
        clock[0] = now
        log(step, {"fc": {"entropy": float(step)}})
        saves.append(loggers[0].saves)
    assert saves == [1, 1, 1, 2, 2, 3]  # the first at once, then after 5 s (LiveLog.SAVE_SECONDS) each
    assert loggers[1].saves == 3
    assert [step for step, _ in loggers[0].logged] == [0, 1, 2, 3, 4, 5]  # every probe is logged
    assert loggers[0].logged[2][1] == {"actpat/entropy/fc": 2.0}
    log(6, {})  # nothing computed: nothing logged, nothing saved
    assert len(loggers[0].logged) == 6 and loggers[0].saves == 3


class FailingSaveLogger(CSVLogger):
    """A logger whose second save fails (a full disk, say, freed again before Lightning's save at the end)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.saves = 0

    def save(self) -> None:
        self.saves += 1
        if self.saves == 2:
            raise OSError(28, "No space left on device")
        super().save()


def test_a_failing_logger_stops_the_live_stats_and_the_probes_go_on(tmp_path, monkeypatch):
    monkeypatch.setattr("actpat.callbacks._trainer.LiveLog.SAVE_SECONDS", 0.0)
    cb = ActivationPatternCallback(probe=toy_data(16, seed=1), probe_every=4, probe_batch_size=8)
    with pytest.warns(UserWarning, match="(?s)to FailingSaveLogger failed with OSError.*Live statistics stop"):
        fit(tmp_path, [cb], logger=FailingSaveLogger(tmp_path))
    run = open_run(cb.run_dir)
    assert run.steps("net.2", "probe").tolist() == [0, 4, 8, 12, 16]  # every probe, before and after the failure
    assert not run.stop_reasons


class StopsTheStatisticsProcess(pl.Callback):
    """Stops (SIGSTOP) the callback's statistics process at the end of the first epoch, once it is ready."""

    def __init__(self, cb: ActivationPatternCallback) -> None:
        self.cb, self.pid = cb, None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.pid is not None:
            return
        live = self.cb._prober._stats
        deadline = time.monotonic() + 30
        while not live._process.ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.pid = live.worker_pid
        os.kill(self.pid, signal.SIGSTOP)


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="stops a process (POSIX)")
def test_a_stuck_statistics_process_holds_the_end_of_fit_for_a_bounded_time(tmp_path, monkeypatch):
    monkeypatch.setattr("actpat.recorder.live_stats.FINAL_WAIT_SECONDS", 1.0)
    cb = ActivationPatternCallback(probe=toy_data(16, seed=1), probe_every=4, probe_batch_size=8)
    stopper = StopsTheStatisticsProcess(cb)
    # Frees a wait without bound (so that the failure is reported, not a hung test).
    watchdog = threading.Timer(60, lambda: stopper.pid and os.kill(stopper.pid, signal.SIGKILL))
    watchdog.start()
    start = time.monotonic()
    try:
        with pytest.warns(UserWarning, match=r"were not done after a wait of 1 s .* and are dropped; no more live statistics"):
            fit(tmp_path, [cb, stopper], max_epochs=3)
    finally:
        watchdog.cancel()
    assert time.monotonic() - start < 45
    with pytest.raises(ProcessLookupError):  # ended by the callback
        os.kill(stopper.pid, 0)
    run = open_run(cb.run_dir)
    assert run.steps("net.2", "probe").tolist() == [0, 4, 8, 12, 16, 20, 24]  # every probe is recorded


def test_live_stats_without_a_logger_fail_at_setup(tmp_path):
    cb = ActivationPatternCallback(probe=toy_data(8))
    with pytest.raises(ValueError, match="Expected a logger"):
        fit(tmp_path, [cb], logger=False)


def compiled_toy(how: str) -> ToyNet:
    """ToyNet with its ``net`` compiled (``child``) or compiled as a whole (``module``), dynamo's eager backend."""
    net = ToyNet()
    if how == "child":
        net.net = torch.compile(net.net, backend="eager")
    return torch.compile(net, backend="eager") if how == "module" else net


def eager_and_compiled_runs(tmp_path, how: str, **options):
    """The runs of the same fit of the eager and the compiled ToyNet, each with a fresh callback."""
    runs = []
    for name, make in (("eager", ToyNet), ("compiled", lambda: compiled_toy(how))):
        torch._dynamo.reset()
        cb = ActivationPatternCallback(live_stats=False, **options)
        pl.seed_everything(0, verbose=False)
        module = make()
        make_trainer(tmp_path / name, [cb], max_epochs=1).fit(module, DataLoader(toy_data(), batch_size=8))
        runs.append(open_run(cb.run_dir))
    torch._dynamo.reset()
    return runs


@pytest.mark.parametrize("how", ["child", "module"])
def test_the_probe_copy_of_a_compiled_module_records_like_the_eager_module(tmp_path, how):
    eager, compiled = eager_and_compiled_runs(tmp_path, how, probe=toy_data(16, seed=1), probe_every=4)
    assert compiled.sites == eager.sites == ["net.2", "net.6"]  # eager names: no `_orig_mod` in them
    for site in eager.sites:
        assert compiled.steps(site, "probe").tolist() == [0, 4, 8]
        np.testing.assert_array_equal(compiled.read(site, 0, "probe").bits, eager.read(site, 0, "probe").bits)
    no_copy = ActivationPatternCallback(probe=toy_data(16, seed=1), live_stats=False, probe_copy=False)
    with pytest.raises(ValueError, match=r"eager module for `probe_copy=False`.*compiled.*probe_copy=True"):
        trainer = make_trainer(tmp_path / "no_copy", [no_copy], max_epochs=1)
        trainer.fit(compiled_toy(how), DataLoader(toy_data(), batch_size=8))


@pytest.mark.parametrize("how", ["child", "module"])
def test_batch_mode_records_a_compiled_module_like_the_eager_module(tmp_path, how):
    eager, compiled = eager_and_compiled_runs(tmp_path, how, batch_every_n_steps=2)
    assert compiled.sites == eager.sites == ["net.2", "net.6"]
    for site in eager.sites:
        steps = eager.steps(site, "train").tolist()
        assert steps == compiled.steps(site, "train").tolist() and len(steps) >= 3
        for step in steps:
            a, b = eager.read(site, step, "train"), compiled.read(site, step, "train")
            np.testing.assert_array_equal(b.bits, a.bits)
            np.testing.assert_array_equal(b.labels, a.labels)


# ---------------------------------------------------------------------- kill and resume (subprocess)
_SCRIPT = """\
import importlib.util, os, signal, sys
import pytorch_lightning as pl
spec = importlib.util.spec_from_file_location("toy", {here!r}); T = importlib.util.module_from_spec(spec)
spec.loader.exec_module(T)
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from actpat.callbacks.patterns import ActivationPatternCallback

class Kill(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)

def main():
    root, ckpt = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None) or None
    cb = ActivationPatternCallback(probe=T.toy_data(24, seed=1), probe_every=3, batch_every_n_steps=2,
                                   probe_batch_size=10)
    ckpts = ModelCheckpoint(dirpath=os.path.join(root, "ckpt"), every_n_train_steps=5, save_top_k=-1)
    callbacks = [cb, ckpts] + ([] if ckpt else [Kill()])
    pl.seed_everything(0, verbose=False)
    trainer = T.make_trainer(root, callbacks, max_epochs=3, enable_checkpointing=True, {extra})
    trainer.fit(T.ToyNet(), DataLoader(T.toy_data(), batch_size=8, shuffle=True), ckpt_path=ckpt)
    print("RUN_DIR", cb.run_dir)

if __name__ == "__main__":
    main()
"""


def _script(tmp_path, kill_at=-1, extra="") -> Path:
    path = tmp_path / "train.py"
    path.write_text(_SCRIPT.format(here=str(HERE), kill_at=kill_at, extra=extra))
    return path


def _run(args, timeout=120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=REPO)


def test_kill_and_resume_continues_records_without_duplicates(tmp_path):
    script = _script(tmp_path, kill_at=12)
    killed = _run([script, tmp_path])
    assert killed.returncode == -9, killed.stderr[-3000:]
    ckpt = tmp_path / "ckpt" / "epoch=1-step=10.ckpt"
    assert ckpt.exists(), os.listdir(tmp_path / "ckpt")
    resumed = _run([_script(tmp_path), tmp_path, ckpt])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run_dir = resumed.stdout.split("RUN_DIR ")[-1].strip()
    assert "version_0" in run_dir  # the resumed fit (logger version_1) continued in the first run's directory
    run = open_run(run_dir)
    all_probe_steps = sorted(set().union(*(run.steps(site, "probe").tolist() for site in run.sites)))
    all_train_steps = sorted(set().union(*(run.steps(site, "train").tolist() for site in run.sites)))
    # On schedule, each once; the killed run's steps (<= 12) are there unless its shard was unreadable.
    assert set(all_probe_steps) <= set(range(0, 25, 3)) and set(all_train_steps) <= set(range(0, 24, 2))
    assert [s for s in all_probe_steps if s > 12] == [15, 18, 21, 24]
    assert [s for s in all_train_steps if s > 12] == [14, 16, 18, 20, 22]
    # The killed process's unfinalized shard holds steps 0..12; HDF5 without SWMR gives no guarantee for
    # an unfinalized file, so its records may be unreadable (OSError) or, after its last flush, short.
    crashed = set(range(13))
    for site in run.sites:
        positions = 16 if site == "net.2" else 1
        for split, steps, full in (("probe", range(0, 25, 3), 24), ("train", range(0, 24, 2), 8)):
            for step in steps:
                try:
                    ids = run.read(site, step, split).sample_ids
                except (OSError, KeyError):  # unreadable, or its rows never reached the disk
                    assert step in crashed, (site, split, step)  # never a record of the resumed process
                    continue
                if split == "probe":
                    assert len(np.unique(ids)) * positions == len(ids), (site, step)  # no sample twice
                rows, expected = len(ids), full * positions
                assert rows == expected or (step in crashed and rows < expected), (site, split, step, rows)
    assert all(len(run.read("net.6", s, "probe")) == 24 for s in (15, 18, 21, 24))


# ---------------------------------------------------------------------- DDP, two CPU processes
def test_ddp_two_processes_write_per_rank_shards_and_their_resume_warns_of_what_the_run_holds_once(tmp_path):
    """Per-rank shards, read pooled. Then the resumed fit (one DDP fit less than two tests): every rank opens the run
    it continues, and each printed every loss of it, and rank 1 printed the note on rank 0's records after the
    checkpoint's step as its own ("rank 1: ...")."""
    from actpat.recorder import schema

    script = _script(tmp_path, extra='strategy="ddp", devices=2')
    done = _run([script, tmp_path, ""], timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = Path(done.stdout.split("RUN_DIR ")[-1].strip())
    names = sorted(os.listdir(run_dir))
    assert any(n.startswith("patterns-rank000-") for n in names) and any(n.startswith("patterns-rank001-") for n in names)
    merged = open_run(run_dir)
    per_rank = []
    for rank in (0, 1):
        alone = tmp_path / f"rank{rank}"
        alone.mkdir()
        for name in names:
            if name.startswith(f"patterns-rank{rank:03d}-"):
                os.link(run_dir / name, alone / name)
        per_rank.append(open_run(alone))
    for site in merged.sites:
        assert merged.n_observations(site, "train") == sum(r.n_observations(site, "train") for r in per_rank)
        rows = [Counter(map(bytes, r.read(site, 4, "train").bits)) for r in per_rank]
        assert Counter(map(bytes, merged.read(site, 4, "train").bits)) == rows[0] + rows[1]
    assert len(merged.read("net.6", 4, "train")) == 16  # 8 samples per rank and step
    assert len(merged.read("net.6", 0, "probe")) == 24  # the probe ran on rank 0 only
    assert per_rank[1].splits == ["train"]

    (run_dir / schema.shard_name(1, 1, partial=True)).write_bytes(b"")  # a writer of rank 1 killed early
    ckpt = sorted((tmp_path / "ckpt").glob("*step=5.ckpt"))[0]
    resumed = _run([script, tmp_path, ckpt], timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count("patterns-rank001-00001.h5.partial: it is empty") == 1, resumed.stderr[-3000:]
    assert resumed.stderr.count("holds train records at 3 steps after step 5,") == 1, resumed.stderr[-3000:]
    assert "rank 1: actpat" not in resumed.stderr


@pytest.mark.parametrize("probe_kind", ["dataset", "loader"])
def test_probing_a_whole_dataset_on_every_rank_fails_before_training(tmp_path, monkeypatch, probe_kind):
    """Every rank probing the same Dataset would write every observation once per rank, which the reader pools:
    an error before the first step (a DataLoader may give each rank its own part). Two ranks simulated: the world
    size reported."""
    monkeypatch.setattr(pl.Trainer, "world_size", property(lambda self: 2))
    probe = toy_data(16, seed=1)
    if probe_kind == "loader":
        probe = DataLoader(probe, batch_size=8)
    options = dict(probe_batch_size=8) if probe_kind == "dataset" else {}
    cb = ActivationPatternCallback(probe=probe, probe_on_all_ranks=True, live_stats=False, **options)
    steps = []
    counter = pl.callbacks.LambdaCallback(on_train_batch_end=lambda *args: steps.append(1))
    if probe_kind == "dataset":
        with pytest.raises(ValueError, match=r"ranks would probe it whole.*counting every probe observation 2 times"):
            fit(tmp_path, [cb, counter], max_steps=2)
        assert steps == []
    else:
        fit(tmp_path, [cb, counter], max_steps=2)
        assert steps == [1, 1]


@pytest.mark.parametrize("mode", ["batch", "probe"])
def test_a_labels_from_that_fails_on_the_batches_is_named_before_training(tmp_path, mode):
    options = dict(batch_every_n_steps=1) if mode == "batch" else dict(probe=toy_data(16, seed=1), probe_batch_size=8)
    cb = ActivationPatternCallback(labels_from=lambda batch: batch["label"], live_stats=False, **options)
    steps = []
    with pytest.raises(ValueError, match=r"`labels_from\(batch\)` raised TypeError.*on a batch of list\(Tensor"):
        fit(tmp_path, [cb, pl.callbacks.LambdaCallback(on_train_batch_end=lambda *args: steps.append(1))])
    assert steps == []  # before the first optimizer step


class _OneBadSample(Dataset):
    """16 samples of the toy data, then one of 3x3 inputs: the last batch of a probe of 16 per batch fails."""

    def __len__(self):
        return 17

    def __getitem__(self, i):
        x, y = toy_data(16, seed=1)[min(i, 15)]
        return (x[..., :3, :3] if i == 16 else x), y


@pytest.mark.parametrize("mode", ["batch", "probe", "probe, its last batch", "batch, after a probe"])
def test_inputs_that_do_not_fit_the_model_fail_before_training_and_leave_out_dir_to_the_corrected_run(tmp_path, mode):
    # 3x3 inputs for a model of 4x4 inputs: its first site runs, its dense layer raises. Records handed over before
    # (the first batches of the probe, the whole init probe) are not written either: no training batch was done.
    wrong = TensorDataset(toy_data(16, seed=1).tensors[0][..., :3, :3], toy_data(16, seed=1).tensors[1])
    batch_mode = mode.startswith("batch")

    def callback(probe):
        options = dict(batch_every_n_steps=1) if batch_mode else {}
        options.update(dict(probe=probe, probe_batch_size=8 if mode == "probe" else 16) if probe is not None else {})
        return ActivationPatternCallback(out_dir=tmp_path / "run", live_stats=False, **options)

    if not batch_mode:
        with pytest.raises(ProbeForwardError, match=r"Check that the probe data fit the model"):
            fit(tmp_path, [callback(wrong if mode == "probe" else _OneBadSample())], max_steps=2)
    else:
        cb = callback(toy_data(16, seed=1) if mode == "batch, after a probe" else None)
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            make_trainer(tmp_path, [cb], max_steps=2).fit(ToyNet(), DataLoader(wrong, batch_size=8))
    assert not list((tmp_path / "run").rglob("*.h5*")), "the failed setup wrote records"
    cb = callback(None if mode == "batch" else toy_data(16, seed=1))
    fit(tmp_path, [cb], max_steps=2)
    run = open_run(cb.run_dir)
    assert not run.losses
    if batch_mode:
        assert run.steps("net.2", "train").tolist() == [0, 1]
    if mode != "batch":
        assert run.steps("net.2", "probe").tolist() == [0, 2]


@pytest.mark.parametrize("skipped", ["the first epoch", "every batch"])
def test_batches_the_module_skips_are_neither_checked_nor_an_error(tmp_path, skipped, caplog):
    # `on_train_batch_start` returning -1 skips the rest of the epoch: the callback's capture, opened before the
    # module's hook, saw no forward, and its check of the first batch's sites failed ("no site ran").
    class Skipping(ToyNet):
        def on_train_batch_start(self, batch, batch_idx):
            return -1 if skipped == "every batch" or self.current_epoch == 0 else None

    cb = ActivationPatternCallback(batch_every_n_steps=1, probe=toy_data(16, seed=1), probe_batch_size=8,
                                   live_stats=False)
    pl.seed_everything(0, verbose=False)
    with caplog.at_level(logging.WARNING, logger="actpat"):
        make_trainer(tmp_path, [cb], max_epochs=2).fit(Skipping(), DataLoader(toy_data(), batch_size=8))
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("actpat")]  # nor "captured again"
    run = open_run(cb.run_dir)
    assert not run.losses and 0 in run.steps("net.2", "probe").tolist()  # the init probe, held, is written
    trained = run.steps("net.2", "train").tolist() if "train" in run.splits else []
    assert trained == ([] if skipped == "every batch" else list(range(8)))


def test_batch_capture_ends_before_backward(tmp_path):
    from torch.nn.modules import module as torch_module
    from torch.overrides import _get_current_function_mode_stack

    seen = []

    class Probe(pl.Callback):
        def on_after_backward(self, trainer, pl_module):
            seen.append((len(torch_module._global_forward_pre_hooks), len(_get_current_function_mode_stack())))

    cb = ActivationPatternCallback(batch_every_n_steps=1, live_stats=False)
    fit(tmp_path, [cb, Probe()], max_epochs=1)
    assert seen and set(seen) == {(0, 0)}  # no recording hook is live during backward
    assert open_run(cb.run_dir).steps("net.2", "train").tolist() == list(range(8))


# ---------------------------------------------------------------------- padded sequences: mask_from
class _TokenData(Dataset):
    """Sequences of 2-4 tokens of 3 features and a class, the same at every access."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return torch.randn(2 + i % 3, 3, generator=torch.Generator().manual_seed(i)), i % 2


def _pad(samples):
    xs, ys = zip(*samples)
    real = nn.utils.rnn.pad_sequence([torch.ones(len(x), dtype=torch.bool) for x in xs], batch_first=True)
    return {"x": nn.utils.rnn.pad_sequence(list(xs), batch_first=True), "y": torch.tensor(ys), "real": real}


class _TokenModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.embed, self.ffn, self.act, self.head = nn.Linear(3, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.act(self.ffn(self.embed(x))).mean(1))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch["x"]), batch["y"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_mask_from_keeps_only_the_real_tokens_of_probe_and_training_batches(tmp_path):
    length = {i: 2 + i % 3 for i in range(12)}  # of each sequence of _TokenData
    probe = DataLoader(_TokenData(), batch_size=5, collate_fn=_pad)
    cb = ActivationPatternCallback(probe=probe, probe_every=3, batch_every_n_steps=1, live_stats=False,
                                   pattern="channel_last", mask_from=lambda batch: batch["real"])
    pl.seed_everything(0, verbose=False)
    make_trainer(tmp_path, [cb], max_epochs=1).fit(_TokenModule(), DataLoader(_TokenData(), batch_size=4, collate_fn=_pad))
    run = open_run(cb.run_dir)
    probes = run.steps("act", "probe").tolist()
    assert probes == [0, 3]
    for step in probes:  # every real token of the probe set once, no position past its sequence's length
        p = run.read("act", step, "probe")
        tokens = list(zip(p.sample_ids.tolist(), p.positions.tolist()))
        assert sorted(tokens) == sorted((i, t) for i in range(12) for t in range(length[i]))
    # Training batches (in order, unshuffled) 0-3, 4-7, 8-11: their real tokens, padded to 4, 4 and 4.
    assert run.steps("act", "train").tolist() == [0, 1, 2]
    for step, first in enumerate((0, 4, 8)):
        p = run.read("act", step, "train")
        assert len(p) == sum(length[i] for i in range(first, first + 4))
        assert all(t < length[first + k] for k, t in zip(np.repeat(range(4), [length[first + k] for k in range(4)]),
                                                          p.positions.tolist()))


def test_a_warning_about_a_site_is_given_once_per_run_with_probe_and_batch_mode(tmp_path, caplog):
    # The probe and the training batches have a recorder each, sharing the run's writer: one warning, not two.
    probe = DataLoader(_TokenData(), batch_size=5, collate_fn=_pad)
    cb = ActivationPatternCallback(probe=probe, probe_every=3, batch_every_n_steps=1, live_stats=False)
    pl.seed_everything(0, verbose=False)
    with caplog.at_level(logging.WARNING):
        make_trainer(tmp_path, [cb], max_epochs=1).fit(
            _TokenModule(), DataLoader(_TokenData(), batch_size=4, collate_fn=_pad))
    warned = [r.getMessage() for r in caplog.records if "3-d pre-activations" in r.getMessage()]
    assert len(warned) == 1 and "'act'" in warned[0]
    run = open_run(cb.run_dir)
    assert run.steps("act", "probe").tolist() == [0, 3] and run.steps("act", "train").tolist() == [0, 1, 2]


class _ManualSteps(pl.LightningModule):
    """Manual optimization stepping two optimizers at every batch ("two") or one at every second batch ("every2")."""

    def __init__(self, how: str):
        super().__init__()
        self.how, self.automatic_optimization = how, False
        self.a, self.b = nn.Sequential(nn.Linear(8, 16), nn.ReLU()), nn.Linear(16, 3)

    def forward(self, x):
        return self.b(self.a(x))

    def training_step(self, batch, batch_idx):
        self.manual_backward(nn.functional.cross_entropy(self(batch[0]), batch[1]))
        optimizers = self.optimizers()
        if self.how == "two":
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad()
        elif batch_idx % 2 == 1:
            optimizers.step()
            optimizers.zero_grad()

    def configure_optimizers(self):
        if self.how == "two":
            return [torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)]
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _manual_fit(root, how, probe_every):
    data = torch.utils.data.TensorDataset(torch.randn(160, 8), torch.randint(0, 3, (160,)))  # 10 batches of 16
    cb = ActivationPatternCallback(probe=data, probe_every=probe_every, probe_batch_size=16, live_stats=False)
    pl.seed_everything(0, verbose=False)
    make_trainer(root, [cb], max_epochs=2, logger=False).fit(_ManualSteps(how), DataLoader(data, batch_size=16))
    return open_run(cb.run_dir).steps("a.1", "probe").tolist()


def test_steps_growing_by_two_per_batch_are_probed_after_every_multiple(tmp_path):
    # global_step 2, 4, ..., 40: the first step at or after 3, 6, 9, ... and the end of fit.
    expected = sorted({0, 40} | {min(s for s in range(2, 41, 2) if s >= m) for m in range(3, 40, 3)})
    assert _manual_fit(tmp_path, "two", 3) == expected


def test_an_epoch_of_other_than_the_assumed_optimizer_steps_is_warned_of(tmp_path):
    with pytest.warns(UserWarning, match=r"taken as 10 optimizer steps .* epoch 0 made 5 \(its batches / "
                                         r"accumulate_grad_batches make 10: manual optimization.* Pass an int `probe_every`"):
        _manual_fit(tmp_path, "every2", 0.5)



class _Plain(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("case", ["max_steps=0", "limit_train_batches=0", "empty loader", "resumed at its end"])
def test_a_fit_that_runs_no_training_says_that_it_recorded_nothing(tmp_path, case):
    # Lightning skips its training loop, on_train_start included: no probe, no batch, and the run directory stays
    # empty. Said once, not left for the user to find.
    data = TensorDataset(torch.randn(32, 8), torch.randint(0, 3, (32,)))
    loader = DataLoader(data if case != "empty loader" else TensorDataset(torch.zeros(0, 8)), batch_size=16)
    options = {"max_steps=0": dict(max_steps=0), "limit_train_batches=0": dict(limit_train_batches=0)}.get(case, {})
    ckpt_path = None
    if case == "resumed at its end":
        first = make_trainer(tmp_path / "first", max_epochs=1, enable_checkpointing=True)
        first.fit(_Plain(), loader)
        ckpt_path = first.checkpoint_callback.best_model_path
    cb = ActivationPatternCallback(probe=data, probe_every=1, batch_every_n_steps=1, live_stats=False)
    trainer = make_trainer(tmp_path, [cb], max_epochs=1, **options)
    with pytest.warns(UserWarning, match=r"this fit ran no training \(max_steps=0 .*recorded no activation pattern"):
        trainer.fit(_Plain(), loader, ckpt_path=ckpt_path)
    assert not list((tmp_path / "lightning_logs").rglob("*.h5"))


class _Reused(_Plain):
    """One ReLU module called twice per forward, as torchvision's BasicBlock does."""

    def __init__(self):
        super().__init__()
        self.fc, self.relu = nn.Linear(8, 8), nn.ReLU()

    def forward(self, x):
        return self.net(self.relu(self.fc(self.relu(x))))


class _HeadInStep(_Plain):
    """`forward` returns the backbone's features; `training_step` applies the head: the probe (`module(x)`) never
    runs the head's ReLU."""

    def __init__(self):
        super().__init__()
        self.head = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 3))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.head(self(batch[0])), batch[1])


@pytest.mark.parametrize("batch_every_n_steps", [0, 2])
def test_sites_a_training_step_runs_and_the_probe_does_not_are_named_after_the_first_batch(tmp_path, batch_every_n_steps):
    data = TensorDataset(torch.randn(32, 8), torch.randint(0, 3, (32,)))
    cb = ActivationPatternCallback(probe=data, probe_every=2, probe_batch_size=16, live_stats=False,
                                   batch_every_n_steps=batch_every_n_steps)
    batch_mode = "Batch mode records them" if batch_every_n_steps else r"Batch mode \(`batch_every_n_steps=`\) would"
    with pytest.warns(UserWarning, match=r"site\(s\) \['head.1'\] ran in the first training step but not in the "
                                         rf"probe forward \(`module\(inputs\)`.*`probe_forward=`.*{batch_mode}"):
        make_trainer(tmp_path, [cb], max_steps=4).fit(_HeadInStep(), DataLoader(data, batch_size=16))
    run = open_run(cb.run_dir)
    assert run.steps("net.1", "probe").tolist() == [0, 2, 4]
    assert ("head.1" in run.sites) == bool(batch_every_n_steps)  # recorded by batch mode alone
    plain = ActivationPatternCallback(probe=data, probe_every=2, probe_batch_size=16, live_stats=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message="(?!actpat)")  # Lightning's own
        make_trainer(tmp_path / "plain", [plain], max_steps=4).fit(_Plain(), DataLoader(data, batch_size=16))


class _AuxInTraining(pl.LightningModule):
    """No `forward`; its network returns (logits, aux) in training mode, as torchvision's Inception does, and
    `training_step` unpacks them."""

    def __init__(self):
        super().__init__()
        self.trunk, self.fc, self.aux = nn.Sequential(nn.Linear(8, 16), nn.ReLU()), nn.Linear(16, 3), nn.Linear(16, 3)

    def network(self, x):
        h = self.trunk(x)
        return (self.fc(h), self.aux(h)) if self.training else self.fc(h)

    def training_step(self, batch, batch_idx):
        logits, aux = self.network(batch[0])
        return nn.functional.cross_entropy(logits, batch[1]) + 0.3 * nn.functional.cross_entropy(aux, batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _SkipsFirst(_Plain):
    def on_train_batch_start(self, batch, batch_idx):
        return -1 if self.current_epoch == 0 else None  # skips the rest of the first epoch


def test_a_reused_callback_compares_the_sites_of_each_fit_alone_and_leaves_no_hook(tmp_path, recwarn):
    # The probe-only site check stayed attached (process-wide hooks) when the module skipped the batch it watched;
    # a second fit read the first fit's site names and warned of a head the second module lacks; a second fit
    # without training said nothing.
    from torch.nn.modules import module as torch_module

    data = TensorDataset(torch.randn(32, 8), torch.randint(0, 3, (32,)))
    cb = ActivationPatternCallback(probe=data, probe_every=2, probe_batch_size=16, live_stats=False)
    hooks = lambda: (len(torch_module._global_forward_pre_hooks), len(torch_module._global_forward_hooks))  # noqa: E731
    before = hooks()
    make_trainer(tmp_path / "a", [cb], max_epochs=2).fit(_SkipsFirst(), DataLoader(data, batch_size=16))
    assert hooks() == before
    make_trainer(tmp_path / "b", [cb], max_steps=2).fit(_HeadInStep(), DataLoader(data, batch_size=16))
    make_trainer(tmp_path / "c", [cb], max_steps=2).fit(_Plain(), DataLoader(data, batch_size=16))
    for fit_root in ("d", "e"):
        make_trainer(tmp_path / fit_root, [cb], max_steps=0).fit(_Plain(), DataLoader(data, batch_size=16))
    messages = [str(w.message) for w in recwarn if "actpat" in str(w.message)]
    assert sum("ran in the first training step but not in the probe" in m for m in messages) == 1, messages
    assert sum("this fit ran no training" in m for m in messages) == 2, messages
    assert hooks() == before


def test_a_training_step_that_needs_training_mode_outputs_fails_the_first_probe_saying_why(tmp_path):
    data = TensorDataset(torch.randn(32, 8), torch.randint(0, 3, (32,)))
    cb = ActivationPatternCallback(probe=data, probe_every=2, probe_batch_size=16, live_stats=False)
    with pytest.raises(ProbeForwardError, match=r"too many values to unpack.*runs the module in eval mode.*"
                                                r"auxiliary logits.*take their eval path"):
        make_trainer(tmp_path, [cb], max_steps=4).fit(_AuxInTraining(), DataLoader(data, batch_size=16))


def test_a_sites_pattern_missing_further_calls_of_a_site_is_warned_of_at_the_first_batch(tmp_path):
    data = TensorDataset(torch.randn(32, 8), torch.randint(0, 3, (32,)))
    cb = ActivationPatternCallback(batch_every_n_steps=1, sites="relu")
    with pytest.warns(UserWarning, match=r"`sites='relu'` selects some calls of a site but not its others \(relu but "
                                         r"not relu#1\)"):
        make_trainer(tmp_path, [cb], max_steps=2).fit(_Reused(), DataLoader(data, batch_size=16))
    assert open_run(cb.run_dir).sites == ["relu"]


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_the_probe_gets_its_inputs_in_the_dtype_of_a_true_precision(tmp_path, precision):
    # Lightning converts float batches to the weights' dtype before training_step; the probe does the same.
    data = torch.utils.data.TensorDataset(torch.randn(32, 8), torch.randint(0, 3, (32,)))
    cb = ActivationPatternCallback(probe=data, probe_every=2, probe_batch_size=16, live_stats=False)
    module = _Plain()
    pl.seed_everything(0, verbose=False)
    make_trainer(tmp_path, [cb], max_epochs=1, logger=False, precision=precision).fit(
        module, DataLoader(data, batch_size=16))
    dtype = {"64-true": torch.float64, "bf16-true": torch.bfloat16}[precision]
    assert module.net[0].weight.dtype == dtype
    run = open_run(cb.run_dir)
    assert run.steps("net.1", "probe").tolist() == [0, 2]
    with torch.no_grad():
        z = module.net[0](data.tensors[0].to(dtype))  # the final probe: the weights after fit
    np.testing.assert_array_equal(run.read("net.1", 2, "probe").bits, np.packbits((z > 0).numpy(), axis=1, bitorder="little"))


class _Shrinking(_Plain):
    """Reloads its training data each epoch, 10 batches of 16, then 6."""

    def train_dataloader(self):
        n = 160 if self.current_epoch == 0 else 96
        return DataLoader(torch.utils.data.TensorDataset(torch.randn(n, 8), torch.randint(0, 3, (n,))), batch_size=16)


def test_an_epoch_of_another_length_is_warned_of_as_such(tmp_path, recwarn):
    probe = torch.utils.data.TensorDataset(torch.randn(16, 8), torch.randint(0, 3, (16,)))
    cb = ActivationPatternCallback(probe=probe, probe_every=0.5, probe_batch_size=16, live_stats=False)
    make_trainer(tmp_path, [cb], max_epochs=2, logger=False, reload_dataloaders_every_n_epochs=1).fit(_Shrinking())
    told = [str(w.message) for w in recwarn if "fraction of an epoch" in str(w.message)]
    assert len(told) == 1 and "epoch 1 made 6 (the epoch length changed)" in told[0]
