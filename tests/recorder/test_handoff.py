"""The hand-off from the recorder to the writer: one queue item per capture, bounded, never a deadlock."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import numpy as np
import torch
from torch import nn

from actpat.recorder import ActivationRecorder, open_run
from actpat.recorder.shards import Record, ShardWriter, SiteMeta

META = SiteMeta(site="s", site_index=0, module_type="ReLU", shape=(16,), n_units=16, pattern="channel")


def _record(step: int) -> Record:
    bits = np.full((5, 2), step % 256, dtype=np.uint8)
    return Record(meta=META, step=step, epoch=0, split="train", bits=bits, n_positions=1, n_samples=5,
                  nan_count=0, labels=np.arange(5), sample_ids=np.arange(5))  # 10 + 40 + 40 bytes


def test_one_capture_is_one_hand_off(tmp_path, monkeypatch):
    calls = []
    original = ShardWriter.put_many

    def counting(self, records):
        calls.append(len(records))
        return original(self, records)

    monkeypatch.setattr(ShardWriter, "put_many", counting)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
    with ActivationRecorder(model, tmp_path) as rec:
        for step in range(3):
            with rec.capture(step):
                model(torch.randn(4, 3))
                model(torch.randn(4, 3))
    assert calls == [6, 6, 6]  # 3 sites x 2 forwards per capture, one hand-off each
    assert open_run(tmp_path).n_observations("1") == 3 * 8


def test_a_batch_larger_than_the_queue_blocks_without_deadlock(tmp_path):
    writer = ShardWriter(tmp_path, max_queue_bytes=200, on_backpressure="block")
    original = writer._buffer
    seen = []

    def slow(record):
        seen.append(writer.queued_bytes)
        time.sleep(0.002)
        original(record)

    writer._buffer = slow
    writer.start()
    done = []
    producer = threading.Thread(target=lambda: done.append(writer.put_many([_record(s) for s in range(30)])))
    producer.start()
    producer.join(timeout=30)
    assert not producer.is_alive(), "put_many blocked on records it had not yet queued"
    writer.close()
    assert done == [30] and writer.dropped_records == 0 and writer.written_records == 30
    assert max(seen) <= 200  # 90-byte records: at most two wait at a time
    run = open_run(tmp_path)
    assert run.steps("s").tolist() == list(range(30))
    assert run.read("s", 29).bits.tolist() == [[29, 29]] * 5


def test_drop_keeps_what_fits_and_counts_the_rest(tmp_path, gated_writer):
    writer, gate = gated_writer(max_queue_bytes=200, on_backpressure="drop")
    assert writer.put_many([_record(s) for s in range(5)]) == 2  # 90 + 90 bytes fit, 270 does not
    gate.set()
    writer.close()
    assert writer.dropped_records == 3 and writer.written_records == 2
    assert open_run(tmp_path).steps("s").tolist() == [0, 1]


def test_a_run_that_dropped_many_steps_warns_once_per_split_and_cause(tmp_path, gated_writer, caplog, capsys):
    # A run under backpressure in drop mode may drop thousands of steps: each is one entry of `losses`, and the
    # warnings name them all at once (they were one log line per step and site).
    writer, gate = gated_writer(max_queue_bytes=200, on_backpressure="drop")
    for step in range(40):
        writer.put_many([dataclasses.replace(_record(step), part=part, ends_step=part == 1) for part in range(2)])
    gate.set()
    writer.close()
    assert writer.written_records == 2 and writer.dropped_records == 78
    caplog.clear()  # (the writer's notice of its drops)
    with caplog.at_level(logging.WARNING, logger="actpat"):
        run = open_run(tmp_path)
    lost = sorted(loss.step for loss in run.losses)
    assert lost == list(range(1, 40)) and {loss.kind for loss in run.losses} == {"incomplete"}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert lines[0].startswith("actpat: records lost in split 'train', 39 incomplete step(s) from 1 to 39, 1 site(s) (s), "
                               "rank(s) 0 (each in `losses`, left out of the analysis): dropped under backpressure"), lines
    from actpat.analysis.cli import main

    for options, listed in (([], 20), (["--all-losses"], 39)):  # `actpat info` lists the first 20 unless asked
        assert main(["info", str(tmp_path), *options]) == 0
        out = capsys.readouterr().out
        assert out.count("\n  incomplete ") == listed and ("... and 19 more (--all-losses lists each)" in out) == (listed == 20)
