"""A full disk (RLIMIT_FSIZE everywhere; a real 600 KB tmpfs where mounting is allowed), through the
writer and through the Lightning callback: the error is seen on the block that caused it, the shard is
never finalized, the process never crashes, and every record read back is exact or reported."""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from actpat.recorder import open_run

LIMIT = 600_000


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, resource.RLIM_INFINITY))


def test_file_size_limit_through_the_writer(tmp_path, writer_child, rel, caplog):
    out, sent = tmp_path / "run", tmp_path / "sent.txt"
    # A first writer finalizes small shards; a second, with a file size limit, fails in its first shard.
    rc, before, stderr = rel.run_child(writer_child(out, sent, steps=300, max_shard_bytes=40_000))
    assert rc == 0 and before["error"] is None and len(before["finalized"]) >= 2, stderr[-3000:]
    argv = writer_child(out, sent, steps=4000, first_step=300, max_shard_bytes=1 << 30, write_seconds=0.05)
    rc, result, stderr = rel.run_child(argv, preexec_fn=_limit_file_size)
    assert rc == 0, stderr[-3000:]  # no crash at close or exit
    assert "Exception ignored" not in stderr
    assert result["error"] is not None and "File too large" in result["error"], result
    # The message says what stays readable: no shard was finalized by this writer, yet its records are.
    assert "the 0 shard(s) finalized before stay readable, and so do the records of the unfinalized one" in result["error"]
    assert not result["finalized"] and 300 < result["steps"] < 4300  # the failing shard is never finalized
    (partial,) = out.glob("*.h5.partial")
    assert os.path.getsize(partial) <= LIMIT
    assert sorted(p.name for p in out.glob("*.h5")) == before["finalized"]
    with caplog.at_level(logging.WARNING, logger="actpat"):
        run = open_run(out)
    assert f"unfinalized shard {partial} (recording stopped: writing {partial.name} failed" in caplog.text
    read, _ = rel.check_exact_or_reported(run)
    steps = set(run.steps("fc.relu").tolist())
    assert set(range(300)) <= steps and max(steps) >= 300  # what reached the disk before the error is read
    assert read >= 2 * 300
    assert any("File too large" in stop.reason and partial.name in stop.reason for stop in run.stop_reasons)


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare") or sys.platform != "linux":
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True, timeout=30
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="mounting a tmpfs (unshare -rm) is not allowed here")
def test_full_tmpfs_through_the_writer(tmp_path, writer_child, rel):
    mount = tmp_path / "disk"
    mount.mkdir()
    out, check = mount / "run", tmp_path / "check.py"
    check.write_text(textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from conftest import check_exact_or_reported
        from actpat.recorder import open_run
        run = open_run({str(out)!r})
        read, lost = check_exact_or_reported(run)
        print(json.dumps({{"read": read, "partials": len(list(run.path.glob("*.partial"))),
                           "stops": [s.reason for s in run.stop_reasons]}}))
        """
    ))  # fmt: skip
    argv = writer_child(out, tmp_path / "sent.txt", steps=4000, max_shard_bytes=150_000, write_seconds=0.05)
    # The tmpfs lives in a private mount namespace: write and check inside it.
    script = f"mount -t tmpfs -o size={LIMIT} tmpfs {mount} && {' '.join(map(repr, argv))} && {sys.executable} {check}"
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    written, checked = lines[0], lines[1]
    assert written["error"] and "No space left on device" in written["error"], written
    assert written["finalized"] and checked["partials"] == 1 and checked["read"] >= 2 * len(written["finalized"])


CALLBACK_CHILD = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import torch
    import pytorch_lightning as pl
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from actpat.callbacks import ActivationPatternCallback

    out, truth = sys.argv[1], sys.argv[2]

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.fc, self.act, self.head = nn.Linear(16, 512), nn.ReLU(), nn.Linear(512, 3)
            self.act.register_forward_pre_hook(self._tap)
        def _tap(self, module, args):
            if self.training and not torch.is_inference_mode_enabled():
                on = (args[0].detach() > 0).numpy()
                np.save(os.path.join(truth, f"{self.global_step}.npy"), np.packbits(on, axis=1, bitorder="little"))
        def forward(self, x):
            return self.head(self.act(self.fc(x)))
        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(4096, 16), torch.randint(0, 3, (4096,)))
    cb = ActivationPatternCallback(out, batch_every_n_steps=1, on_error="warn", live_stats=False)
    trainer = pl.Trainer(max_steps=120, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Net(), DataLoader(data, batch_size=128, shuffle=True))
    print(json.dumps({"global_step": trainer.global_step}), flush=True)
    """
)


def test_file_size_limit_through_the_callback(tmp_path):
    out, truth = tmp_path / "run", tmp_path / "truth"
    truth.mkdir()
    script = tmp_path / "callback_child.py"
    script.write_text(CALLBACK_CHILD)
    # Small blocks; two small shards, then one that outgrows the file size limit.
    argv = [sys.executable, "-c", (
        "import sys, runpy; from actpat.recorder import recorder, shards; "
        "recorder.ActivationRecorder.__init__.__kwdefaults__['max_shard_bytes'] = 40_000; "
        "shards._WRITE_SECONDS = 0.02; finalize = shards.ShardWriter._finalize\n"
        "def grow(self):\n    finalize(self)\n    self.max_shard_bytes = 40_000 if len(self.finalized) < 2 else 1 << 30\n"
        "shards.ShardWriter._finalize = grow\n"
        f"sys.argv = [{str(script)!r}, {str(out)!r}, {str(truth)!r}]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size)
    assert proc.returncode == 0, proc.stderr[-3000:]  # training went on, no crash
    assert json.loads(proc.stdout.strip().splitlines()[-1])["global_step"] == 120
    assert "activation recording stops" in proc.stderr and "File too large" in proc.stderr
    assert proc.stderr.count("activation recording stops") == 1
    run = open_run(out)
    finalized = list(out.glob("*.h5"))
    assert finalized and list(out.glob("*.partial"))
    read = 0
    for step in run.steps("act").tolist():
        got = run.read("act", step)
        if len(got):
            np.testing.assert_array_equal(got.bits, np.load(truth / f"{step}.npy"), err_msg=f"step {step}")
            read += 1
        else:
            assert any(loss.step == step for loss in run.losses)
    assert read >= 2
    assert any("File too large" in stop.reason for stop in run.stop_reasons)
