"""open_run / Run: format errors, partial shards, resuming, chunked reading and several ranks."""

from __future__ import annotations

import hashlib
import json
import logging
import zlib

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from actpat.analysis import summarize
from actpat.recorder import ActivationRecorder, ShardFormatError, open_run, schema


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 9, 12), nn.ReLU())


def _write_run(out, steps, *, model=None, rank=0, batch=3, seed=0, **kwargs):
    """Record ``steps`` into ``out``; returns the test's own truth per (site, step)."""
    model = model or _model()
    inputs = {}
    handles = [
        model[1].register_forward_pre_hook(lambda m, a: inputs.setdefault(("1", cur[0]), a[0].detach().clone())),
        model[4].register_forward_pre_hook(lambda m, a: inputs.setdefault(("4", cur[0]), a[0].detach().clone())),
    ]
    cur = [None]
    gen = torch.Generator().manual_seed(seed)
    with ActivationRecorder(model, out, rank=rank, **kwargs) as rec:
        for step in steps:
            cur[0] = step
            ids = torch.arange(batch) + 1000 * rank + 10 * step
            with rec.capture(step, labels=ids % 4, sample_ids=ids):
                model(torch.randn(batch, 1, 5, 5, generator=gen))
    for handle in handles:
        handle.remove()
    return inputs


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_missing_directory_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_run(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
        open_run(tmp_path / "file")
    shard = tmp_path / "run" / "patterns-rank000-00000.h5"  # a shard given for its run: the folder named
    shard.parent.mkdir()
    shard.write_bytes(b"")
    with pytest.raises(NotADirectoryError, match=f"is a shard file. Pass the folder that holds it.*'{shard.parent}'"):
        open_run(shard)


def test_read_matches_truth_and_unpack(tmp_path, truth):
    inputs = _write_run(tmp_path, [0, 5, 10])
    run = open_run(tmp_path)
    assert run.sites == ["1", "4"] and run.splits == ["train"]
    assert run.steps("1").tolist() == [0, 5, 10]
    assert run.n_observations("1") == 3 * 3 * 9 and run.n_observations("4") == 3 * 3
    assert run.site_info("1")["n_units"] == 5 and run.site_info("4")["shape"] == (12,)
    for (site, step), z in inputs.items():
        got = run.read(site, step)
        np.testing.assert_array_equal(got.unpack(), truth.channel(z))
        np.testing.assert_array_equal(truth.unpack(got.bits, got.n_units), truth.channel(z))
        assert got.step == step and got.site == site and got.split == "train"
    with pytest.raises(KeyError, match="recorded sites"):
        run.read("nope", 0)
    with pytest.raises(KeyError, match=r"recorded steps: \[0, 5, 10\]"):
        run.read("1", 3)
    with pytest.raises(ValueError, match=r"recorded splits \['train'\], but got 'probe'"):
        run.steps("1", split="probe")


def test_non_actpat_h5_file_is_named_in_the_error(tmp_path):
    _write_run(tmp_path, [0])
    with h5py.File(tmp_path / "weights.h5", "w") as handle:
        handle["w"] = np.zeros(3)
    with pytest.raises(ShardFormatError, match="weights.h5") as excinfo:
        open_run(tmp_path)
    assert "not" in str(excinfo.value)


def test_non_hdf5_file_with_h5_suffix_is_named_in_the_error(tmp_path):
    (tmp_path / "notes.h5").write_text("not hdf5 at all")
    with pytest.raises(ShardFormatError, match="notes.h5"):
        open_run(tmp_path)


def test_other_files_are_ignored(tmp_path):
    _write_run(tmp_path, [0])
    (tmp_path / "README.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    assert open_run(tmp_path).steps("1").tolist() == [0]


def test_newer_format_version_asks_to_upgrade(tmp_path):
    _write_run(tmp_path, [0])
    (shard,) = tmp_path.glob("*.h5")
    with h5py.File(shard, "a") as handle:
        handle.attrs["format_version"] = 99
    with pytest.raises(ShardFormatError) as excinfo:
        open_run(tmp_path)
    message = str(excinfo.value)
    assert shard.name in message and "99" in message and "Upgrade" in message


def test_resuming_into_the_same_dir_continues_numbering(tmp_path, truth):
    first = _write_run(tmp_path, [0, 1])
    (shard0,) = tmp_path.glob("*.h5")
    digest = _digest(shard0)
    second = _write_run(tmp_path, [2, 3], seed=1)
    third = _write_run(tmp_path, [4], seed=2, max_shard_bytes=1)  # rolls over after every record
    names = sorted(p.name for p in tmp_path.iterdir())
    marks = [schema.marks_name(0, i) for i in (0, 1, 2)]  # one per writer session, named by its first shard
    assert names == sorted([schema.shard_name(0, i) for i in range(4)] + marks)
    assert [schema.read_marks(tmp_path / name)[:2] for name in marks] == [({"train": 1}, True), ({"train": 3}, True),
                                                                            ({"train": 4}, True)]
    assert _digest(shard0) == digest  # never overwritten
    run = open_run(tmp_path)
    assert run.steps("1").tolist() == [0, 1, 2, 3, 4]
    for (site, step), z in {**first, **second, **third}.items():
        np.testing.assert_array_equal(truth.unpack(run.read(site, step).bits, z.shape[1]), truth.channel(z))


def test_iter_chunks_concatenate_to_read(tmp_path):
    _write_run(tmp_path / "full", [0, 1, 2], batch=4)
    _write_run(tmp_path / "sub", [0, 1, 2], batch=4, max_observations=20)
    for out in ("full", "sub"):
        run = open_run(tmp_path / out)
        for site in run.sites:
            chunks = list(run.iter_chunks(site, max_rows=7))
            assert all(0 < len(c) <= 7 for c in chunks)
            assert [c.step for c in chunks] == sorted(c.step for c in chunks)
            for step in run.steps(site).tolist():
                parts = [c for c in chunks if c.step == step]
                whole = run.read(site, step)
                for field in ("bits", "labels", "sample_ids", "positions"):
                    np.testing.assert_array_equal(np.concatenate([getattr(p, field) for p in parts]), getattr(whole, field))
                assert sum(p.nan_count for p in parts) == whole.nan_count
            assert sum(len(c) for c in chunks) == run.n_observations(site)
    with pytest.raises(ValueError, match="max_rows"):
        list(run.iter_chunks("1", max_rows=0))


def test_two_ranks_merge_in_read(tmp_path, truth):
    rank0 = _write_run(tmp_path, [0, 1], rank=0, seed=0)
    rank1 = _write_run(tmp_path, [1, 2], rank=1, seed=1, batch=2)
    assert sorted(p.name for p in tmp_path.glob("*.h5")) == [schema.shard_name(0, 0), schema.shard_name(1, 0)]
    run = open_run(tmp_path)
    assert run.steps("4").tolist() == [0, 1, 2]
    merged = run.read("4", 1)
    expected = np.concatenate([truth.channel(rank0[("4", 1)]), truth.channel(rank1[("4", 1)])])
    np.testing.assert_array_equal(truth.unpack(merged.bits, 12), expected)
    np.testing.assert_array_equal(merged.sample_ids, [10, 11, 12, 1010, 1011])
    conv = run.read("1", 1)
    assert len(conv) == (3 + 2) * 9
    np.testing.assert_array_equal(np.unique(conv.sample_ids), [10, 11, 12, 1010, 1011])
    assert run.n_observations("4") == 3 + 3 + 2 + 2


def test_partial_shard_is_read_with_a_warning(tmp_path, caplog, truth):
    inputs = _write_run(tmp_path, [0, 1])
    (shard,) = tmp_path.glob("*.h5")
    with h5py.File(shard, "a") as handle:
        handle.attrs["finalized"] = False
    shard.rename(tmp_path / schema.shard_name(0, 0, partial=True))
    with caplog.at_level(logging.WARNING, logger="actpat"):
        run = open_run(tmp_path)
    assert any("unfinalized" in r.getMessage() and ".partial" in r.getMessage() for r in caplog.records)
    for (site, step), z in inputs.items():
        np.testing.assert_array_equal(truth.unpack(run.read(site, step).bits, z.shape[1]), truth.channel(z))


def test_a_shard_finalized_between_the_listing_and_its_indexing_is_read_under_its_final_name(
    tmp_path, caplog, truth, monkeypatch
):
    # A run opened while it trains: the writer renames X.h5.partial to X.h5 after the reader listed the directory.
    inputs = _write_run(tmp_path, [0, 1])
    (shard,) = tmp_path.glob("*.h5")
    shard.rename(tmp_path / schema.shard_name(0, 0, partial=True))
    opening = schema.open_for_reading

    def finalized_meanwhile(path):
        if path.name.endswith(".partial"):
            path.rename(shard)
        return opening(path)

    monkeypatch.setattr(schema, "open_for_reading", finalized_meanwhile)
    with caplog.at_level(logging.WARNING, logger="actpat"):
        run = open_run(tmp_path)
    assert run.losses == [] and not [r for r in caplog.records if "damaged" in r.getMessage()]
    for (site, step), z in inputs.items():
        np.testing.assert_array_equal(truth.unpack(run.read(site, step).bits, z.shape[1]), truth.channel(z))


def test_a_shard_finalized_after_the_run_was_opened_is_read_under_its_final_name(tmp_path, truth):
    inputs = _write_run(tmp_path, [0, 1])
    (shard,) = tmp_path.glob("*.h5")
    shard.rename(tmp_path / schema.shard_name(0, 0, partial=True))
    run = open_run(tmp_path, warn=False)
    (tmp_path / schema.shard_name(0, 0, partial=True)).rename(shard)  # its writer finalizes it now
    for (site, step), z in inputs.items():
        np.testing.assert_array_equal(truth.unpack(run.read(site, step).bits, z.shape[1]), truth.channel(z))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "foreign"])
