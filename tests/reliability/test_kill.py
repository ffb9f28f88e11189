"""SIGKILL at random points of the writer, including inside block writes: nothing read back is wrong."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from actpat.recorder import open_run, schema


@pytest.mark.parametrize(("seed", "compression"), [(s, None) for s in range(8)] + [(s, "gzip") for s in range(8, 12)])
def test_sigkill_leaves_only_exact_or_reported_records(seed, compression, tmp_path, writer_child, rel, caplog):
    out, log = tmp_path / "run", tmp_path / "sent.txt"
    # Blocks every 10 ms and shards of ~40 KB: kills land inside block writes, flushes and finalizes.
    argv = writer_child(out, log, write_seconds=0.01, max_shard_bytes=40_000, compression=compression)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "started", proc.stderr.read()[-2000:]
        time.sleep(np.random.default_rng(seed).uniform(0.05, 0.8))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    sent = [int(line) for line in log.read_text().split()]
    assert sent, "the child sent nothing before it was killed"
    # The session's marks: never closed, and holding the last step queued, written before its records could be.
    (marks,) = out.glob("*" + schema.MARKS_SUFFIX)
    marks = schema.read_marks(marks)
    assert not marks.closed and max(sent) <= marks.queued["train"] <= max(sent) + 1

    with caplog.at_level(logging.WARNING, logger="actpat"):
        run = open_run(out)  # never raises, whatever state the open shard was left in
        read, lost = rel.check_exact_or_reported(run)
    # Every finalized shard is complete; what was lost is only the open shard's tail.
    finalized_steps = set()
    for info in run.shard_infos:
        assert info.format_version == schema.FORMAT_VERSION
    for site in run.sites if run.splits else []:  # a kill before the first verified record: sites, no split
        finalized_steps |= set(run.steps(site).tolist())
    assert finalized_steps <= set(range(marks.queued["train"] + 1))  # nothing invented (a step may be sent, unlogged)
    assert all(loss.kind in ("unwritten", "corrupt", "unreadable") for loss in run.losses)
    assert read > 0 or not list(out.glob("*.h5"))
    if seed == 0 and read:
        # The command line takes the killed run as it is: info says what was lost, analyze measures what is left.
        from actpat.analysis.cli import main

        assert main(["info", str(out)]) == 0
        assert main(["analyze", str(out), "-o", str(tmp_path / "m.csv"), "--no-progress",
                     "--no-information-plane"]) == 0
        assert (tmp_path / "m.csv").stat().st_size > 0


PROBE_CHILD = """
import sys, time
import torch
from torch import nn
from torch.utils.data import TensorDataset
from actpat.recorder import Prober, shards

shards._WRITE_SECONDS = 0.01  # each batch's records reach the disk at once
torch.manual_seed(0)
probe = TensorDataset(torch.randn(20, 4), torch.randint(0, 3, (20,)))
calls = []

def forward(module, batch):
    calls.append(1)
    if len(calls) == 5 + 3:  # the third of the second probe's five batches
        print("hanging", flush=True)
        time.sleep(600)
    return module(batch[0])

prober = Prober(nn.Sequential(nn.Linear(4, 6), nn.ReLU()), probe, sys.argv[1], 1, batch_size=4, forward=forward)
prober.maybe(0)
prober.maybe(1)
"""


def test_a_kill_in_the_middle_of_a_probe_leaves_its_step_reported_incomplete(tmp_path):
    script, out = tmp_path / "probe_child.py", tmp_path / "run"
    script.write_text(PROBE_CHILD)
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "hanging", proc.stderr.read()[-2000:]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until both batches before the hang can be read back
            run = open_run(out)
            if run.splits and 1 in run.steps("1").tolist() and len(run.read("1", 1)) == 8:
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    run = open_run(out)
    assert [(loss.site, loss.step, loss.kind) for loss in run.losses] == [("1", 1, "incomplete")]
    first, cut = run.read("1", 0), run.read("1", 1)
    assert (len(first), first.lost_records) == (20, 0)
    assert (len(cut), cut.lost_records) == (8, 1)  # the 8 samples there are kept, the step flagged
