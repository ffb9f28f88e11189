"""Two writers on one directory and rank (one process or two), a stale lock, a finalize that would
replace a file, and reading while writing."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

from actpat.recorder import RecorderError, open_run, schema
from actpat.recorder.shards import Record, ShardWriter, SiteMeta


def _put(writer, rel, step):
    for i, (site, n, _, pattern) in enumerate(rel.SITES):
        e = rel.expected(i, step)
        writer.put(Record(SiteMeta(site, i, "ReLU", (n,), n, pattern), step, 0, "train", e["bits"],
                          len(e["bits"]) // len(e["labels"]), len(e["labels"]), 0,
                          sample_ids=e["sample_ids"], labels=e["labels"]))  # fmt: skip


def test_second_writer_in_the_same_process_is_refused(tmp_path, rel):
    first = ShardWriter(tmp_path, rank=2)
    first.start()
    second = ShardWriter(tmp_path / ".", rank=2)  # the same directory under another spelling
    with pytest.raises(RecorderError) as excinfo:
        second.start()
    message = str(excinfo.value)
    assert str(tmp_path) in message and "rank 2" in message and str(os.getpid()) in message
    other_rank = ShardWriter(tmp_path, rank=3)
    other_rank.start()  # another rank is another writer
    other_rank.close()
    _put(first, rel, 0)
    first.close()
    second.start()  # free once the first one closed
    _put(second, rel, 1)
    second.close()
    assert open_run(tmp_path).steps("fc.relu").tolist() == [0, 1]


def test_second_writer_in_another_process_is_refused_and_a_dead_ones_lock_taken_over(tmp_path, writer_child, rel):
    out, log = tmp_path / "run", tmp_path / "sent.txt"
    proc = subprocess.Popen(writer_child(out, log, write_seconds=0.01), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        with pytest.raises(RecorderError) as excinfo:
            ShardWriter(out).start()
        message = str(excinfo.value)
        assert str(out) in message and "rank 0" in message and f"process {proc.pid}" in message
        time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (out / schema.lock_name(0)).exists()  # left behind by the killed writer ...
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("*.h5*")}
    writer = ShardWriter(out)
    writer.start()  # ... and taken over
    _put(writer, rel, 10_000)
    writer.close()
    assert not (out / schema.lock_name(0)).exists()
    for name, digest in before.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest  # nothing rewritten
    (new,) = writer.finalized
    assert schema.parse_shard_name(new.name)[1] == max(schema.parse_shard_name(n)[1] for n in before) + 1
    run = open_run(out)
    rel.check_exact_or_reported(run)
    assert 10_000 in run.steps("fc.relu").tolist()


def test_finalize_never_replaces_an_existing_file(tmp_path, rel):
    writer = ShardWriter(tmp_path)
    writer.start()
    _put(writer, rel, 0)
    deadline = time.monotonic() + 10
    while not list(tmp_path.glob("*.partial")) and time.monotonic() < deadline:
        time.sleep(0.01)
    (partial,) = tmp_path.glob("*.partial")
    squatter = tmp_path / partial.name[: -len(".partial")]
    squatter.write_bytes(b"written by something that ignored the lock")
    with pytest.raises(RecorderError, match="never replaced"):
        writer.close()
    assert squatter.read_bytes() == b"written by something that ignored the lock"
    assert partial.exists()


def test_a_run_opened_while_writing_follows_the_finalized_shard(tmp_path, rel):
    writer = ShardWriter(tmp_path, max_shard_seconds=3600)
    writer.start()
    for step in range(5):
        _put(writer, rel, step)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and writer.written_records < 10:
        time.sleep(0.02)
    run = open_run(tmp_path)  # indexes the .partial
    assert [p.name.endswith(".partial") for p in run.shards] == [True]
    writer.close()  # renames it
    assert not list(tmp_path.glob("*.partial"))
    read, lost = rel.check_exact_or_reported(run)
    assert (read, lost) == (10, 0) and not run.shards[0].name.endswith(".partial")


def test_reading_while_writing_never_raises_nor_returns_wrong_records(tmp_path, rel):
    writer = ShardWriter(tmp_path, max_shard_bytes=20_000)
    writer.start()
    stop = threading.Event()

    def produce():
        step = 0
        while not stop.is_set():
            _put(writer, rel, step)
            step += 1
            time.sleep(0.001)

    thread = threading.Thread(target=produce)
    thread.start()
    reads = 0
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            with open_run(tmp_path) as run:
                if run.sites:
                    reads += rel.check_exact_or_reported(run)[0]
    finally:
        stop.set()
        thread.join()
        writer.close()
    assert reads > 0
    final = open_run(tmp_path)
    read, lost = rel.check_exact_or_reported(final)
    assert lost == 0 and read == 2 * len(final.steps("fc.relu"))
    assert np.array_equal(final.steps("fc.relu"), np.arange(len(final.steps("fc.relu"))))