def test_damaged_partial_shard_is_skipped_with_a_warning(damage, tmp_path, caplog, truth):
    inputs = _write_run(tmp_path, [0])
    (shard,) = tmp_path.glob("*.h5")
    partial = tmp_path / schema.shard_name(0, 1, partial=True)
    if damage == "garbage":
        partial.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif damage == "truncated":
        partial.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "empty":
        partial.write_bytes(b"")
    else:
        with h5py.File(partial, "w") as handle:
            handle["x"] = np.zeros(2)
    with caplog.at_level(logging.WARNING, logger="actpat"):
        run = open_run(tmp_path)
    assert any(partial.name in r.getMessage() for r in caplog.records)
    assert run.shards[0] == shard
    for (site, step), z in inputs.items():
        np.testing.assert_array_equal(truth.unpack(run.read(site, step).bits, z.shape[1]), truth.channel(z))


@pytest.mark.parametrize("damage", ["garbage", "empty", "readable"])
def test_an_unfinalized_shard_with_a_stop_file_is_reported_with_its_reason_not_as_a_crash(damage, tmp_path, caplog):
    _write_run(tmp_path, [0])
    (shard,) = tmp_path.glob("*.h5")
    partial = tmp_path / schema.shard_name(0, 1, partial=True)
    content = {"garbage": b"\x89HDF\r\n\x1a\n" + bytes(100), "empty": b"", "readable": shard.read_bytes()}[damage]
    partial.write_bytes(content)
    reason = "writing patterns-rank000-00001.h5.partial failed: [Errno 28] No space left on device"
    (tmp_path / schema.stop_name(0, 1)).write_text(json.dumps(reason) + "\n")
    with caplog.at_level(logging.WARNING, logger="actpat"):
        run = open_run(tmp_path)
    text = caplog.text
    assert f"(recording stopped: {reason})" in text and "crash" not in text
    if damage != "readable":
        (loss,) = run.losses
        assert loss.path == partial and loss.reason.endswith(f"(recording stopped: {reason})")
    (tmp_path / schema.stop_name(0, 1)).unlink()  # without the stop file: as a crash would leave it
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="actpat"):
        open_run(tmp_path)
    assert "recording stopped" not in caplog.text and (damage != "readable" or "left by a crash?" in caplog.text)


