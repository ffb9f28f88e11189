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


def _write_logged(tmp_path, monkeypatch, rel, compression, blocks: int, steps_per_block: int):
    """Write ``blocks`` blocks; returns the writes (``(offset, bytes)`` or ``(size, None)`` for a
    truncate) and, per block, how many writes had been made when its records flush returned."""
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
    for block in range(blocks):  # the writer thread's work, in this thread: blocks fall where the test says
        for step in range(block * steps_per_block, (block + 1) * steps_per_block):
            for i, meta in enumerate(metas):
                e = rel.expected(i, step)
                writer._buffer(Record(meta, step, 0, "train", e["bits"], len(e["bits"]) // len(e["labels"]),
                                      len(e["labels"]), 0, sample_ids=e["sample_ids"], labels=e["labels"]))  # fmt: skip
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
    writes, committed = _write_logged(tmp_path, monkeypatch, rel, compression, 10, steps_per_block)
    assert len(writes) > committed[0] + 50  # enough crash points to mean something
    image = bytearray()
    name = schema.shard_name(0, 0, partial=True)
    checked = 0
    for n_done, (offset, data) in enumerate(writes, start=1):
        if data is None:
            del image[offset:]
            image.extend(bytes(max(0, offset - len(image))))
        else:
            image.extend(bytes(max(0, offset + len(data) - len(image))))
            image[offset : offset + len(data)] = data
        blocks_done = sum(1 for mark in committed if mark <= n_done)
        if not blocks_done:
            continue
        crashed = tmp_path / f"crash{n_done}"
        crashed.mkdir()
        (crashed / name).write_bytes(image)
        with caplog.at_level(logging.ERROR, logger="actpat"):
            run = open_run(crashed)
            rel.check_exact_or_reported(run)  # nothing read back is wrong
            flushed = range(blocks_done * steps_per_block)
            kept = sum(1 for site, *_ in rel.SITES for step in flushed if len(run.read(site, step)))
            run.close()
        assert kept == len(rel.SITES) * len(flushed), f"flushed records lost by a crash after write {n_done}"
        checked += 1
    assert checked == len(writes) - committed[0] + 1
