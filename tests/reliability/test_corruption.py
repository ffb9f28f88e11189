"""Flipped bits in data and metadata, wrong records tables and crafted files: every record read back is
exact or reported, errors name the file, and nothing larger than the stored data is allocated."""

from __future__ import annotations

import logging
import shutil
import tracemalloc

import h5py
import numpy as np
import pytest

from actpat.recorder import ShardFormatError, open_run, schema
from actpat.recorder.shards import Record, ShardWriter, SiteMeta

N_STEPS = 6


def _write(out, rel, steps=range(N_STEPS)):
    writer = ShardWriter(out)
    writer.start()
    metas = [SiteMeta(s, i, "ReLU", (n,), n, p) for i, (s, n, _, p) in enumerate(rel.SITES)]
    for step in steps:
        for i, meta in enumerate(metas):
            e = rel.expected(i, step)
            rows_per_sample = len(e["bits"]) // len(e["labels"])
            writer.put(Record(meta, step, 0, "train", e["bits"], rows_per_sample, len(e["labels"]), 0,
                              sample_ids=e["sample_ids"], labels=e["labels"]))  # fmt: skip
    writer.close()
    (shard,) = writer.finalized
    return shard


def _flip(path, offset, bit=3):
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ (1 << bit)]))


def _file_offset(path, site, column, row):
    """Byte offset in the file of the first byte of ``row`` of a site's (uncompressed) column."""
    with h5py.File(path, "r") as handle:
        ds = handle["sites"][schema.site_key(site)][column]
        chunk_rows = ds.chunks[0]
        info = ds.id.get_chunk_info_by_coord((row // chunk_rows * chunk_rows,) + (0,) * (ds.ndim - 1))
        row_bytes = ds.dtype.itemsize * (ds.shape[1] if ds.ndim == 2 else 1)
        return info.byte_offset + (row % chunk_rows) * row_bytes


@pytest.mark.parametrize("column", [schema.BITS, schema.LABELS, schema.SAMPLE_IDS, schema.RECORDS])
def test_one_flipped_bit_on_disk_skips_that_record_with_a_warning(column, tmp_path, rel, caplog):
    shard = _write(tmp_path, rel)
    site, step = "conv/relu", 3
    with h5py.File(shard, "r") as handle:
        entry = handle["sites"][schema.site_key(site)]["records"][step]
    row = {schema.BITS: entry["row_start"] + 5, schema.LABELS: entry["sample_start"] + 1,
           schema.SAMPLE_IDS: entry["sample_start"], schema.RECORDS: step}[column]  # fmt: skip
    # In the records table: a bit of the `row_count` field (the `step` field keeps the step to report).
    within = schema.RECORD_DTYPE.fields["row_count"][1] if column == schema.RECORDS else 0
    _flip(shard, _file_offset(shard, site, column, int(row)) + within)
    with caplog.at_level(logging.WARNING, logger="actpat"):
        run = open_run(tmp_path)
        read, lost = rel.check_exact_or_reported(run)
    assert read == 2 * N_STEPS - 1 and lost == 1 and run.corrupt_records == 1
    (loss,) = run.losses
    message = " ".join(r.getMessage() for r in caplog.records)
    assert shard.name in message and repr(site) in message
    if column == schema.RECORDS:  # the row's own step cannot be trusted: the steps of its sound neighbours
        assert (loss.site, loss.step, loss.steps, loss.path) == (site, None, (step - 1, step + 1), shard)
        assert f"one of steps {step - 1}..{step + 1}" in message
        assert run.read(site, step - 1).lost_records == run.read(site, step + 1).lost_records == 1
        assert run.read(site, step - 2).lost_records == 0
    else:
        assert (loss.site, loss.step, loss.path) == (site, step, shard) and f"step {step}" in message
    # A record whose table row is damaged is not indexed; one whose data is damaged reads as empty.
    assert step not in run.steps(site) if column == schema.RECORDS else len(run.read(site, step)) == 0
    assert run.corrupt_records == 1  # reading it again neither raises nor counts it twice


@pytest.mark.parametrize("field", ["row_start", "row_count", "n_positions", "sample_count", "sample_start", "step"])
def test_wrong_records_table_values_are_never_read_as_data(field, tmp_path, rel):
    shard = _write(tmp_path, rel)
    with h5py.File(shard, "r+") as handle:
        records = handle["sites"][schema.site_key("conv/relu")]["records"]
        row = records[2]
        row[field] = {"row_count": row[field] - 8, "n_positions": 4, "step": 99}.get(field, row[field] + 1)
        records[2] = row
    run = open_run(tmp_path)
    read, lost = rel.check_exact_or_reported(run)
    assert read == 2 * N_STEPS - 1 and lost == 1 and run.losses[0].site == "conv/relu"


def _used_bytes(path):
    """File offsets that hold something: metadata (outside every chunk) and the written part of chunks."""
    size = path.stat().st_size
    in_chunk, used = np.zeros(size, bool), np.zeros(size, bool)
    with h5py.File(path, "r") as handle:
        datasets = []
        handle.visititems(lambda name, obj: datasets.append(obj) if isinstance(obj, h5py.Dataset) else None)
        for ds in datasets:
            row_bytes = ds.dtype.itemsize * int(np.prod(ds.shape[1:]))
            for i in range(ds.id.get_num_chunks()):
                info = ds.id.get_chunk_info(i)
                in_chunk[info.byte_offset : info.byte_offset + info.size] = True
                rows = min(ds.chunks[0], ds.shape[0] - info.chunk_offset[0])
                used[info.byte_offset : info.byte_offset + rows * row_bytes] = True
    return np.flatnonzero(used | ~in_chunk)


def test_random_bit_flips_in_used_bytes(tmp_path, rel, caplog):
    shard = _write(tmp_path / "clean", rel)
    offsets = _used_bytes(shard)
    rng = np.random.default_rng(0)
    outcomes = {"error": 0, "reported": 0, "clean": 0}
    for trial in range(40):
        run_dir = tmp_path / f"t{trial}"
        run_dir.mkdir()
        copy = run_dir / shard.name
        shutil.copy(shard, copy)
        _flip(copy, int(rng.choice(offsets)), int(rng.integers(0, 8)))
        with caplog.at_level(logging.WARNING, logger="actpat"):
            try:
                run = open_run(run_dir)
            except ShardFormatError as exc:
                assert copy.name in str(exc)  # a clear error naming the file, never a raw traceback
                outcomes["error"] += 1
                continue
            rel.check_exact_or_reported(run)
        outcomes["reported" if run.losses else "clean"] += 1
    # Unused bytes of HDF5 metadata blocks change nothing when flipped; everything else is detected.
    assert outcomes["error"] + outcomes["reported"] >= 30, outcomes


def test_records_table_of_the_wrong_type_is_reported_not_raised(tmp_path, rel, caplog):
    shard = _write(tmp_path, rel)
    with h5py.File(shard, "r+") as handle:
        group = handle["sites"][schema.site_key("fc.relu")]
        del group["records"]
        group["records"] = np.zeros(3)
    with caplog.at_level(logging.WARNING, logger="actpat"):
        run = open_run(tmp_path)
    assert run.sites == ["conv/relu"]
    (loss,) = run.losses
    assert loss.site == "fc.relu" and loss.kind == "unreadable" and "records table" in loss.reason
    assert shard.name in caplog.text and "fc.relu" in caplog.text
    rel.check_exact_or_reported(run)


@pytest.mark.parametrize("attr, value", [("format_version", "three"), ("format", 3), ("rank", 1.5)])
def test_bad_root_attributes_name_the_file(attr, value, tmp_path, rel):
    shard = _write(tmp_path, rel)
    with h5py.File(shard, "r+") as handle:
        handle.attrs[attr] = value
    with pytest.raises(ShardFormatError, match=shard.name):
        open_run(tmp_path)


def _crafted_read(tmp_path, rel, edit):
    """Apply ``edit(site_group)`` to a shard, then open and read everything under tracemalloc."""
    shard = _write(tmp_path, rel, steps=[0, 1])
    with h5py.File(shard, "r+") as handle:
        edit(handle["sites"][schema.site_key("fc.relu")])
    assert shard.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        run = open_run(tmp_path)
        read, lost = rel.check_exact_or_reported(run)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"{peak / 2**20:.0f} MiB allocated for a shard under 1 MiB"
    return run, read


def test_crafted_huge_n_units_is_refused_without_allocating(tmp_path, rel, caplog):
    with caplog.at_level(logging.WARNING, logger="actpat"):
        run, read = _crafted_read(tmp_path, rel, lambda group: group.attrs.__setitem__("n_units", 2**40))
    assert run.sites == ["conv/relu"] and read == 2
    assert "fc.relu" in caplog.text and "n_units" in caplog.text


def test_crafted_rows_past_the_end_are_refused_without_allocating(tmp_path, rel):
    def edit(group):
        group["bits"].resize(3_000_000_000, axis=0)  # declared, never stored
        records = group["records"]
        row = records[1]
        row["row_count"], row["sample_count"] = 2_999_999_000, 2_999_999_000
        records[1] = row
        records.resize(3_000_000_000, axis=0)  # a records table claiming 3e9 rows

    run, read = _crafted_read(tmp_path, rel, edit)
    assert read == 3  # conv/relu steps 0 and 1, fc.relu step 0
    # The edited row fails its checksum: it may be any step from its sound neighbour's (0) on.
    assert any(loss.site == "fc.relu" and loss.steps == (0, None) for loss in run.losses)
    assert run.read("fc.relu", 0).lost_records >= 1