def test_record_with_rows_missing_is_ignored(tmp_path):
    _write_run(tmp_path, [0, 1])
    (shard,) = tmp_path.glob("*.h5")
    with h5py.File(shard, "a") as handle:  # as if the last rows never reached the disk
        bits = handle["sites"]["4"]["bits"]
        bits.resize(bits.shape[0] - 1, axis=0)
    run = open_run(tmp_path)
    assert run.steps("4").tolist() == [0] and run.steps("1").tolist() == [0, 1]


def test_reader_is_importable_without_torch(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys; import actpat.recorder as r; from actpat.recorder import open_run, reader; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------- open files, pickling
def test_open_files_are_bounded_closed_and_reopened_after_pickling(tmp_path, truth):
    import pickle

    inputs = _write_run(tmp_path, range(5), max_shard_bytes=1)  # one shard per step
    with open_run(tmp_path, max_open=2) as run:
        assert len(run.shards) >= 5
        for (site, step), z in inputs.items():
            np.testing.assert_array_equal(truth.unpack(run.read(site, step).bits, z.shape[1]), truth.channel(z))
            assert len(run._handles) <= 2
        clone = pickle.loads(pickle.dumps(run))  # what a process pool sends to its workers
    assert not run._handles and not clone._handles
    for (site, step), z in inputs.items():
        np.testing.assert_array_equal(truth.unpack(clone.read(site, step).bits, z.shape[1]), truth.channel(z))
    clone.close()
    assert not clone._handles


def test_a_run_opened_by_a_relative_path_reads_in_a_process_with_another_working_directory(
    tmp_path, truth, monkeypatch
):
    import pickle

    inputs = _write_run(tmp_path / "runs" / "x", range(2))
    monkeypatch.chdir(tmp_path)
    with open_run("runs/x") as run:
        sent = pickle.dumps(run)  # what a Dask worker, started in its own directory, receives
    monkeypatch.chdir(tmp_path / "runs")
    clone = pickle.loads(sent)
    for (site, step), z in inputs.items():
        np.testing.assert_array_equal(truth.unpack(clone.read(site, step).bits, z.shape[1]), truth.channel(z))
    clone.close()


def test_iter_chunks_memory_is_proportional_to_max_rows(tmp_path):
    import tracemalloc

    from actpat.recorder.shards import Record, ShardWriter, SiteMeta

    n = 2_000_000
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 256, (n, 1), dtype=np.uint8)
    writer = ShardWriter(tmp_path)
    writer.start()
    writer.put(Record(SiteMeta("fc", 0, "ReLU", (8,), 8, "flat"), 0, 0, "probe", bits, 1, n, 0,
                      sample_ids=np.arange(n), labels=np.arange(n) % 10))  # fmt: skip
    writer.close()
    del writer
    run = open_run(tmp_path)
    tracemalloc.start()
    try:
        seen = 0
        for chunk in run.iter_chunks("fc", max_rows=10_000):
            assert len(chunk) <= 10_000
            np.testing.assert_array_equal(chunk.bits, bits[seen : seen + len(chunk)])
            np.testing.assert_array_equal(chunk.sample_ids, np.arange(seen, seen + len(chunk)))
            seen += len(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == n
    # A whole record's labels and sample ids alone would be 32 MB; read-ahead slabs take at most 1 MiB
    # per column.
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------- one split rule
def test_split_none_means_the_only_split_and_several_must_be_named(tmp_path):
    _write_run(tmp_path / "one", [0, 1])
    assert open_run(tmp_path / "one").resolve_split() == "train"
    model = _model()
    with ActivationRecorder(model, tmp_path / "two") as rec:
        for split in ("probe", "train"):
            with rec.capture(0, split=split):
                model(torch.randn(2, 1, 5, 5))
    run = open_run(tmp_path / "two")
    for query in (run.steps, run.n_observations, lambda site: list(run.iter_chunks(site))):
        with pytest.raises(ValueError, match=r"one of the recorded splits \[.probe., .train.\], but got None \(the run has several splits"):
            query("1")
    with pytest.raises(ValueError, match=r"recorded splits \['probe', 'train'\], but got 'val'"):
        run.read("1", 0, split="val")
    assert run.resolve_split("probe") == "probe" and run.steps("1", "probe").tolist() == [0]


# ---------------------------------------------------------------------------- older versions
@pytest.mark.parametrize("version", [1, 2, 3])
def test_older_format_versions_are_read(version, tmp_path, truth):
    inputs = _write_run(tmp_path, [0, 1])
    _write_run(tmp_path, [2])  # a second shard stays at the current version
    first = tmp_path / schema.shard_name(0, 0)
    with h5py.File(first, "r+") as handle:
        handle.attrs["format_version"] = version
        if version < 3:
            del handle.attrs["compression"]
        for group in handle["sites"].values():
            records = group["records"][()]
            names = schema.RECORD_FIELDS[version]
            old = np.zeros(len(records), dtype=[(n, schema.RECORD_DTYPE[n]) for n in names])
            for name in names:
                old[name] = records[name]
            if version == 3:  # checksums of the version-3 row layout, as the README computes them
                header = b"actpat-record\0" + group.attrs["site"].encode() + b"\0" + group.attrs["pattern"].encode()
                header += b"\0" + np.int64(group.attrs["n_units"]).tobytes()
                for i, row in enumerate(records):
                    plain = old[i : i + 1].copy()
                    plain["row_crc32"] = plain["crc32"] = 0
                    old[i]["row_crc32"] = crc = zlib.crc32(plain.tobytes(), zlib.crc32(header))
                    for name, start, count in (("bits", "row_start", "row_count"), ("sample_ids", "sample_start",
                                               "sample_count"), ("labels", "sample_start", "sample_count")):
                        crc = zlib.crc32(group[name][row[start] : row[start] + row[count]].tobytes(), crc)
                    old[i]["crc32"] = crc
            del group["records"]
            group.create_dataset("records", data=old, maxshape=(None,), chunks=(256,))
    run = open_run(tmp_path)
    assert run.format_versions == {first: version, tmp_path / schema.shard_name(0, 1): schema.FORMAT_VERSION}
    assert [info.checksummed for info in run.shard_infos] == [version >= 3, True]
    assert run.losses == []
    for (site, step), z in inputs.items():
        np.testing.assert_array_equal(truth.unpack(run.read(site, step).bits, z.shape[1]), truth.channel(z))


# ---------------------------------------------------------------------------- a lost start
def test_start_lost_names_what_may_hold_the_first_record(tmp_path, caplog):
    _write_run(tmp_path, [0, 1, 2], max_shard_bytes=1)
    run = open_run(tmp_path)
    assert run.start_lost("1") == [] and run.start_lost("4") == []
    (tmp_path / schema.shard_name(0, 0)).unlink()  # the shard with step 0, e.g. lost with a disk
    run = open_run(tmp_path)
    assert run.steps("1").tolist() == [1, 2]
    (lost,) = run.start_lost("1")
    assert lost.kind == "missing" and lost.shard_index == 0
    # A damaged first record: its step is known.
    _write_run(tmp_path / "b", [5, 6])
    (shard,) = (tmp_path / "b").glob("*.h5")
    with h5py.File(shard, "r+") as handle:
        bits = handle["sites"]["4"]["bits"]
        bits[0] = bits[0] ^ 1
    run = open_run(tmp_path / "b")
    (lost,) = run.start_lost("4")
    assert (lost.site, lost.step, lost.kind) == ("4", 5, "corrupt")
    assert run.start_lost("1") == []


def test_a_pass_over_the_run_opens_each_shard_once(tmp_path, monkeypatch):
    """The reader keeps shards open for a pass (before: one open per record read)."""
    from actpat.recorder import reader

    _write_run(tmp_path, range(0, 10))
    _write_run(tmp_path, range(10, 20), rank=1)
    run = open_run(tmp_path)
    opened = []
    real = reader.h5py.File
    monkeypatch.setattr(reader.h5py, "File", lambda path, *a, **k: opened.append(path) or real(path, *a, **k))
    n_records = 0
    for site in run.sites:
        for step in run.steps(site):
            n_records += len(run.read(site, int(step))) > 0
    run.close()
    assert n_records == 2 * 20
    assert sorted(map(str, opened)) == sorted(str(p) for p in run.shards)  # each shard once, for 40 records


def test_a_folder_above_the_run_is_an_error_naming_the_run(tmp_path):
    run_dir = tmp_path / "lightning_logs" / "version_0" / "activation_patterns"
    _write_run(run_dir, [0])
    for above in (tmp_path, tmp_path / "lightning_logs" / "version_0"):
        with pytest.raises(ShardFormatError, match=rf"holds none; its subdirectories hold a run: {run_dir}\. Pass"):
            open_run(above)
    (tmp_path / "empty").mkdir()
    assert open_run(tmp_path / "empty").sites == []  # nothing anywhere: an empty run (a writer not yet started)


def test_open_run_and_plain_h5py_open_the_same_shard_in_one_process(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    x = torch.randn(5, 3)
    with ActivationRecorder(model, tmp_path) as rec:
        with rec.capture(0):
            model(x)
    shard = next(tmp_path.glob("*.h5"))
    expected = np.packbits((x @ model[0].weight.T + model[0].bias > 0).detach().numpy(), axis=-1, bitorder="little")
    run = open_run(tmp_path)
    np.testing.assert_array_equal(run.read("1", 0).bits, expected)
    with h5py.File(shard, "r") as handle:  # h5py's default locking, while the run holds the file open
        assert "sites" in handle
    with h5py.File(shard, "r") as handle:  # and the reverse: the run opened while h5py holds it
        np.testing.assert_array_equal(open_run(tmp_path).read("1", 0).bits, expected)
        assert "sites" in handle


def test_an_empty_partial_shard_is_reported_as_never_written_not_as_damaged(tmp_path, caplog):
    _write_run(tmp_path, [0])
    empty = tmp_path / schema.shard_name(0, 1, partial=True)  # a writer killed before its first block
    empty.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="actpat"):
        run = open_run(tmp_path)
    (loss,) = run.losses
    assert loss.path == empty and loss.kind == "unwritten" and "empty" in loss.reason
    assert not any("damaged" in r.getMessage() for r in caplog.records)
    assert run.steps("1").tolist() == [0]
    with pytest.raises(KeyError, match=r"step 1 has no record.*never reached the disk.*00001"):
        run.read("1", 1)  # the killed writer may have been about to write it


def test_a_finalized_shard_whose_sites_group_fails_its_checksum_is_named_with_that_cause(tmp_path):
    _write_run(tmp_path, [0])
    (shard,) = tmp_path.glob("*.h5")
    with h5py.File(shard, "r") as handle:
        address = h5py.h5g.get_objinfo(handle.id, schema.SITES_GROUP.encode()).objno[0]
    data = bytearray(shard.read_bytes())
    data[address + 8] ^= 0x20  # inside the group's object header: HDF5's metadata checksum fails
    shard.write_bytes(data)
    with h5py.File(shard, "r") as handle:
        assert schema.SITES_GROUP in handle
    with pytest.raises(ShardFormatError, match=r"'sites' group cannot be read \(.*checksum"):
        open_run(tmp_path)


def test_a_site_known_only_from_damaged_parts_is_named_as_damaged_not_as_never_recorded(tmp_path):
    _write_run(tmp_path / "a", [0, 1])
    with h5py.File(next((tmp_path / "a").glob("*.h5")), "r+") as f:
        del f[schema.SITES_GROUP]["4"].attrs["n_units"]
    run = open_run(tmp_path / "a")
    assert run.sites == ["1"]
    with pytest.raises(KeyError, match=r"got '4'\. Records of '4' may be in damaged parts of the run: 1 loss.*`losses`"):
        run.read("4", 0)
    # A shard missing from a rank's numbering: any site may have been there.
    other = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Identity(), nn.ReLU(), nn.Identity(), nn.Identity())
    _write_run(tmp_path / "b", [0, 1], model=other)
    _write_run(tmp_path / "b", [2, 3])
    (tmp_path / "b" / "patterns-rank000-00000.h5").unlink()
    run = open_run(tmp_path / "b")
    assert run.sites == ["1", "4"]
    # The deleted shard's writer session's marks name the steps it queued, per site: site '2', not '1'.
    with pytest.raises(KeyError, match=r"got '2'\. Records of '2' may be in damaged parts.*up to 1 and closed.*missing"):
        run.steps("2")  # recorded in the deleted shard only
    with pytest.raises(KeyError, match=r"step 1 has no record; recorded steps: \[2, 3\]\. 1 shard\(s\) of the run "
                                       r"cannot be read, are missing.*records of '1' may have been there"):
        run.read("1", 1)
    (tmp_path / "b" / schema.marks_name(0, 0)).unlink()  # without the marks, the gap in the numbering alone
    with pytest.raises(KeyError, match=r"got '2'\. 1 shard\(s\) of the run cannot be read, are missing.*00000.*'2' may have"):
        open_run(tmp_path / "b").steps("2")
    _write_run(tmp_path / "c", [0])
    with pytest.raises(KeyError, match=r"got '3'\.\W*$"):  # a run without losses names no damage
        open_run(tmp_path / "c").read("3", 0)


