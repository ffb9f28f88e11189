"""ShardWriter: compression, rollover, bounded queue under a slow writer, and crash safety (SIGKILL)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from actpat.recorder import ActivationRecorder, RecorderError, open_run, schema
from actpat.recorder.shards import Record, ShardWriter, SiteMeta

META = SiteMeta(site="a/b", site_index=0, module_type="ReLU", shape=(11,), n_units=11, pattern="channel")


def _record(step, rows=5, seed=0):
    rng = np.random.default_rng([seed, step])
    bits = rng.integers(0, 256, (rows, 2), dtype=np.uint8)
    bits[:, 1] &= 0b111  # 11 units: padding bits are 0
    return Record(
        meta=META, step=step, epoch=0, split="train", bits=bits, n_positions=1, n_samples=rows,
        nan_count=0, labels=np.arange(rows) % 3, sample_ids=np.arange(rows) + 10 * step,
    )


@pytest.mark.parametrize("compression", [None, "lzf", "gzip"])
def test_writer_round_trip_and_schema(compression, tmp_path):
    writer = ShardWriter(tmp_path, compression=compression)
    with pytest.raises(RecorderError, match="start"):
        writer.put(_record(0))
    writer.start()
    records = [_record(step) for step in range(4)]
    for record in records:
        assert writer.put(record)
    writer.close()
    writer.close()  # idempotent
    assert writer.written_records == 4 and writer.queued_bytes == 0
    (path,) = writer.finalized
    assert path.name == "patterns-rank000-00000.h5"
    with h5py.File(path, "r") as handle:
        assert handle.attrs["format"] == schema.FORMAT_NAME
        assert handle.attrs["format_version"] == schema.FORMAT_VERSION
        assert bool(handle.attrs["finalized"]) and handle.attrs["dropped_records"] == 0
        group = handle["sites"]["a%2Fb"]  # "/" in a site name is escaped, not a nested group
        assert group.attrs["site"] == "a/b" and group.attrs["bit_order"] == "little"
        assert group["bits"].compression == compression
        assert len(group["records"]) == 4
    run = open_run(tmp_path)
    assert run.sites == ["a/b"] and run.site_info("a/b")["shape"] == (11,)
    for record in records:
        got = run.read("a/b", record.step)
        np.testing.assert_array_equal(got.bits, record.bits)
        np.testing.assert_array_equal(got.labels, record.labels)
        np.testing.assert_array_equal(got.sample_ids, record.sample_ids)


def test_rollover_finalizes_numbered_shards(tmp_path):
    writer = ShardWriter(tmp_path, max_shard_bytes=200)  # each record is 10 + 40 + 40 = 90 bytes
    writer.start()
    for step in range(9):
        writer.put(_record(step))
    writer.close()
    names = sorted(p.name for p in tmp_path.glob("*.h5"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names + ["patterns-rank000-00000.queued.json"])
    assert names == [f"patterns-rank000-{i:05d}.h5" for i in range(3)]
    assert [p.name for p in writer.finalized] == names
    for name in names:
        with h5py.File(tmp_path / name, "r") as handle:
            assert bool(handle.attrs["finalized"])
            assert len(handle["sites"]["a%2Fb"]["records"]) == 3
    run = open_run(tmp_path)
    assert run.steps("a/b").tolist() == list(range(9))
    for step in range(9):
        np.testing.assert_array_equal(run.read("a/b", step).bits, _record(step).bits)


# ---------------------------------------------------------------------------- backpressure
def _slow_writer(monkeypatch, delay):
    """Slow ShardWriter._buffer down and log the queued bytes the writer thread sees."""
    seen = {"queued": [], "record": []}
    original = ShardWriter._buffer

    def slow_write(self, record):
        seen["queued"].append(self.queued_bytes)
        seen["record"].append(record.nbytes)
        time.sleep(delay)
        original(self, record)

    monkeypatch.setattr(ShardWriter, "_buffer", slow_write)
    return seen


def _produce(rec, model, n_steps, x, y):
    peak = 0
    for step in range(n_steps):
        with rec.capture(step, labels=y):
            model(x)
        peak = max(peak, rec.writer.queued_bytes)
    return peak


def test_hand_offs_made_while_the_writer_waits_wake_it_once_and_close_ends_its_wait(tmp_path, monkeypatch):
    # A wake-up of the writer thread per step costs a small model's step more than the step's writing: having
    # emptied its queue, the writer waits before taking records again (here 30 s), and close() ends that wait.
    from actpat.recorder import shards

    monkeypatch.setattr(shards, "_HANDOFF_SECONDS", 30.0)
    writer = ShardWriter(tmp_path)
    writer.start()
    queue, taken, waiting = writer._queue, [], threading.Event()

    class CountingQueue:
        def put(self, item):
            queue.put(item)

        def get(self, *args, **kwargs):
            item = queue.get(*args, **kwargs)
            taken.append(item)
            return item

        def empty(self):
            return queue.empty()

    class WatchedEvent(threading.Event):
        def wait(self, timeout=None):
            waiting.set()
            return super().wait(timeout)

    # (a get() the writer thread began before the swap takes the first hand-off uncounted)
    writer._queue, writer._wake = CountingQueue(), WatchedEvent()
    records = [_record(step) for step in range(20)]
    writer.put_many(records[:1])
    assert waiting.wait(10), "the writer never waited after emptying its queue"
    taken_at_wait = len(taken)
    for record in records[1:]:
        writer.put_many([record])
        time.sleep(0.002)  # the GIL free for the writer thread, which the old writer took at each hand-off
    taken_before_close = len(taken)
    start = time.perf_counter()
    writer.close()
    assert time.perf_counter() - start < 10
    assert taken_before_close == taken_at_wait, (taken_at_wait, taken_before_close)
    run = open_run(tmp_path)
    assert run.steps("a/b").tolist() == list(range(20)) and not run.losses
    for record in records:
        np.testing.assert_array_equal(run.read("a/b", record.step).bits, record.bits)


@pytest.mark.parametrize("on_backpressure", ["block", "drop"])
def test_a_queue_filling_past_half_ends_the_writers_wait(tmp_path, monkeypatch, on_backpressure):
    # With a queue of three records, waiting out its pause (here 30 s) the writer would stall a blocked producer,
    # or leave a dropping one no room, while it idles.
    from actpat.recorder import shards

    monkeypatch.setattr(shards, "_HANDOFF_SECONDS", 30.0)
    records = [_record(step) for step in range(20)]
    writer = ShardWriter(tmp_path, max_queue_bytes=3 * records[0].nbytes, on_backpressure=on_backpressure)
    writer.start()
    for record in records:
        writer.put_many([record])
        # The writer, woken, takes what it was woken for (a loaded machine may take a while; its wait would be 30 s).
        deadline = time.perf_counter() + 10
        while 2 * writer._queued_bytes > writer.max_queue_bytes:
            assert time.perf_counter() < deadline, "the writer idled with its queue past half full"
            time.sleep(0.001)
    writer.close()
    assert writer.dropped_records == 0
    run = open_run(tmp_path)
    assert run.steps("a/b").tolist() == list(range(20)) and not run.losses


@pytest.mark.parametrize("end", ["release", "close", "discard_held"])
def test_held_records_are_written_in_order_once_released_or_not_at_all_once_discarded(tmp_path, end):
    writer = ShardWriter(tmp_path)
    writer.start()
    writer.put(_record(0))
    writer.hold()
    for step in (1, 2, 3):
        assert writer.put(_record(step))
    if end == "discard_held":
        assert writer.discard_held() == 3
    elif end == "release":
        writer.release()
        writer.put(_record(4))
    writer.close()
    run = open_run(tmp_path)
    written = {"release": [0, 1, 2, 3, 4], "close": [0, 1, 2, 3], "discard_held": [0]}[end]
    assert run.steps("a/b").tolist() == written and not run.losses  # nor marked as queued and lost
    for step in written:
        np.testing.assert_array_equal(run.read("a/b", step).bits, _record(step).bits)


def test_records_held_and_discarded_leave_a_new_directory_empty(tmp_path):
    writer = ShardWriter(tmp_path / "run")
    writer.start()
    writer.hold()
    writer.put(_record(0))
    writer.discard_held()
    writer.close()
    assert not list((tmp_path / "run").iterdir())


def test_block_bounds_the_queue_and_loses_nothing(tmp_path, monkeypatch):
    seen = _slow_writer(monkeypatch, 0.004)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU())
    x, y = torch.randn(64, 8), torch.arange(64)
    max_queue = 4096
    with ActivationRecorder(model, tmp_path, max_queue_bytes=max_queue, on_backpressure="block") as rec:
        start = time.perf_counter()
        peak = _produce(rec, model, 40, x, y)
        produced_in = time.perf_counter() - start
    record_bytes = max(seen["record"])
    assert record_bytes == 64 * 8 + 64 * 8  # bits (64 rows x 8 bytes) + labels; no sample_ids given
    assert max(max(seen["queued"]), peak) <= max_queue + record_bytes
    assert produced_in > 0.004 * (40 - max_queue // record_bytes - 1)  # training waited for the writer
    assert rec.dropped_records == 0 and rec.writer.written_records == 40
    assert open_run(tmp_path).steps("1").tolist() == list(range(40))


def test_drop_counts_stores_and_warns_once(tmp_path, monkeypatch, caplog):
    seen = _slow_writer(monkeypatch, 0.01)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU())
    x, y = torch.randn(64, 8), torch.arange(64)
    max_queue = 4096
    n_steps = 60
    with caplog.at_level(logging.WARNING, logger="actpat"):
        with ActivationRecorder(
            model, tmp_path, max_queue_bytes=max_queue, on_backpressure="drop", max_shard_bytes=3000
        ) as rec:
            peak = _produce(rec, model, n_steps, x, y)
    assert max(max(seen["queued"]), peak) <= max_queue + max(seen["record"])
    dropped = rec.dropped_records
    assert dropped > 0 and dropped + rec.writer.written_records == n_steps
    assert sum("dropped" in r.getMessage() for r in caplog.records) == 1
    per_shard = []
    for path in sorted(tmp_path.glob("*.h5")):
        with h5py.File(path, "r") as handle:
            per_shard.append(int(handle.attrs["dropped_records"]))
    assert len(per_shard) > 1 and sum(per_shard) == dropped
    run = open_run(tmp_path)
    assert run.dropped_records == dropped
    # Each dropped record left an empty one numbered after it: its step is listed, and read as incomplete.
    assert len(run.steps("1")) == n_steps
    assert sum(run.read("1", step).lost_records for step in range(n_steps)) == dropped


def test_drop_count_kept_when_last_shard_was_already_finalized(tmp_path, gated_writer):
    # Drops counted while no shard is open (right after a rollover) must not be lost.
    writer, gate = gated_writer(max_shard_bytes=1, on_backpressure="drop", max_queue_bytes=100)
    assert writer.put(_record(0))  # written into shard 0, which then rolls over (1-byte shards)
    assert not writer.put(_record(1))  # queue full: dropped while shard 0 is still open or finalized
    assert not writer.put(_record(2))
    gate.set()
    writer.close()
    assert writer.dropped_records == 2
    assert open_run(tmp_path).dropped_records == 2


def test_writer_error_unblocks_producers(tmp_path):
    writer = ShardWriter(tmp_path, max_queue_bytes=100)

    def broken(record):
        time.sleep(0.05)
        raise OSError("no space left on device")

    writer._buffer = broken
    writer.start()
    writer.put(_record(0))
    with pytest.raises(RecorderError, match="no space left"):
        for step in range(1, 20):
            writer.put(_record(step))  # blocks on the full queue until the writer's error is seen
    with pytest.raises(RecorderError):
        writer.close()


# ---------------------------------------------------------------------------- crash
CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    import torch
    from torch import nn
    from actpat.recorder import ActivationRecorder

    out, truth = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 10), nn.ReLU())
    rec = ActivationRecorder(model, out, max_shard_bytes=1500, compression=None)
    rec.open()
    step = 0
    while True:
        x = torch.randn(4, 1, 6, 6)
        with torch.no_grad():  # the truth, computed by calling the submodules, saved before recording
            z1 = model[0](x)
            z4 = model[3](torch.relu(z1).flatten(1))
        tmp = os.path.join(truth, f"tmp-{step}.npz")
        np.savez(tmp, z1=z1.numpy(), z4=z4.numpy())
        os.replace(tmp, os.path.join(truth, f"step-{step}.npz"))
        with rec.capture(step, sample_ids=torch.arange(4) + 4 * step):
            model(x)
        step += 1
        time.sleep(0.002)
    """
)


