"""EIO and an exceeded quota on a block write: the same path as a full disk. The error is seen on the block
that caused it, the shard stays unfinalized, the error reaches the recorder's user, the reason is stored,
and every record read back is exact or reported."""

from __future__ import annotations

import errno
import os
import time

import numpy as np
import pytest
import torch
from torch import nn

from actpat.recorder import ActivationRecorder, RecorderError, open_run


@pytest.mark.parametrize("code", [errno.EIO, errno.EDQUOT])
def test_an_io_error_on_a_block_stops_recording_and_keeps_what_was_finalized(tmp_path, monkeypatch, code):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU())
    x = torch.randn(32, 16)
    truth = {}
    real_pwrite, failing = os.pwrite, []

    def pwrite(fd, data, offset):
        if failing:
            raise OSError(code, os.strerror(code))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    rec = ActivationRecorder(model, tmp_path, max_shard_bytes=2_000)  # a shard every few steps
    with pytest.raises(RecorderError, match=os.strerror(code)):
        with rec:
            for step in range(200):
                if step == 20:
                    # Small shards: the writer finalizes the first ones (its blocks go out every second) ...
                    deadline = time.monotonic() + 60
                    while not list(tmp_path.glob("*.h5")) and time.monotonic() < deadline:
                        time.sleep(0.05)
                    finalized = list(tmp_path.glob("*.h5"))
                    failing.append(True)  # ... then the disk fails
                with rec.capture(step):
                    model(x)
                truth[step] = np.packbits((x @ model[0].weight.T + model[0].bias > 0).numpy(), axis=1,
                                          bitorder="little")  # fmt: skip
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    assert finalized and set(finalized) <= set(tmp_path.glob("*.h5"))  # never touched again
    run = open_run(tmp_path)
    steps = run.steps("1").tolist()
    assert len(steps) >= 5 and max(steps) < 200  # recording stopped at the failing block
    for step in steps:  # exact, or reported lost
        p = run.read("1", step)
        if len(p) and not p.lost_records:
            np.testing.assert_array_equal(p.bits, truth[step])
    assert any(os.strerror(code) in stop.reason for stop in run.stop_reasons)
    assert list(tmp_path.glob("*.h5.partial"))  # the failing shard is never finalized