def _ranks_run(path, parts):
    """Shards of ``parts``, ``(rank, steps, finalized)`` in order, under the names their writers would give them."""
    index = {}
    for i, (rank, steps, finalized) in enumerate(parts):
        _write_run(path / f"part{i}", steps, rank=rank, seed=i)
        for shard in (path / f"part{i}").glob("*.h5"):
            name = schema.shard_name(rank, index.setdefault(rank, 0), partial=not finalized)
            shard.rename(path / name)
            index[rank] += 1


def test_a_step_that_one_rank_has_no_record_of_between_its_others_is_lost(tmp_path, caplog):
    """DDP ranks record the same steps: rank 1 killed before its last block reached the disk, then a fit resumed
    after it, left steps holding rank 0's batch alone, which the reader measured as the whole step."""
    killed = [(0, range(4), False), (1, [0, 1], False)]
    _ranks_run(tmp_path / "resumed", killed + [(0, [4, 5], True), (1, [4, 5], True)])
    with caplog.at_level(logging.WARNING, logger="actpat"):
        run = open_run(tmp_path / "resumed")
    for step in range(6):
        p = run.read("4", step)
        assert (p.lost_records > 0) == (step in (2, 3)), step
        assert len(p) == (3 if step in (2, 3) else 6)  # rank 0's rows are there, and counted as lost
    lost = [loss for loss in run.losses if loss.kind == "incomplete"]
    assert sorted((loss.site, loss.step, loss.rank) for loss in lost) == [("1", 2, 1), ("1", 3, 1), ("4", 2, 1), ("4", 3, 1)]
    assert "no record of rank 1, which records this split, while other ranks have" in caplog.text
    table = summarize(run, progress=False)
    assert sorted(table["step"].unique()) == [0, 1, 4, 5]
    # A fit that finished on two ranks, went on on one and then on two again: every step is whole.
    _ranks_run(tmp_path / "shrunk", [(0, [0, 1], True), (1, [0, 1], True), (0, [2, 3], True), (0, [4, 5], True),
                                     (1, [4, 5], True)])
    run = open_run(tmp_path / "shrunk")
    assert not run.losses and [len(run.read("4", step)) for step in range(6)] == [6, 6, 3, 3, 6, 6]