def test_sigkill_mid_run_leaves_finalized_shards_exact(tmp_path, caplog, truth):
    out, truth_dir = tmp_path / "run", tmp_path / "truth"
    truth_dir.mkdir()
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(out), str(truth_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_dir() and len(list(out.glob("*.h5"))) >= 4:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert len(list(out.glob("*.h5"))) >= 4, "the subprocess finalized too few shards in 60 s"
        time.sleep(0.03)  # let it run on: the kill lands mid-run, likely with a shard open
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    finalized = sorted(out.glob("*.h5"))
    only_final = tmp_path / "finalized"
    only_final.mkdir()
    for path in finalized:
        shutil.copy(path, only_final / path.name)
    run = open_run(only_final)
    assert run.sites == ["1", "4"]
    for site, key in (("1", "z1"), ("4", "z4")):
        steps = run.steps(site).tolist()
        assert steps == list(range(len(steps))) and len(steps) >= 4  # every earlier record, in order
        for step in steps:
            z = torch.from_numpy(np.load(truth_dir / f"step-{step}.npz")[key])
            got = run.read(site, step)
            np.testing.assert_array_equal(truth.unpack(got.bits, got.n_units), truth.channel(z))
            np.testing.assert_array_equal(np.unique(got.sample_ids), np.arange(4) + 4 * step)

    with caplog.at_level(logging.WARNING, logger="actpat"):
        full = open_run(out)  # never raises, whatever state the open shard was left in
    partials = list(out.glob("*.partial"))
    if partials:
        assert any(partials[0].name in r.getMessage() for r in caplog.records)
    for site in full.sites:
        assert set(run.steps(site).tolist()) <= set(full.steps(site).tolist())
        for step in full.steps(site).tolist():
            assert len(full.read(site, step)) > 0


# ---------------------------------------------------------------------------- codecs
@pytest.mark.parametrize("compression", [*schema.CODECS, "none"])  # "none": the shards' name for None
def test_every_codec_round_trips_and_is_named_in_the_shard(compression, tmp_path):
    writer = ShardWriter(tmp_path, compression=compression)
    writer.start()
    for step in range(3):
        writer.put(_record(step, rows=300))
    writer.close()
    (path,) = writer.finalized
    with h5py.File(path, "r") as handle:
        assert handle.attrs["compression"] == (compression or "none")
    run = open_run(tmp_path)
    for step in range(3):
        np.testing.assert_array_equal(run.read("a/b", step).bits, _record(step, rows=300).bits)


def test_unknown_codec_and_missing_plugin_are_clear_errors(tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match=r"Expected `compression` to be one of .*'zstd'.*but got 'snappy'"):
        ShardWriter(tmp_path, compression="snappy")
    writer = ShardWriter(tmp_path, compression="zstd")
    writer.start()
    writer.put(_record(0))
    writer.close()
    monkeypatch.setitem(sys.modules, "hdf5plugin", None)  # as if the extra were not installed
    with pytest.raises(ImportError, match=r"actpat\[codecs\]"):
        ShardWriter(tmp_path, compression="lz4")
    with pytest.raises(ImportError, match=r"patterns-rank000-00000.h5 \(compressed with 'zstd'\).*actpat\[codecs\]"):
        open_run(tmp_path)
    # The command line says it in one line, as its other errors.
    from actpat.analysis.cli import main

    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("actpat info: error: ") and "actpat[codecs]" in err and "Traceback" not in err


# ---------------------------------------------------------------------------- sites shared by recorders
def test_recorders_sharing_a_writer_must_describe_a_site_alike(tmp_path):
    writer = ShardWriter(tmp_path)
    writer.start()
    writer.put(_record(0))
    wider = SiteMeta("a/b", 0, "ReLU", (12,), 12, "channel")
    with pytest.raises(ValueError, match="'a/b'.*11 units.*12.*separate `out_dir`"):
        writer.register_site(wider)
    with_values = SiteMeta("a/b", 5, "ReLU", (11,), 11, "channel", value_units=(0, 3))
    assert writer.register_site(with_values).value_units == (0, 3)  # values may join a site without them
    assert writer.register_site(with_values).site_index == 0  # the first description is kept
    with pytest.raises(ValueError, match=r"values of the same units.*\[0, 3\].*\[1, 2\].*`store_values`"):
        writer.register_site(SiteMeta("a/b", 0, "ReLU", (11,), 11, "channel", value_units=(1, 2)))
    writer.close()


# ---------------------------------------------------------------------------- stop reasons
def test_stop_reasons_go_into_the_last_shard_or_a_side_file(tmp_path):
    writer = ShardWriter(tmp_path)
    writer.start()
    writer.put(_record(0))
    writer.record_stop("the probe at step 3 failed: ValueError('x')")
    writer.close()
    with h5py.File(writer.finalized[-1], "r") as handle:
        assert handle.attrs["stop_reason"] == "the probe at step 3 failed: ValueError('x')"
    writer.record_stop("after close\nwith a newline")  # nothing open: a side file
    (side,) = tmp_path.glob("*.stop.txt")
    assert side.name == schema.stop_name(0, 1)
    run = open_run(tmp_path)
    assert [s.reason for s in run.stop_reasons] == [
        "the probe at step 3 failed: ValueError('x')", "after close\nwith a newline"
    ]
    assert [s.path for s in run.stop_reasons] == [writer.finalized[-1], side]
    side.write_text("")  # a full disk: the side file was created, its reason never written
    assert [s.reason for s in open_run(tmp_path).stop_reasons][-1] == "unknown: the writer could not store why"


def test_a_block_is_written_once_its_bytes_reach_the_bound_without_waiting_for_the_deadline(tmp_path, monkeypatch):
    from actpat.recorder import shards

    record_bytes = _record(0).nbytes
    monkeypatch.setattr(shards, "_WRITE_SECONDS", 3600.0)
    monkeypatch.setattr(shards, "_WRITE_BYTES", 3 * record_bytes)
    writer = ShardWriter(tmp_path)
    writer.start()
    for step in range(7):
        writer.put(_record(step))
    deadline = time.monotonic() + 10
    while writer.written_records < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert writer.written_records == 6  # two full blocks; the seventh record waits for more or for close
    writer.close()
    assert writer.written_records == 7
    run = open_run(tmp_path)
    assert run.steps("a/b").tolist() == list(range(7))
    for step in range(7):
        np.testing.assert_array_equal(run.read("a/b", step).bits, _record(step).bits)


def test_a_failed_block_is_never_retried_and_its_shard_never_finalized(tmp_path, monkeypatch):
    from actpat.recorder import shards

    attempts = []
    original = shards._Shard.flush

    def failing_flush(self, what):
        attempts.append(what)
        if len(attempts) == 3:  # the second block's data
            self.guarded.error = OSError(28, "No space left on device")
        original(self, what)

    monkeypatch.setattr(shards._Shard, "flush", failing_flush)
    monkeypatch.setattr(shards, "_WRITE_SECONDS", 0.0)
    writer = ShardWriter(tmp_path)
    writer.start()
    writer.put(_record(0))
    deadline = time.monotonic() + 10
    while len(attempts) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    writer.put(_record(1))
    with pytest.raises(RecorderError, match=r"No space left on device.*0 shard\(s\) finalized"):
        for step in range(2, 50):
            writer.put(_record(step))
            time.sleep(0.01)
    with pytest.raises(RecorderError):
        writer.close()
    assert len(attempts) == 3  # no flush after the failure: not of the block, not of a finalize
    assert not list(tmp_path.glob("*.h5")) and len(list(tmp_path.glob("*.h5.partial"))) == 1
    run = open_run(tmp_path)
    assert run.steps("a/b").tolist() == [0]  # the block written before the failure is read back
    assert "No space left on device" in run.stop_reasons[0].reason


def test_readme_checksum_recipe_verifies_a_record_with_plain_h5py(tmp_path):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    recipe = readme.split("With plain h5py, for a record without subsampling or values:\n\n```python\n")[1]
    recipe = recipe.split("```")[0]
    writer = ShardWriter(tmp_path)
    writer.start()
    bits = np.random.default_rng(0).integers(0, 256, (5, 2), dtype=np.uint8) & [255, 7]
    writer.put(Record(SiteMeta("fc.relu", 0, "ReLU", (11,), 11, "flat"), 3, 0, "probe", bits.astype(np.uint8), 1, 5, 0,
                      labels=np.arange(5)))  # fmt: skip
    writer.close()
    exec(recipe, {"path": str(writer.finalized[0])})  # its asserts hold
    with h5py.File(writer.finalized[0], "r+") as handle:
        labels = handle["sites"]["fc.relu"]["labels"]
        labels[2] = 7
    with pytest.raises(AssertionError):
        exec(recipe, {"path": str(writer.finalized[0])})


def test_finalize_fsyncs_the_file_before_naming_it_and_the_directory_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def link(source, target):
        events.append(("link", str(target)))
        real_link(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    writer = ShardWriter(tmp_path)
    writer.start()
    writer.put(_record(0))
    writer.close()
    (final,) = writer.finalized
    partial = str(final) + ".partial"
    assert events == [("fsync", partial), ("link", str(final)), ("fsync", str(tmp_path))]


def test_verify_checks_every_record_without_reading_it_first(tmp_path):
    writer = ShardWriter(tmp_path)
    writer.start()
    for step in range(3):
        writer.put(_record(step))
    writer.close()
    (path,) = writer.finalized
    with h5py.File(path, "r+") as handle:
        bits = handle["sites"]["a%2Fb"]["bits"]
        bits[6] = bits[6] ^ 4  # row 1 of step 1
    run = open_run(tmp_path)
    assert run.corrupt_records == 0  # nothing read yet
    (loss,) = run.verify()
    assert (loss.step, loss.kind, run.corrupt_records) == (1, "corrupt", 1)


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_every_row_and_record_checksum_matches_an_independent_computation(compression, tmp_path, monkeypatch):
    """Records with and without values and subsampling, several per block, over several blocks; the
    subsampling index first appears in the second block (a column created mid-shard)."""
    import zlib

    from actpat.recorder import shards

    monkeypatch.setattr(shards, "_WRITE_SECONDS", 3600.0)
    meta = SiteMeta("conv/relu", 0, "ReLU", (11, 2), 11, "channel", value_units=(0, 4, 9))
    rng = np.random.default_rng(7)
    sent = []
    for step in range(9):
        n, positions = 3 + step % 4, 2
        bits = rng.integers(0, 256, (n * positions, 2), dtype=np.uint8) & np.array([255, 7], dtype=np.uint8)
        obs = np.sort(rng.choice(n * positions, n * positions - 2, replace=False)) if step in (5, 6, 8) else None
        kept = bits if obs is None else bits[obs]
        values = rng.standard_normal((len(kept), 3)).astype(np.float16) if step % 2 else None
        sent.append(Record(meta, step, 1, "train", kept, positions, n, step % 2, sample_ids=np.arange(n) + 100 * step,
                           labels=np.arange(n) % 4, obs_index=obs, values=values))  # fmt: skip
    monkeypatch.setattr(shards, "_WRITE_BYTES", sum(r.nbytes for r in sent[:4]))  # blocks of 4, 4 and 1
    writer = ShardWriter(tmp_path, compression=compression)
    writer.start()
    for record in sent:
        writer.put(record)
    writer.close()
    with h5py.File(writer.finalized[0], "r") as handle:
        group = handle["sites"]["conv%2Frelu"]
        table = group["records"][:]
        columns = {name: group[name][:] for name in ("bits", "sample_ids", "labels", "obs_index", "values")}
    assert len(table) == len(sent)
    for row, record in zip(table, sent):
        header = b"actpat-record\0conv/relu\0channel\0" + (11).to_bytes(8, "little")
        if record.values is not None:
            header += b"".join(u.to_bytes(8, "little") for u in (0, 4, 9))
        plain = np.array([row], dtype=table.dtype)
        plain["row_crc32"] = plain["crc32"] = 0
        assert zlib.crc32(plain.tobytes(), zlib.crc32(header)) == row["row_crc32"]
        data = [columns["bits"][row["row_start"] : row["row_start"] + row["row_count"]],
                columns["sample_ids"][row["sample_start"] : row["sample_start"] + row["sample_count"]],
                columns["labels"][row["sample_start"] : row["sample_start"] + row["sample_count"]]]  # fmt: skip
        np.testing.assert_array_equal(data[0], record.bits)
        np.testing.assert_array_equal(data[1], record.sample_ids)
        if record.obs_index is not None:
            data.append(columns["obs_index"][row["obs_start"] : row["obs_start"] + row["row_count"]])
            np.testing.assert_array_equal(data[-1], record.obs_index)
        else:
            assert row["obs_start"] == -1
        if record.values is not None:
            data.append(columns["values"][row["value_start"] : row["value_start"] + row["row_count"]])
            np.testing.assert_array_equal(data[-1], record.values)
        else:
            assert row["value_start"] == -1
        crc = int(row["row_crc32"])
        for array in data:
            crc = zlib.crc32(np.ascontiguousarray(array).tobytes(), crc)
        assert crc == row["crc32"]
        assert (row["step"], row["epoch"], row["nan_count"], row["n_positions"]) == (record.step, 1, record.step % 2, 2)
    assert open_run(tmp_path).verify() == []


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_a_block_whose_only_record_has_no_rows_reads_back(compression, tmp_path, monkeypatch):
    from actpat.recorder import shards

    monkeypatch.setattr(shards, "_WRITE_SECONDS", 0.0)  # every record its own block
    writer = ShardWriter(tmp_path, compression=compression)
    writer.start()
    writer.put(_record(0, rows=100))
    deadline = time.monotonic() + 10
    while writer.written_records < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    writer.put(_record(1, rows=0))
    writer.close()
    run = open_run(tmp_path)
    assert run.verify() == [] and run.steps("a/b").tolist() == [0, 1]
    np.testing.assert_array_equal(run.read("a/b", 0).bits, _record(0, rows=100).bits)
    assert len(run.read("a/b", 1)) == 0 and run.read("a/b", 1).lost_records == 0


def test_staging_stays_within_its_bound_across_columns(tmp_path, monkeypatch):
    """Columns share one staging buffer: a block of many small records with values stages each column
    in turn, never more than ``_STAGING_BYTES`` in all."""
    from actpat.recorder import shards

    monkeypatch.setattr(shards, "_WRITE_SECONDS", 3600.0)
    monkeypatch.setattr(shards, "_STAGING_BYTES", 64 << 10)
    meta = SiteMeta("v", 0, "ReLU", (8,), 8, "flat", value_units=tuple(range(8)))
    rng = np.random.default_rng(3)
    sent = [Record(meta, step, 0, "train", rng.integers(0, 256, (64, 1), dtype=np.uint8), 1, 64, 0,
                   labels=np.arange(64) % 3, values=rng.standard_normal((64, 8)).astype(np.float16))
            for step in range(100)]  # fmt: skip
    writer = ShardWriter(tmp_path)
    writer.start()
    for record in sent:
        writer.put(record)
    writer.close()
    assert 0 < writer._staging.nbytes <= shards._STAGING_BYTES  # bits 6 KiB, ids and labels 50 KiB, values 100 KiB
    run = open_run(tmp_path)
    for record in sent:
        got = run.read("v", record.step)
        np.testing.assert_array_equal(got.bits, record.bits)
        np.testing.assert_array_equal(got.values, record.values)


def test_a_marks_file_that_cannot_be_updated_is_removed_and_writing_goes_on(tmp_path, monkeypatch, caplog):
    """A stale mark would bound a crash's losses too early: the file goes, the reader falls back to the shards."""
    writer = ShardWriter(tmp_path)
    writer.start()
    pwrite = os.pwrite

    def failing(fd, data, offset):
        if fd == writer._marks_fd and b'"train": 2' in data:
            raise OSError(5, "Input/output error")
        return pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing)
    marks = tmp_path / schema.marks_name(0, 0)
    writer.put(_record(0))
    assert schema.read_marks(marks) == schema.Marks({"train": 0}, False)
    with caplog.at_level(logging.WARNING, logger="actpat"):
        for step in (1, 2, 3):
            writer.put(_record(step))
    assert "could not update this rank's marks file" in caplog.text and not marks.exists()
    writer.close()
    assert open_run(tmp_path).steps("a/b").tolist() == [0, 1, 2, 3]
    assert not marks.exists()


def test_close_interrupted_by_ctrl_c_keeps_the_lock_and_closing_again_waits_for_the_writer(tmp_path):
    writer = ShardWriter(tmp_path)
    writer.start()
    buffer = writer._buffer
    writer._buffer = lambda record: (time.sleep(0.05), buffer(record))  # a writer still busy when close() starts
    for step in range(20):
        writer.put(_record(step))

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(KeyboardInterrupt):
            writer.close()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    with pytest.raises(RecorderError, match="holds"):  # still writing: no second writer yet
        ShardWriter(tmp_path).start()
    thread = writer._thread
    writer.close()  # waits for the writer this time
    assert thread not in threading.enumerate()  # ended (is_alive() may say False of a thread still running)
    assert not list(tmp_path.glob("*.partial"))
    run = open_run(tmp_path)
    assert run.steps("a/b").tolist() == list(range(20)) and run.losses == []
    second = ShardWriter(tmp_path)  # the lock is free now
    second.start()
    second.close()


@pytest.mark.parametrize("failing", ["scan_existing", "thread start"])
def test_a_writer_that_fails_to_start_leaves_no_lock(tmp_path, monkeypatch, failing):
    def fail(*args, **kwargs):
        raise RuntimeError("can't start new thread")

    with monkeypatch.context() as patched:
        if failing == "scan_existing":
            patched.setattr("actpat.recorder.shards.scan_existing", fail)
        else:
            patched.setattr(threading.Thread, "start", fail)
        writer = ShardWriter(tmp_path)
        with pytest.raises(RuntimeError, match="new thread"):
            writer.start()
    writer.close()  # nothing to close, no wait
    second = ShardWriter(tmp_path)
    second.start()
    second.put(_record(0))
    second.close()
    assert open_run(tmp_path).steps("a/b").tolist() == [0]


def _returns_within(seconds, fn):
    done = threading.Event()
    thread = threading.Thread(target=lambda: (fn(), done.set()), daemon=True)
    thread.start()
    return done.wait(seconds)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_close_returns_when_the_writer_thread_fails_at_its_end_and_from_two_threads_at_once(tmp_path):
    def fail(*args):
        raise OSError("disk gone")

    writer = ShardWriter(tmp_path)
    writer.start()
    writer.put(_record(0))
    writer.record_stop("stopped early")
    writer._finalize = writer._write_stop_file = fail  # the end of the writer thread raises
    assert _returns_within(10, lambda: pytest.raises(RecorderError, writer.close))
    other = ShardWriter(tmp_path / "other")
    other.start()
    other.put(_record(0))
    closers = [threading.Thread(target=other.close) for _ in range(2)]
    errors = []
    threading.excepthook, hook = (lambda args: errors.append(args.exc_value)), threading.excepthook
    try:
        for closer in closers:
            closer.start()
        for closer in closers:
            closer.join(10)
    finally:
        threading.excepthook = hook
    assert errors == [] and open_run(tmp_path / "other").steps("a/b").tolist() == [0]


@pytest.mark.parametrize("step, split, error", [
    (0, "validation_dataloader_idx_0_extra_long", r"`split` to be a str of at most 32 bytes.*Use a shorter name"),
    (-1, "train", r"`step` to be at least 0, but got -1"),
    (2.5, "train", r"`step` to be an integer, but got 2.5"),
    (True, "train", r"`step` to be an integer, but got True"),
])  # fmt: skip
def test_a_record_whose_step_or_split_cannot_be_stored_as_given_is_refused_at_put(tmp_path, step, split, error):
    # A longer split would be cut to 32 bytes in the records table and read back as another split.
    writer = ShardWriter(tmp_path)
    writer.start()
    meta = SiteMeta("fc", 0, "ReLU", (8,), 8, "flat")
    with pytest.raises((ValueError, TypeError), match=error):
        writer.put(Record(meta, step, 0, split, np.zeros((1, 1), np.uint8), 1, 1, 0))
    writer.put(Record(meta, np.int64(3), 0, "train", np.zeros((1, 1), np.uint8), 1, 1, 0))  # a numpy integer: stored
    writer.close()
    run = open_run(tmp_path)
    assert run.splits == ["train"] and run.steps("fc").tolist() == [3] and not run.losses


def test_a_marks_file_whose_first_write_fails_is_closed_and_removed(tmp_path, monkeypatch, caplog):
    """A disk that fills as the session starts: the new marks file, empty or cut short (read as damaged), is closed
    and removed with a warning, and recording goes on; the shards read whole, no loss claimed."""
    pwrite, opened = os.pwrite, []
    real_open, real_close, closed = os.open, os.close, []

    def short(fd, data, offset):
        return pwrite(fd, data[:100], offset) if fd in opened else pwrite(fd, data, offset)

    def tracking_open(path, *args, **kwargs):
        fd = real_open(path, *args, **kwargs)
        if str(path).endswith(schema.MARKS_SUFFIX):
            opened.append(fd)
        return fd

    monkeypatch.setattr(os, "pwrite", short)
    monkeypatch.setattr(os, "open", tracking_open)
    monkeypatch.setattr(os, "close", lambda fd: closed.append(fd) or real_close(fd))
    writer = ShardWriter(tmp_path)
    with caplog.at_level(logging.WARNING, logger="actpat"):
        writer.start()
    assert "could not write" in caplog.text and opened and opened[0] in closed
    assert not (tmp_path / schema.marks_name(0, 0)).exists() and writer._marks_fd is None
    for step in range(2):
        writer.put(_record(step))
    writer.close()
    monkeypatch.undo()
    run = open_run(tmp_path)
    assert run.steps("a/b").tolist() == [0, 1] and not run.losses


def test_a_marks_file_whose_close_fails_is_removed_and_the_writer_closes(tmp_path, monkeypatch, caplog):
    """A network file system can report a failed write-back only when the file is closed: the closed marks may not
    have reached it, so the file goes (a warning says so) and the writer's close() returns; the shards read whole."""
    writer = ShardWriter(tmp_path)
    writer.start()
    for step in range(3):
        writer.put(_record(step))
    marks_fd, close = writer._marks_fd, os.close

    def failing(fd):
        close(fd)
        if fd == marks_fd:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "close", failing)
    with caplog.at_level(logging.WARNING, logger="actpat"):
        writer.close()
    monkeypatch.undo()
    assert "closing this rank's marks file failed" in caplog.text
    assert not (tmp_path / schema.marks_name(0, 0)).exists()
    run = open_run(tmp_path)
    assert run.steps("a/b").tolist() == [0, 1, 2] and not run.losses


def test_close_releases_the_run_lock_even_where_closing_the_marks_fails(tmp_path, monkeypatch):
    writer = ShardWriter(tmp_path)
    writer.start()
    writer.put(_record(0))
    monkeypatch.setattr(writer, "_close_marks", lambda closed: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        writer.close()
    second = ShardWriter(tmp_path)
    second.start()  # not refused: the lock was released
    second.close()
