"""A crash after every single write of the shard writer: every block flushed before it is read back.

A kill loses what the process had not yet handed to the kernel; every ``pwrite`` that returned is in
the file. So the file a kill can leave is the empty file with some prefix of the writer's writes
applied. The writer is driven block by block in this process with its writes logged, then every such
prefix is rebuilt as a shard on its own and read: each record it returns must be exact, and every
record of a block whose two flushes completed before the prefix ends must be there."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from actpat.recorder import open_run, schema, shards
from actpat.recorder.shards import Record, ShardWriter, SiteMeta


def _write_logged(tmp_path, monkeypatch, rel, compression, blocks: list[list[tuple[int, int, bool]]], parts: int = 1):
    """Write ``blocks`` of ``(step, part, ends_step)`` records (part -1: untracked; the content of part p of
    step s is ``rel.expected(site, s * parts + max(p, 0))``); returns the writes (``(offset, bytes)`` or
    ``(size, None)`` for a truncate) and, per block, how many writes had been made when its records
    flush returned."""
    writes: list[tuple[int, bytes | None]] = []
    write, truncate = shards._GuardedFile.write, shards._GuardedFile.truncate

    def logged_write(self, buffer):
        writes.append((self.pos, bytes(memoryview(buffer).cast("B"))))
        return write(self, buffer)

    def logged_truncate(self, size=None):
        writes.append((self.pos if size is None else size, None))
        return truncate(self, size)

    monkeypatch.setattr(shards._GuardedFile, "write", logged_write)
    monkeypatch.setattr(shards._GuardedFile, "truncate", logged_truncate)
    metas = [SiteMeta(site, i, "ReLU", (n,), n, pattern) for i, (site, n, _, pattern) in enumerate(rel.SITES)]
    (tmp_path / "written").mkdir()
    writer = ShardWriter(tmp_path / "written", compression=compression)
    for meta in metas:
        writer.register_site(meta)
    committed = []
    for block in blocks:  # the writer thread's work, in this thread: blocks fall where the test says
        for step, part, ends_step in block:
            for i, meta in enumerate(metas):
                e = rel.expected(i, step * parts + max(part, 0))
                writer._buffer(Record(meta, step, 0, "train", e["bits"], len(e["bits"]) // len(e["labels"]),
                                      len(e["labels"]), 0, sample_ids=e["sample_ids"], labels=e["labels"],
                                      part=part, ends_step=ends_step))  # fmt: skip
        writer._write_pending()
        committed.append(len(writes))
    writer._shard.abort()  # the process "dies" here: no finalize
    return writes, committed


@pytest.mark.parametrize("compression", [None, "gzip"])
@pytest.mark.parametrize("chunk_bytes", [schema.CHUNK_BYTES, 200], ids=["chunks", "small-chunks"])
def test_a_crash_after_any_write_keeps_every_block_flushed_before_it(
    compression, chunk_bytes, tmp_path, monkeypatch, rel, caplog
):
    # Small chunks: every block also fills chunks and starts new ones.
    monkeypatch.setattr(schema, "CHUNK_BYTES", chunk_bytes)
    steps_per_block = 2
    blocks = [[(step, -1, False) for step in range(b * steps_per_block, (b + 1) * steps_per_block)] for b in range(10)]
    writes, committed = _write_logged(tmp_path, monkeypatch, rel, compression, blocks)
    assert len(writes) > committed[0] + 50  # enough crash points to mean something
    checked = 0
    for n_done, crashed, blocks_done in _crashed_shards(tmp_path, writes, committed):
        with caplog.at_level(logging.ERROR, logger="actpat"):
            run = open_run(crashed)
            rel.check_exact_or_reported(run)  # nothing read back is wrong
            flushed = range(blocks_done * steps_per_block)
            kept = sum(1 for site, *_ in rel.SITES for step in flushed if len(run.read(site, step)))
            run.close()
        assert kept == len(rel.SITES) * len(flushed), f"flushed records lost by a crash after write {n_done}"
        checked += 1
    assert checked == len(writes) - committed[0] + 1


def _crashed_shards(tmp_path, writes, committed):
    """``(n_done, run directory, blocks done)`` of the shard left by a crash after each write from the
    first block's last on."""
    image = bytearray()
    name = schema.shard_name(0, 0, partial=True)
    for n_done, (offset, data) in enumerate(writes, start=1):
        if data is None:
            del image[offset:]
            image.extend(bytes(max(0, offset - len(image))))
        else:
            image.extend(bytes(max(0, offset + len(data) - len(image))))
            image[offset : offset + len(data)] = data
        blocks_done = sum(1 for mark in committed if mark <= n_done)
        if blocks_done:
            crashed = tmp_path / f"crash{n_done}"
            crashed.mkdir()
            (crashed / name).write_bytes(image)
            yield n_done, crashed, blocks_done


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_a_crash_inside_a_step_of_several_records_leaves_it_whole_or_reported(compression, tmp_path, monkeypatch, rel):
    """A probe's batches are records of one step: a crash between them must not pass the step off as whole."""
    parts = 3
    records = [(step, part, part == parts - 1) for step in range(6) for part in range(parts)]
    blocks = [records[i : i + 2] for i in range(0, len(records), 2)]  # block boundaries fall inside steps
    writes, committed = _write_logged(tmp_path, monkeypatch, rel, compression, blocks, parts)
    flagged = 0
    for n_done, crashed, blocks_done in _crashed_shards(tmp_path, writes, committed):
        run = open_run(crashed)
        whole_steps = len([r for block in blocks[:blocks_done] for r in block if r[2]])  # steps whose end flushed
        for i, (site, *_) in enumerate(rel.SITES):
            for step in run.steps(site).tolist():
                got = run.read(site, step)
                if got.lost_records:
                    assert step >= whole_steps, f"flushed step {step} of {site} reported lost after write {n_done}"
                    flagged += 1
                    continue
                truth = np.concatenate([rel.expected(i, step * parts + part)["bits"] for part in range(parts)])
                np.testing.assert_array_equal(got.bits, truth, err_msg=f"{site} step {step} after write {n_done}")
            assert set(range(whole_steps)) <= set(run.steps(site).tolist())
        run.close()
    assert flagged > 0  # some crash points do fall inside a step