def test_a_crashed_ranks_missing_tail_is_lost_where_the_other_rank_crashed_with_it(tmp_path, caplog):
    """Both ranks killed, rank 1's last block not on disk: steps 4 and 5 hold rank 0's rows alone. Steps a fit
    resumed on rank 0 alone wrote later, into shards of its own, are whole."""
    _write_run(tmp_path, range(6), rank=0)
    _write_run(tmp_path / "r1", range(4), rank=1, seed=1)
    for shard in (tmp_path / "r1").glob("*.h5"):
        shard.rename(tmp_path / shard.name)
    for shard in tmp_path.glob("*.h5"):  # unfinalized, as the kill left them
        shard.rename(shard.with_name(shard.name + schema.PARTIAL_SUFFIX[len(schema.SHARD_SUFFIX):]))
    _write_run(tmp_path, [6, 7], rank=0, seed=3)  # resumed on one rank: rank 0's next shard, finalized
    with caplog.at_level(logging.WARNING, logger="actpat"):
        run = open_run(tmp_path)
    lost = sorted({(loss.step, loss.rank) for loss in run.losses if loss.kind == "incomplete"})
    assert lost == [(4, 1), (5, 1)]
    assert [run.read("4", step).lost_records > 0 for step in range(8)] == [False] * 4 + [True] * 2 + [False] * 2


