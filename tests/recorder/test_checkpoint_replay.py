"""Replay from checkpoints: the patterns a live probe recorded, bit for bit, from the saved weights alone."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from actpat.callbacks import ActivationPatternCallback
from actpat.recorder import open_run, replay
from actpat.recorder.checkpoint_replay import load_checkpoint, replay_main, resolve, step_from_name

PROBE_EVERY = 3


_spec = importlib.util.spec_from_file_location("actpat_test_toys", Path(__file__).resolve().parents[1] / "toys.py")
toys = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toys)
ToyNet, toy_data = toys.ToyNet, toys.toy_data


class SaveAtProbeSteps(pl.Callback):
    """Lightning checkpoints and plain state_dict files at the probe steps of an int ``probe_every``."""

    def __init__(self, root) -> None:
        self.ckpt_dir, self.plain_dir = root / "ckpt", root / "plain"
        self.plain_dir.mkdir(parents=True)

    def _save(self, trainer, pl_module) -> None:
        step = trainer.global_step
        trainer.save_checkpoint(self.ckpt_dir / f"epoch={trainer.current_epoch}-step={step}.ckpt")
        torch.save(pl_module.state_dict(), self.plain_dir / f"toynet-{step:04d}.pt")

    def on_train_start(self, trainer, pl_module):
        self._save(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % PROBE_EVERY == 0:
            self._save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if trainer.global_step % PROBE_EVERY:
            self._save(trainer, pl_module)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_replayed_checkpoints_equal_the_live_probe_bit_for_bit(tmp_path, mode):
    probe = toy_data(20, 1)
    cb = ActivationPatternCallback(probe=probe, probe_every=PROBE_EVERY, probe_mode=mode, live_stats=False)
    saver = SaveAtProbeSteps(tmp_path)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_epochs=2, logger=CSVLogger(tmp_path), enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, accelerator="cpu", devices=1, callbacks=[cb, saver],
    )
    trainer.fit(ToyNet(), DataLoader(toy_data(40, 0), batch_size=8, shuffle=True))  # 5 steps per epoch
    live = open_run(cb.run_dir)
    steps = [0, 3, 6, 9, 10]
    assert live.steps("net.2", "probe").tolist() == steps
    for source, epochs in ((saver.ckpt_dir, True), (saver.plain_dir, False)):
        out = tmp_path / f"replay-{source.name}"
        results = replay(source, ToyNet(), probe, out, mode=mode, batch_size=8, progress=False)
        assert [(r.step, r.status) for r in results] == [(s, "replayed") for s in steps]
        replayed = open_run(out)
        assert replayed.sites == live.sites
        for site in live.sites:
            assert replayed.steps(site, "probe").tolist() == steps
            for step in steps:
                a, b = live.read(site, step, "probe"), replayed.read(site, step, "probe")
                np.testing.assert_array_equal(b.bits, a.bits, err_msg=f"{source.name}: {site} at step {step}")
                np.testing.assert_array_equal(b.sample_ids, a.sample_ids)
                np.testing.assert_array_equal(b.labels, a.labels)
                assert b.epoch == (a.epoch if epochs else -1)
        if epochs:  # the analysis reads a replayed run as it reads a live one: the same table
            from actpat.analysis import summarize

            pd.testing.assert_frame_equal(summarize(out, progress=False), summarize(cb.run_dir, "probe", progress=False))


class StepOnly(pl.LightningModule):
    """The common style without `forward`: the batch is handled in `training_step`, which logs."""

    def __init__(self) -> None:
        super().__init__()
        self.net = toys.body()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y) * (1 + 0 * self.current_epoch)  # a warm-up would read it
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_lightning_module_without_forward_is_replayed_through_its_training_step_as_the_callback_probed_it(tmp_path):
    probe = toy_data(20, 1)
    cb = ActivationPatternCallback(probe=probe, probe_every=PROBE_EVERY, live_stats=False)
    saver = SaveAtProbeSteps(tmp_path)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_epochs=1, logger=CSVLogger(tmp_path), enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, accelerator="cpu", devices=1, callbacks=[cb, saver],
    )
    trainer.fit(StepOnly(), DataLoader(toy_data(40, 0), batch_size=8, shuffle=True))
    live = open_run(cb.run_dir)
    out = tmp_path / "replayed"
    results = replay(saver.ckpt_dir, StepOnly(), probe, out, batch_size=8, progress=False)
    assert [(r.step, r.status) for r in results] == [(0, "replayed"), (3, "replayed"), (5, "replayed")]
    replayed = open_run(out)
    assert replayed.sites == live.sites == ["net.2", "net.6"]
    for site in live.sites:
        for step in (0, 3, 5):
            np.testing.assert_array_equal(replayed.read(site, step, "probe").bits, live.read(site, step, "probe").bits)


class DictStepOnly(StepOnly):
    """A training_step that wants dict batches, which a probe set of (x, y) pairs does not give."""

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.net(batch["x"]), batch["y"])


def test_a_training_step_that_cannot_take_the_probe_batch_is_an_error_naming_the_replay_option(tmp_path):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    torch.save({"state_dict": _state(DictStepOnly()), "global_step": 2}, ckpts / "a.ckpt")
    with pytest.raises(Exception, match=r"training_step\(batch, 0\)(.|\n)*`forward=` \(`--forward file.py:fn`"):
        replay(ckpts, DictStepOnly(), toy_data(8, 1), tmp_path / "run", batch_size=8, progress=False)


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_checkpoint_that_fails_to_load_is_reported_and_skipped(tmp_path, caplog):
    torch.manual_seed(0)
    model = ToyNet()
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    torch.save({"state_dict": _state(model), "global_step": 3, "epoch": 1}, ckpts / "last.ckpt")
    (ckpts / "step=4.pt").write_bytes(os.urandom(256))  # corrupted
    torch.save([1, 2, 3], ckpts / "list-5.pt")  # not a dict
    torch.save(nn.Linear(3, 3).state_dict(), ckpts / "other-6.pt")  # weights of another model
    torch.save(_state(model), ckpts / "final.pt")  # no step anywhere
    with torch.no_grad():
        model.net[0].weight.mul_(-1)
    torch.save({"model": _state(model), "step": 7}, ckpts / "fabric.pth")  # Fabric's layout
    (ckpts / "notes.txt").write_text("not a checkpoint")
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="actpat"):
        results = replay(ckpts, ToyNet(), toy_data(12, 1), out, batch_size=12, progress=False)
    by_name = {r.path.name: r for r in results}
    assert set(by_name) == {"last.ckpt", "step=4.pt", "list-5.pt", "other-6.pt", "final.pt", "fabric.pth"}
    assert [(r.path.name, r.step) for r in results if r.status == "replayed"] == [("last.ckpt", 3), ("fabric.pth", 7)]
    assert "cannot be loaded" in by_name["step=4.pt"].reason
    assert "hold a dict" in by_name["list-5.pt"].reason
    assert "do not fit ToyNet" in by_name["other-6.pt"].reason and by_name["other-6.pt"].step == 6
    assert "no step" in by_name["final.pt"].reason
    assert sum("skipped" in r.getMessage() for r in caplog.records) == 4
    run = open_run(out)
    assert run.steps("net.6", "probe").tolist() == [3, 7]
    assert run.read("net.6", 3, "probe").epoch == 1
    # Run again (an interrupted replay continues): nothing is recorded twice.
    again = replay(ckpts, ToyNet(), toy_data(12, 1), out, batch_size=12, progress=False)
    assert [r.reason for r in again if r.path.name == "fabric.pth"] == [f"step 7 is recorded in {out} already"]
    assert len(open_run(out).read("net.6", 7, "probe")) == 12


def test_replay_refuses_ambiguous_steps_and_steps_before_the_run_and_names_a_prefix(tmp_path, caplog):
    """Two files of one step: the one whose path sorted first was replayed and the other called 'recorded
    already'. A step before the last one in the run: the recorder's error stopped the whole replay."""
    torch.manual_seed(0)
    model = ToyNet()
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for step in (2, 4, 9):
        torch.save({"state_dict": _state(model), "global_step": step}, ckpts / f"s{step}.ckpt")
    torch.save(nn.Sequential(nn.Linear(3, 3)).state_dict(), ckpts / "a-step_4.pt")  # another file of step 4
    out = tmp_path / "run"
    results = replay(ckpts, ToyNet(), toy_data(12, 1), out, batch_size=12, progress=False)
    by_name = {r.path.name: r for r in results}
    assert [(r.path.name, r.step) for r in results if r.status == "replayed"] == [("s2.ckpt", 2), ("s9.ckpt", 9)]
    for name, other in (("s4.ckpt", "a-step_4.pt"), ("a-step_4.pt", "s4.ckpt")):
        assert by_name[name].status == "skipped" and other in by_name[name].reason and "ambiguous" in by_name[name].reason
    # A checkpoint of an earlier step added later is skipped, with why; the later ones are replayed.
    (ckpts / "a-step_4.pt").unlink()
    torch.save({"state_dict": _state(model), "global_step": 12}, ckpts / "s12.ckpt")
    again = {r.path.name: r for r in replay(ckpts, ToyNet(), toy_data(12, 1), out, batch_size=12, progress=False)}
    assert again["s4.ckpt"].status == "skipped" and "comes before step 9, the last recorded" in again["s4.ckpt"].reason
    assert again["s12.ckpt"].status == "replayed"
    assert open_run(out).steps("net.6", "probe").tolist() == [2, 9, 12]
    # The network alone given for checkpoints of the LightningModule holding it as `net`: the prefix is named.
    caplog.clear()
    (ckpt,) = replay(ckpts / "s2.ckpt", toys.body(), toy_data(12, 1), tmp_path / "bare", batch_size=12, progress=False)
    assert ckpt.status == "skipped" and "carries the prefix 'net.'" in ckpt.reason
    # Only a refusal of torch's safe unpickler suggests --unsafe-load; a damaged file does not.
    (ckpts / "s20.pt").write_bytes(os.urandom(256))
    torch.save({"state_dict": _state(model), "global_step": 21, "note": Path("x")}, ckpts / "s21.ckpt")
    reasons = {r.path.name: r.reason for r in replay(ckpts, ToyNet(), toy_data(12, 1), out, batch_size=12, progress=False)}
    assert "cannot be loaded" in reasons["s20.pt"] and "--unsafe-load" not in reasons["s20.pt"]
    assert "--unsafe-load" in reasons["s21.ckpt"]


@pytest.mark.parametrize(
    "name, step",
    [("epoch=0-step=12.ckpt", 12), ("step_7.pt", 7), ("model-step-0042.pth", 42), ("run3-0099.bin", 99),
     ("STEP=5.ckpt", 5), ("last.ckpt", None), ("best.pt", None)],
)
def test_step_from_the_file_name(name, step):
    assert step_from_name(name) == step


def test_load_checkpoint_reads_every_layout(tmp_path):
    sd = {"w": torch.ones(2)}
    for name, content, step, epoch in (
        ("a.ckpt", {"state_dict": sd, "global_step": 5, "epoch": 2}, 5, 2),
        ("b.pt", sd, None, -1),
        ("c.pt", {"model_state_dict": sd, "step": 9}, 9, -1),
        ("d.pt", {"model": sd}, None, -1),
    ):
        torch.save(content, tmp_path / name)
        state, got_step, got_epoch = load_checkpoint(tmp_path / name)
        assert list(state) == ["w"] and (got_step, got_epoch) == (step, epoch), name


_FACTORIES = '''\
import torch
from torch import nn
from torch.utils.data import TensorDataset


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))

    def forward(self, x):
        return self.body(x)


def model():
    return Net()


def probe_set():
    g = torch.Generator().manual_seed(3)
    return TensorDataset(torch.randn(10, 6, generator=g), torch.randint(0, 2, (10,), generator=g))


def forward(module, batch):
    module(batch[0] * 2)
'''


def test_a_factory_file_imports_the_modules_beside_it(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the folder the load adds is gone after the test
    (tmp_path / "actpat_test_replay_nets.py").write_text(_FACTORIES)
    factories = tmp_path / "sibling_factories.py"
    factories.write_text("from actpat_test_replay_nets import Net\n\n\ndef model():\n    return Net()\n")
    try:
        assert isinstance(resolve(f"{factories}:model", "--module")(), nn.Module)
    finally:
        for name in ("sibling_factories", "actpat_test_replay_nets"):
            sys.modules.pop(name, None)


_INTERRUPTED = _FACTORIES + '''

import os, signal, sys
from actpat.recorder import replay

calls = []


def interrupting(module, batch):
    calls.append(1)
    if len(calls) in CTRL_C_AT:  # the second checkpoint's probe is calls 4-6 (batches of 4: 3 per probe)
        os.kill(os.getpid(), signal.SIGINT)
    module(batch[0])


if __name__ == "__main__":
    # Python's own Ctrl-C handler, as in a terminal: a process started in the background (make, CI) may inherit
    # SIGINT ignored, where replay rightly changes nothing.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ckpts, out, CTRL_C_AT = sys.argv[1], sys.argv[2], [int(call) for call in sys.argv[3:]]
    try:
        replay(ckpts, model(), probe_set(), out, batch_size=4, forward=interrupting, progress=False)
    except KeyboardInterrupt:
        print("STOPPED")
'''


@pytest.mark.parametrize("twice", [False, True])
def test_ctrl_c_during_a_replay_stops_once_the_checkpoint_is_whole_and_a_rerun_completes_the_run(tmp_path, twice):
    script = tmp_path / "interrupted.py"
    script.write_text(_INTERRUPTED)
    namespace: dict = {}
    exec(compile(_FACTORIES, "factories", "exec"), namespace)
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    torch.manual_seed(0)
    net = namespace["model"]()
    for step in (0, 5, 9):
        torch.save(net.state_dict(), ckpts / f"net-step={step}.pt")
        with torch.no_grad():
            net.body[0].weight.add_(0.5)
    out = tmp_path / "run"
    calls = ["5", "6"] if twice else ["5"]
    done = subprocess.run([sys.executable, str(script), str(ckpts), str(out), *calls], capture_output=True,
                          text=True, timeout=300)
    assert "STOPPED" in done.stdout, done.stdout + done.stderr
    assert "stopping once the probe of step 5 is whole" in done.stderr
    # Stopped at once, the step is cut short: said then, not only by a rerun.
    assert ("step 5 was cut short while it was probed" in done.stderr) == twice, done.stderr
    results = replay(ckpts, namespace["model"](), namespace["probe_set"](), out, batch_size=4, progress=False,
                     forward=lambda module, batch: module(batch[0]))
    assert [(r.step, r.status) for r in results] == [(0, "skipped"), (5, "skipped"), (9, "replayed")]
    if twice:  # stopped at once: step 5 is cut short for good, and the rerun says so instead of "recorded already"
        assert "was cut short" in results[1].reason and "new directory" in results[1].reason
        assert [loss.step for loss in open_run(out).losses] == [5]
        return
    whole = tmp_path / "whole"
    replay(ckpts, namespace["model"](), namespace["probe_set"](), whole, batch_size=4, progress=False,
           forward=lambda module, batch: module(batch[0]))
    a, b = open_run(out), open_run(whole)
    assert not a.losses and a.steps("body.1", "probe").tolist() == [0, 5, 9]
    for step in (0, 5, 9):
        np.testing.assert_array_equal(a.read("body.1", step, "probe").bits, b.read("body.1", step, "probe").bits)


def _factory_file(tmp_path: Path, text: str, name: str) -> tuple[Path, dict, Path]:
    """The factories ``text`` as a file for --module and --probe, its namespace, and an empty checkpoint folder."""
    path = tmp_path / name
    path.write_text(text)
    namespace: dict = {}
    exec(compile(text, str(path), "exec"), namespace)
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    return path, namespace, ckpts


def test_command_line_replays_a_directory(tmp_path, capsys, caplog):
    factories, namespace, ckpts = _factory_file(tmp_path, _FACTORIES, "factories.py")
    torch.manual_seed(0)
    net = namespace["model"]()
    for step in (0, 5):
        torch.save(net.state_dict(), ckpts / f"net-step={step}.pt")
        with torch.no_grad():
            net.body[0].weight.add_(0.5)
    out = tmp_path / "run"
    argv = [str(ckpts), "--module", f"{factories}:model", "--probe", f"{factories}:probe_set", "-o", str(out),
            "--batch-size", "4", "--forward", f"{factories}:forward", "--no-progress"]
    assert replay_main(argv) == 0
    assert "replayed 2 of 2 checkpoints" in capsys.readouterr().out
    # Again: each checkpoint is named once, in its warning (the command printed each skip a second time).
    with caplog.at_level(logging.WARNING, logger="actpat"):
        assert replay_main(argv) == 1
    printed = capsys.readouterr()
    assert f"replayed 0 of 2 checkpoints into {out}; 2 skipped, each named in a warning above" in printed.out
    assert "skipped" not in printed.err
    assert sorted(m.split(": ")[1] for m in caplog.messages) == [f"skipped {ckpts / name}" for name in ("net-step=0.pt", "net-step=5.pt")]
    run = open_run(out)
    assert run.sites == ["body.1"] and run.steps("body.1", "probe").tolist() == [0, 5]
    # Independent truth: the saved weights of step 5, inputs doubled by the given forward, packed by numpy.
    reference = namespace["model"]()
    reference.load_state_dict(torch.load(ckpts / "net-step=5.pt"))
    x = namespace["probe_set"]().tensors[0] * 2
    z = reference.body[0](x).detach()
    np.testing.assert_array_equal(run.read("body.1", 5, "probe").bits, np.packbits((z > 0).numpy(), axis=1,
                                                                                    bitorder="little"))
    assert replay_main([str(ckpts), "--module", f"{factories}:nothing", "--probe", f"{factories}:probe_set",
                        "-o", str(out), "--no-progress"]) == 2
    assert "--module" in capsys.readouterr().err
    assert replay_main([str(tmp_path / "missing"), "--module", f"{factories}:model", "--probe",
                        f"{factories}:probe_set", "-o", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


_TOKEN_FACTORIES = '''\
import torch
from torch import nn
from torch.utils.data import DataLoader


def model():
    return nn.Sequential(nn.Linear(3, 6), nn.ReLU())


def sequences():
    g = torch.Generator().manual_seed(5)
    return [torch.randn(2 + i % 3, 3, generator=g) for i in range(7)]


def pad(xs):
    real = nn.utils.rnn.pad_sequence([torch.ones(len(x), dtype=torch.bool) for x in xs], batch_first=True)
    return nn.utils.rnn.pad_sequence(xs, batch_first=True), real


def probe_set():
    return DataLoader(sequences(), batch_size=3, collate_fn=pad)


def forward(module, batch):
    module(batch[0])


def mask(batch):
    return batch[1]


def no_labels(batch):
    return None
'''


def test_command_line_replay_keeps_only_the_real_tokens_with_mask_from(tmp_path):
    factories, namespace, ckpts = _factory_file(tmp_path, _TOKEN_FACTORIES, "tokens.py")
    torch.manual_seed(0)
    net = namespace["model"]()
    torch.save(net.state_dict(), ckpts / "net-step=4.pt")
    out = tmp_path / "run"
    assert replay_main([str(ckpts), "--module", f"{factories}:model", "--probe", f"{factories}:probe_set",
                        "-o", str(out), "--forward", f"{factories}:forward", "--mask-from", f"{factories}:mask",
                        "--labels-from", f"{factories}:no_labels",
                        "--pattern", "channel_last", "--no-progress"]) == 0
    p = open_run(out).read("1", 4, "probe")
    # Brute force: each real token's 6 units, sequence by sequence, from the saved weights.
    z = torch.cat([net[0](x) for x in namespace["sequences"]()]).detach()
    np.testing.assert_array_equal(p.bits, np.packbits((z > 0).numpy(), axis=1, bitorder="little"))
    assert p.positions.tolist() == [t for i in range(7) for t in range(2 + i % 3)]