def test_a_rank_whose_unfinalized_shard_is_empty_counts_as_crashed(tmp_path, caplog):
    """Rank 1 killed before its last shard's first block reached the disk (an empty unfinalized file, lost
    whole): steps 2 and 3 of rank 0's unfinalized shard lack its batches. The empty file was not counted as
    rank 1's crash, and the steps were measured as whole."""
    _ranks_run(tmp_path / "a", [(0, [0, 1], True), (1, [0, 1], True), (0, [2, 3], False)])
    (tmp_path / "a" / schema.shard_name(1, 1, partial=True)).write_bytes(b"")
    run = open_run(tmp_path / "a")
    lost = sorted({(loss.step, loss.rank) for loss in run.losses if loss.kind == "incomplete"})
    assert lost == [(2, 1), (3, 1)]
    assert [run.read("4", step).lost_records > 0 for step in range(4)] == [False, False, True, True]
    # A rank with no record at all: its first step is unknown, the steps stay, with a warning that says why.
    _ranks_run(tmp_path / "b", [(0, [0, 1, 2], False)])
    (tmp_path / "b" / schema.shard_name(1, 0, partial=True)).write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="actpat"):
        run = open_run(tmp_path / "b")
    assert not [loss for loss in run.losses if loss.kind == "incomplete"]
    assert "rank(s) 1 left unfinalized shards with no record on disk" in caplog.text
    assert "steps 0..2 of the other ranks' unfinalized shards hold only those ranks' batches" in caplog.text
    caplog.clear()
    _ranks_run(tmp_path / "c", [(0, [0, 1, 2], True)])  # all finalized: nothing to warn of
    (tmp_path / "c" / schema.shard_name(1, 0, partial=True)).write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="actpat"):
        open_run(tmp_path / "c")
    assert "no record on disk" not in caplog.text


def _sessions_run(path, sessions):
    """Writer sessions ``(rank, steps, closed, queued)`` in order, each with its shards and its marks file as a
    writer leaves them: a session that never closed (killed) leaves its shards unfinalized and, in its marks, the
    last step it queued (``queued``), past the last it wrote. A session with no steps leaves an empty shard."""
    index: dict[int, int] = {}
    for i, (rank, steps, closed, queued) in enumerate(sessions):
        first = index.setdefault(rank, 0)
        if steps:
            _write_run(path / f"part{i}", steps, rank=rank, seed=i)
            for shard in sorted((path / f"part{i}").glob("*.h5")):
                shard.rename(path / schema.shard_name(rank, index[rank], partial=not closed))
                index[rank] += 1
        else:
            (path / schema.shard_name(rank, first, partial=True)).write_bytes(b"")
            index[rank] += 1
        marks = {"train": queued if queued is not None else max(steps)}
        (path / schema.marks_name(rank, first)).write_bytes(schema.marks_text(marks, closed))


def _lost_steps(run):
    return sorted({(loss.site, loss.step, loss.rank) for loss in run.losses if loss.kind == "incomplete"})


def test_steps_a_killed_rank_queued_and_never_wrote_are_lost_whatever_the_other_ranks_shards(tmp_path, caplog):
    """The marks file of a killed session says how far it had recorded. Found by a new user's kills: the steps of
    a rank's last block were measured as whole where the other rank's shards were finalized (it finished, or
    rolled over), where the killed rank had written nothing at all, and after a resume."""
    # The other rank went on and closed: its shard is finalized. Steps 3..5 were queued by rank 1 and never
    # written; 6 and 7, recorded by rank 0 in the session beside the killed one, lack rank 1's batch too (in
    # lockstep data parallelism, the step rank 0 began as rank 1 died: a new user's DDP trial).
    _sessions_run(tmp_path / "finished", [(0, range(8), True, None), (1, [0, 1, 2], False, 5)])
    with caplog.at_level(logging.WARNING, logger="actpat"):
        run = open_run(tmp_path / "finished")
    assert _lost_steps(run) == sorted((site, s, 1) for site in "14" for s in range(3, 8))
    summaries = [m for m in caplog.messages if "records lost in split" in m]  # one per cause, not one per loss
    assert len(summaries) == 3 and "steps 3 to 5, 2 site(s)" in summaries[0] and "never reached" in summaries[0]
    assert "3 step(s) from 3 to 5, 2 site(s)" in summaries[1]
    assert "2 step(s) from 6 to 7, 2 site(s)" in summaries[2] and "rank 1 stopped before these steps" in summaries[2]
    caplog.clear()
    assert [run.read("4", step).lost_records > 0 for step in range(8)] == [False] * 3 + [True] * 5
    assert sorted(summarize(run, progress=False)["step"].unique()) == [0, 1, 2]
    # A fit resumed on rank 0 alone after both were killed: its later session is not beside the killed one.
    _sessions_run(tmp_path / "alone_after", [(0, [0, 1, 2], False, 3), (1, [0, 1, 2], False, 2),
                                             (0, [3, 4, 5], True, None)])
    assert _lost_steps(open_run(tmp_path / "alone_after")) == []
    # Killed before any record reached the disk, then resumed at step 3: steps 0..2 lack its batches.
    _sessions_run(tmp_path / "mute", [(0, range(6), True, None), (1, [], False, 2), (1, [3, 4, 5], True, None)])
    assert _lost_steps(open_run(tmp_path / "mute")) == sorted([(site, s, 1) for site in "14" for s in (0, 1, 2)])
    # One rank alone, killed and resumed past its last written step: nothing is missing from any step, and a
    # read of a step it queued and never wrote names that loss (it named none). Steps 5 and 6, queued too, were
    # recorded anew by the resumed session: whole, and no loss names them (a new user's kill and resume).
    _sessions_run(tmp_path / "alone", [(0, [0, 1, 2], False, 6), (0, [5, 6, 7], True, None)])
    with caplog.at_level(logging.WARNING, logger="actpat"):
        run = open_run(tmp_path / "alone")
    assert not _lost_steps(run) and run.steps("1").tolist() == [0, 1, 2, 5, 6, 7]
    assert sorted((loss.site, loss.steps) for loss in run.losses if loss.kind == "unwritten") == [("1", (3, 4)), ("4", (3, 4))]
    assert "records lost in split 'train', steps 3 to 4, 2 site(s) (by " in caplog.text  # not "skipping records of"
    with pytest.raises(KeyError, match=r"step 4 has no record.*may be in damaged parts.*rank 0 queued records of "
                                       r"steps up to 6 that never reached the disk \(its writer was killed or "
                                       r"failed, or is still running\)"):
        run.read("1", 4)
    assert run.read("1", 5).lost_records == 0
    # Resumed exactly at the step it had queued last: nothing it queued is lost for good.
    _sessions_run(tmp_path / "again", [(0, [0, 1, 2], False, 3), (0, [3, 4], True, None)])
    assert [loss for loss in open_run(tmp_path / "again").losses if loss.kind == "unwritten"] == []
    # Both closed, one rank recording fewer steps (a fit that shrank): every step is whole.
    _sessions_run(tmp_path / "shrunk", [(0, range(6), True, None), (1, [0, 1], True, None)])
    assert not _lost_steps(open_run(tmp_path / "shrunk"))


def test_a_killed_ranks_marks_bound_its_losses_per_site_and_per_split(tmp_path):
    """Rank 1's last block held site '1' of step 3 and not site '4': step 3 of site '4' lacks its batch (the
    check pooled the sites' steps). A split the killed rank never recorded (the probe of rank 0) stays whole."""
    _sessions_run(tmp_path, [(0, range(5), True, None), (1, [0, 1, 2, 3], False, 3)])
    shard = tmp_path / schema.shard_name(1, 0, partial=True)
    with h5py.File(shard, "r+") as handle:  # step 3 of site '4' never reached the disk
        table = handle[schema.SITES_GROUP]["4"]["records"]
        assert table[-1]["step"] == 3
        table.resize((len(table) - 1,))
    with ActivationRecorder(_model(), tmp_path, rank=0) as rec:
        with rec.capture(10, split="probe"):
            rec.model(torch.randn(3, 1, 5, 5))
    run = open_run(tmp_path)
    assert _lost_steps(run) == [("1", 4, 1), ("4", 3, 1), ("4", 4, 1)]  # step 4: rank 1 had stopped before it
    assert run.read("1", 3, "train").lost_records == 0 and len(run.read("1", 3, "train")) == 2 * 3 * 9  # both ranks
    assert run.read("4", 3, "train").lost_records > 0
    assert run.read("4", 10, "probe").lost_records == 0


def test_a_run_opened_without_warnings_lists_the_same_losses(tmp_path, caplog):
    """`warn=False` (the ranks but one of a data-parallel fit open the run too) silences the warnings only."""
    (tmp_path / schema.shard_name(0, 0, partial=True)).write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="actpat"):
        quiet = open_run(tmp_path, warn=False)
    assert caplog.records == [] and [loss.kind for loss in quiet.losses] == ["unwritten"]
    with caplog.at_level(logging.WARNING, logger="actpat"):
        loud = open_run(tmp_path)
    assert quiet.losses == loud.losses and "it is empty" in caplog.text


def test_a_run_whose_every_record_was_lost_says_so_where_a_split_is_asked_for(tmp_path):
    """A writer killed before its first block: analysing the run said only that it 'has no records'."""
    (tmp_path / schema.shard_name(0, 0, partial=True)).write_bytes(b"")
    run = open_run(tmp_path)
    with pytest.raises(ValueError, match=r"has no records\. Every record it held is lost: 1 loss\(es\), the first: "
                                         r"patterns-rank000-00000\.h5\.partial \(it is empty.*`actpat info` lists them"):
        summarize(run, progress=False)
    with pytest.raises(ValueError, match=r"recorded splits \[\], but got 'train'\. Every record it held is lost"):
        summarize(run, split="train", progress=False)
    _write_run(tmp_path / "none", [])
    with pytest.raises(ValueError, match=r"has no records\.$"):
        open_run(tmp_path / "none").steps("1")


def test_records_past_the_first_slice_of_a_records_table_are_indexed_readable(tmp_path, monkeypatch):
    """A site's records table is indexed in slices (of 65,536 rows): every slice's entries read back."""
    from actpat.recorder import reader
    from actpat.recorder.shards import Record, ShardWriter, SiteMeta

    monkeypatch.setattr(reader, "_INDEX_SLICE", 2)
    writer = ShardWriter(tmp_path)
    writer.start()
    meta = SiteMeta("fc", 0, "ReLU", (8,), 8, "flat")
    for step in range(5):
        writer.put(Record(meta, step, 0, "train", np.full((2, 1), step, np.uint8), 1, 2, 0, part=0, ends_step=True))
    writer.close()
    run = open_run(tmp_path)
    assert not run.losses and run.steps("fc").tolist() == list(range(5))
    for step in range(5):
        np.testing.assert_array_equal(run.read("fc", step).bits, np.full((2, 1), step, np.uint8))
