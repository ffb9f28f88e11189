"""A shard deleted from a run, or one site's group of it unreadable: in a data-parallel run every rank
records the same steps, and a read of a step whose records of one rank were there must say so
(``lost_records``), not return the other ranks' rows as the whole step. The truth is taken from the
damaged file itself, with h5py, before the damage."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from actpat.recorder import open_run, schema
from actpat.recorder.shards import Record, ShardWriter, SiteMeta

SITES = ("a", "b")
N_STEPS = 7
RANKS = (0, 1)


def _plan(step):
    """(split, number of parts) of ``step``: a probe split every third step, in two parts (two probe batches)."""
    return ("probe", 2) if step % 3 == 0 else ("train", 1)


def _bits(rank, site, step, part):
    rng = np.random.default_rng([rank, SITES.index(site), step, part])
    return rng.integers(0, 256, size=(3, 1), dtype=np.uint8)


def _write(out, ranks=RANKS):
    """Every record in a shard of its own (``max_shard_bytes=1``), rank by rank."""
    for rank in ranks:
        writer = ShardWriter(out, rank=rank, max_shard_bytes=1)
        writer.start()
        metas = [SiteMeta(site, i, "ReLU", (8,), 8, "flat") for i, site in enumerate(SITES)]
        for step in range(N_STEPS):
            split, parts = _plan(step)
            for part in range(parts):
                for meta in metas:
                    writer.put(Record(meta, step, 0, split, _bits(rank, meta.site, step, part), 1, 3, 0,
                                      part=part, ends_step=part == parts - 1))  # fmt: skip
        writer.close()


def _held(path):
    """(site, split, step) of every record of a shard, read with h5py."""
    held = set()
    with h5py.File(path, "r") as handle:
        for key, group in handle[schema.SITES_GROUP].items():
            for row in group[schema.RECORDS][:]:
                held.add((group.attrs["site"], row["split"].decode(), int(row["step"])))
    return held


@pytest.mark.parametrize("damage", ["deleted", "site group unreadable"])
def test_a_lost_shard_of_one_rank_counts_in_every_read_of_the_steps_it_held(damage, tmp_path):
    checked = 0
    for victim_index in (0, 1, 5, 9, 13, 17, 19):  # the first, in the middle (a gap in the numbering), the last
        out = tmp_path / f"{damage}-{victim_index}"
        _write(out)
        victim = out / schema.shard_name(1, victim_index)
        lost = _held(victim)
        assert lost
        if damage == "deleted":
            victim.unlink()
        else:
            with h5py.File(victim, "r+") as handle:
                del next(iter(handle[schema.SITES_GROUP].values()))[schema.RECORDS]
        run = open_run(out, warn=False)
        assert run.losses, "the damage is listed"
        _check_reads(run, lost)
        checked += 1
    assert checked == 7  # every victim


def _check_reads(run, lost):
    """Every step of either rank read back: exact, or its loss counted."""
    checked = 0
    for site in SITES:
        for split in ("train", "probe"):
            for step in run.steps(site, split).tolist():
                patterns = run.read(site, step, split)
                parts = _plan(step)[1]
                whole = (site, split, step) not in lost
                # Each damaged shard held one record: counted once, though listed also as a step cut short.
                assert patterns.lost_records == (0 if whole else 1), (site, split, step)
                if whole:  # exact: every rank's rows, bit for bit
                    expected = np.concatenate([_bits(rank, site, step, part) for rank in RANKS
                                               for part in range(parts)])  # fmt: skip
                    np.testing.assert_array_equal(patterns.bits, expected)
                checked += 1
    assert checked == len(SITES) * N_STEPS


@pytest.mark.parametrize("ranks", [(0,), RANKS], ids=["one rank", "two ranks"])
def test_the_last_shards_of_a_closed_writer_deleted_are_reported_by_its_marks(ranks, tmp_path):
    # Nothing after them in the numbering shows a gap: the writer's marks file (the last step it queued in
    # each split) does, here for the last step, 6 (a probe step in two parts, each site's in shards 16 to 19).
    _write(tmp_path, ranks)
    rank = ranks[-1]
    lost = set()
    for index in (16, 17, 18, 19):
        victim = tmp_path / schema.shard_name(rank, index)
        lost |= _held(victim)
        victim.unlink()
    assert lost == {(site, "probe", 6) for site in SITES}
    run = open_run(tmp_path, warn=False)
    for site in SITES:
        (loss,) = [loss for loss in run.losses if loss.site == site and loss.steps is not None]
        assert loss.kind == "missing" and loss.split == "probe" and loss.rank == rank
        assert loss.may_hold(site, "probe", 6) and not loss.may_hold(site, "probe", 3)
        assert "closed" in loss.reason and "missing" in loss.reason
    if len(ranks) == 1:
        for site in SITES:
            assert run.steps(site, "probe").tolist() == [0, 3]
            with pytest.raises(KeyError, match=r"step 6 has no record.*may be in damaged parts.*up to 6 and closed"):
                run.read(site, 6, "probe")
    else:
        _check_reads(run, lost)


def test_a_writer_that_closes_while_the_run_is_listed_is_read_whole_not_as_missing_its_last_shards(tmp_path, monkeypatch):
    """A run opened while its writer finalizes its last shards and closes: the first listing of the directory misses
    those shards, the marks file, read after, says closed up to the last step. The shards are listed again after the
    marks are read, so that the session's shards are all there and nothing is taken as missing."""
    import actpat.recorder.reader as reader

    _write(tmp_path, RANKS)
    late = {schema.shard_name(RANKS[-1], index) for index in (16, 17, 18, 19)}  # made and finalized after the listing
    real, calls = os.listdir, []

    def listdir(path):
        calls.append(path)
        names = real(path)
        return [name for name in names if name not in late] if len(calls) == 1 else names

    monkeypatch.setattr(reader.os, "listdir", listdir)
    run = open_run(tmp_path, warn=False)
    assert run.losses == []
    for site in SITES:
        assert run.steps(site, "probe").tolist() == [0, 3, 6]
    _check_reads(run, set())


def test_a_step_captured_again_after_its_end_is_not_taken_as_ended_by_a_lost_shard(tmp_path):
    # Two captures of step 1, each ending it (ends_step=True, the default, given twice): the end of its first part
    # is no proof that the shard after it held nothing of the step. Rank 1's shard holding its second part is lost.
    for rank in RANKS:
        writer = ShardWriter(tmp_path, rank=rank, max_shard_bytes=1)
        writer.start()
        meta = SiteMeta("a", 0, "ReLU", (8,), 8, "flat")
        for step, part in ((0, 0), (1, 0), (1, 1), (2, 0)):
            writer.put(Record(meta, step, 0, "train", _bits(rank, "a", step, part), 1, 3, 0, part=part,
                              ends_step=True))
        writer.close()
    victim = tmp_path / schema.shard_name(1, 2)
    assert _held(victim) == {("a", "train", 1)}
    victim.unlink()
    run = open_run(tmp_path, warn=False)
    assert run.read("a", 1, "train").lost_records > 0
    for step in (0, 2):  # the steps around it are whole
        patterns = run.read("a", step, "train")
        assert patterns.lost_records == 0
        np.testing.assert_array_equal(patterns.bits, np.concatenate([_bits(rank, "a", step, 0) for rank in RANKS]))


def _record_dropping(out):
    """Rank 0 writes every record; rank 1 drops site "b"'s record of every step under backpressure: a queue bound
    of one byte drops any record put while another waits, and each step puts "a" (into an empty queue) then "b"."""
    import time

    metas = [SiteMeta(site, i, "ReLU", (8,), 8, "flat") for i, site in enumerate(SITES)]
    for rank in RANKS:
        writer = ShardWriter(out, rank=rank, **({"on_backpressure": "drop", "max_queue_bytes": 1} if rank else {}))
        writer.start()
        for step in range(N_STEPS):
            while writer.queued_bytes:
                time.sleep(0.001)
            writer.put_many([Record(meta, step, 0, "train", _bits(rank, meta.site, step, 0), 1, 3, 0, part=0,
                                    ends_step=True) for meta in metas])  # fmt: skip
        writer.close()


def test_records_dropped_under_backpressure_are_reported_in_every_read_of_their_step(tmp_path):
    _record_dropping(tmp_path)
    run = open_run(tmp_path, warn=False)
    assert run.dropped_records == N_STEPS
    for step in range(N_STEPS):
        whole = run.read("a", step, "train")
        assert whole.lost_records == 0
        np.testing.assert_array_equal(whole.bits, np.concatenate([_bits(rank, "a", step, 0) for rank in RANKS]))
        dropped = run.read("b", step, "train")  # rank 0's rows alone: not the whole step
        assert dropped.lost_records == 1
        np.testing.assert_array_equal(dropped.bits, _bits(0, "b", step, 0))


def test_drops_beyond_the_bound_on_queued_markers_are_said(tmp_path, caplog, monkeypatch):
    from actpat.recorder import shards

    monkeypatch.setattr(shards, "_MAX_QUEUED_MARKERS", 0)
    with caplog.at_level("WARNING", logger="actpat"):
        _record_dropping(tmp_path)
    assert "further drops are counted but not marked" in caplog.text


def test_a_session_that_died_before_queuing_anything_leaves_no_gap(tmp_path):
    # Its marks file alone holds index 0 (the writer numbers the next session after it): no shard is missing there.
    (tmp_path / schema.marks_name(0, 0)).write_bytes(schema.marks_text({}, closed=False))
    writer = ShardWriter(tmp_path, max_shard_bytes=1)
    writer.start()
    meta = SiteMeta("a", 0, "ReLU", (8,), 8, "flat")
    for step in range(3):  # untracked records (part -1), as ShardWriter.put writes them unnumbered
        writer.put(Record(meta, step, 0, "train", _bits(0, "a", step, 0), 1, 3, 0))
    writer.close()
    assert not (tmp_path / schema.shard_name(0, 0)).exists() and (tmp_path / schema.shard_name(0, 1)).exists()
    run = open_run(tmp_path, warn=False)
    assert run.losses == []
    assert [run.read("a", step).lost_records for step in range(3)] == [0, 0, 0]


def test_an_empty_record_is_never_dropped(tmp_path):
    # A step's end (an empty record, as `end_step()` queues) costs no memory: queued behind a record larger than
    # the whole budget, it passes, and the step reads whole.
    writer = ShardWriter(tmp_path, on_backpressure="drop", max_queue_bytes=1)
    writer.start()
    meta = SiteMeta("a", 0, "ReLU", (8,), 8, "flat")
    end = Record(meta, 0, 0, "train", np.zeros((0, 1), np.uint8), 1, 0, 0, part=1, ends_step=True)
    assert writer.put_many([Record(meta, 0, 0, "train", _bits(0, "a", 0, 0), 1, 3, 0, part=0), end]) == 2
    writer.close()
    assert writer.dropped_records == 0
    run = open_run(tmp_path, warn=False)
    assert run.losses == [] and run.read("a", 0).lost_records == 0


def test_a_run_whose_only_writer_queued_but_wrote_no_shard_yet_opens(tmp_path):
    # A live writer's marks file names queued steps before its first shard file exists: nothing is numbered yet.
    (tmp_path / schema.marks_name(1, 0)).write_bytes(schema.marks_text({"train": 3}, closed=False))
    _write(tmp_path, ranks=(0,))
    run = open_run(tmp_path, warn=False)
    assert not [loss for loss in run.losses if loss.kind == "missing"]


def _write_whole_steps(out, ranks, n_steps=5):
    """Train steps of one record per site, each record in a shard of its own: the last shard holds only
    site b's record of the last step."""
    for rank in ranks:
        writer = ShardWriter(out, rank=rank, max_shard_bytes=1)
        writer.start()
        for step in range(n_steps):
            for i, site in enumerate(SITES):
                writer.put(Record(SiteMeta(site, i, "ReLU", (8,), 8, "flat"), step, 0, "train",
                                  _bits(rank, site, step, 0), 1, 3, 0, part=0, ends_step=True))  # fmt: skip
        writer.close()


@pytest.mark.parametrize("ranks", [(0,), RANKS], ids=["one rank", "two ranks"])
def test_a_deleted_last_shard_holding_some_sites_of_the_last_step_is_reported_by_the_marks_per_site(ranks, tmp_path):
    # Site a's record of step 4 is on disk, so the session's last step on disk reaches its mark in the split:
    # only the last step per site, stored when the session closed, shows that site b's is gone.
    _write_whole_steps(tmp_path, ranks)
    rank = ranks[-1]
    marks = schema.read_marks(tmp_path / schema.marks_name(rank, 0))
    assert marks.closed and marks.sites == {("a", "train"): 4, ("b", "train"): 4}
    victim = tmp_path / schema.shard_name(rank, 9)
    assert _held(victim) == {("b", "train", 4)}
    victim.unlink()
    run = open_run(tmp_path, warn=False)
    (loss,) = [loss for loss in run.losses if loss.steps is not None]
    assert (loss.kind, loss.site, loss.split, loss.rank) == ("missing", "b", "train", rank)
    assert loss.may_hold("b", "train", 4) and not loss.may_hold("b", "train", 3)
    assert not [loss for loss in run.losses if loss.site == "a"]
    np.testing.assert_array_equal(run.read("a", 4, "train").bits,
                                  np.concatenate([_bits(r, "a", 4, 0) for r in ranks]))  # fmt: skip
    if len(ranks) == 1:
        with pytest.raises(KeyError, match=r"step 4 has no record.*may be in damaged parts"):
            run.read("b", 4, "train")
    else:  # rank 0's rows alone are not the step
        assert run.read("b", 4, "train").lost_records > 0


def test_closing_marks_per_site_outgrow_the_padding_or_fall_back_to_the_marks_per_split(tmp_path, monkeypatch):
    import actpat.recorder.shards as shards

    sites = [f"block{i:03d}.{'very_long_module_name' * 2}" for i in range(150)]  # far more than 4096 bytes of JSON
    writer = ShardWriter(tmp_path / "long")
    writer.start()
    for i, site in enumerate(sites):
        writer.put(Record(SiteMeta(site, i, "ReLU", (8,), 8, "flat"), 2, 0, "train", np.zeros((1, 1), np.uint8), 1, 1, 0))
    writer.close()
    path = tmp_path / "long" / schema.marks_name(0, 0)
    assert path.stat().st_size > schema.MARKS_BYTES
    marks = schema.read_marks(path)
    assert marks.closed and marks.queued == {"train": 2} and marks.sites == {(site, "train"): 2 for site in sites}

    real = os.pwrite
    for raises in (True, False):  # a full disk part way: an error, or (as Linux reports it) a short count
        def short_disk(fd, data, offset):
            if bytes(data[:15]) == b'{"closed": true' and len(data) > schema.MARKS_BYTES:
                written = real(fd, data[: schema.MARKS_BYTES + 100], offset)  # the file grew, then the disk filled
                if raises:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return written
            return real(fd, data, offset)

        monkeypatch.setattr(shards.os, "pwrite", short_disk)
        writer = ShardWriter(tmp_path / f"full-{raises}")
        writer.start()
        for i, site in enumerate(sites):
            writer.put(Record(SiteMeta(site, i, "ReLU", (8,), 8, "flat"), 2, 0, "train", np.zeros((1, 1), np.uint8), 1, 1, 0))
        writer.close()
        marks = schema.read_marks(tmp_path / f"full-{raises}" / schema.marks_name(0, 0))
        assert marks == schema.Marks({"train": 2}, True, None), raises  # closed, per split: what fits in place


def test_closing_marks_longer_than_the_padding_replace_the_file_whole_never_part_written(tmp_path, monkeypatch):
    """Written in place, marks that outgrow the file's padding could be read cut short by a reader opening the run
    at that instant (then taken as damaged): they go into a new file that replaces the marks file. A new file left
    by a crash before the replace is ignored by readers and by the next writer."""
    import actpat.recorder.shards as shards

    sites = [f"block{i:03d}.{'very_long_module_name' * 2}" for i in range(150)]
    path = tmp_path / schema.marks_name(0, 0)
    seen = []
    real = os.replace

    def replace(src, dst):
        seen.append((schema.read_marks(Path(dst)), schema.read_marks(Path(src))))  # what a reader finds, each side
        real(src, dst)

    monkeypatch.setattr(shards.os, "replace", replace)
    writer = ShardWriter(tmp_path)
    writer.start()
    for i, site in enumerate(sites):
        writer.put(Record(SiteMeta(site, i, "ReLU", (8,), 8, "flat"), 2, 0, "train", np.zeros((1, 1), np.uint8), 1, 1, 0))
    writer.close()
    ((before, after),) = seen
    assert before == schema.Marks({"train": 2}, False, None)  # the open session's marks, whole, until the replace
    assert after.closed and after.sites == {(site, "train"): 2 for site in sites}
    assert schema.read_marks(path) == after and sorted(p.name for p in tmp_path.glob("*.new")) == []

    (tmp_path / (path.name + ".new")).write_bytes(b'{"closed": tr')  # a crash between the write and the replace
    run = open_run(tmp_path, warn=False)
    assert run.losses == [] and run.steps(sites[0]).tolist() == [2]
    writer = ShardWriter(tmp_path)
    writer.start()
    writer.put(Record(SiteMeta(sites[0], 0, "ReLU", (8,), 8, "flat"), 3, 0, "train", np.zeros((1, 1), np.uint8), 1, 1, 0))
    writer.close()
    assert open_run(tmp_path, warn=False).steps(sites[0]).tolist() == [2, 3]


@pytest.mark.parametrize("also", [None, "an unreadable group of b"])
def test_a_site_whose_only_records_of_a_split_were_in_the_deleted_last_shard_is_reported(tmp_path, also):
    # Site b's step 4 of train (in two parts) ends in the last shard, beside b's only probe record: neither the loss
    # the cut-short train step is nor one of b's site groups unreadable elsewhere stands for the probe split.
    writer = ShardWriter(tmp_path, max_shard_bytes=1)
    writer.start()
    metas = {site: SiteMeta(site, i, "ReLU", (8,), 8, "flat") for i, site in enumerate(SITES)}
    for step in range(5):
        for part in (0, 1):
            for site in SITES:
                writer.put(Record(metas[site], step, 0, "train", _bits(0, site, step, part), 1, 3, 0, part=part,
                                  ends_step=part == 1))  # fmt: skip
        if step in (0, 2):
            writer.put(Record(metas["a"], step, 0, "probe", _bits(0, "a", step, 9), 1, 3, 0, part=0, ends_step=True))
    writer.put(Record(metas["b"], 4, 0, "probe", _bits(0, "b", 4, 9), 1, 3, 0, part=0, ends_step=True))
    writer.close()
    shards = sorted(tmp_path.glob("*.h5"))
    assert _held(shards[-1]) == {("b", "probe", 4)}
    for victim in shards[-2:]:
        victim.unlink()
    if also:
        with h5py.File(shards[1], "r+") as handle:  # b's part 0 of step 0
            assert set(handle[schema.SITES_GROUP]) == {"b"}
            del handle[schema.SITES_GROUP]["b"][schema.RECORDS]
    run = open_run(tmp_path, warn=False)
    if also:  # that loss may hold any step of b in the splits the rank records, the probe's included
        assert [(loss.kind, loss.site, loss.split, loss.step) for loss in run.losses] == [
            ("unreadable", "b", None, None), ("incomplete", "b", "train", 0), ("incomplete", "b", "train", 4)]
        why = r"site group 'b' cannot be read"
    else:
        assert [(loss.kind, loss.site, loss.split, loss.step) for loss in run.losses] == [
            ("incomplete", "b", "train", 4), ("missing", "b", "probe", None)]
        (probe_loss,) = [loss for loss in run.losses if loss.split == "probe"]
        assert probe_loss.may_hold("b", "probe", 4) and not probe_loss.may_hold("b", "probe", 5)
        why = r"up to 4 and closed"
    with pytest.raises(KeyError, match=rf"Records of 'b' may be in damaged parts of the run: 1 loss.*{why}"):
        run.read("b", 4, "probe")


@pytest.mark.parametrize("text", [b'{"closed": true, "queued": {"train": Infinity}}', b"[" * 100_000, b"\xff\xfe",
                                  b'{"closed": true, "queued": {"train": 2}, "sites": []}'])  # fmt: skip
def test_a_damaged_marks_file_is_said_and_the_run_still_opens(text, tmp_path, caplog):
    _write_whole_steps(tmp_path, (0,))
    (tmp_path / schema.marks_name(0, 0)).write_bytes(text)
    with caplog.at_level(logging.WARNING, logger="actpat"):
        run = open_run(tmp_path)
    assert "cannot read the marks file" in caplog.text and run.steps("a", "train").tolist() == list(range(5))


def test_unreadable_groups_holding_a_sites_last_steps_are_its_one_report_not_a_missing_shard_too(tmp_path):
    # Rank 1's two parts of b's last step (probe step 6), each in a shard of its own, unreadable: its closed marks
    # name step 6, its last readable step of b is 3. The unreadable groups stand for steps 4 to 6: they were listed
    # again as a "missing" shard (deleted?) and as an incomplete step, and counted three times in the read.
    _write(tmp_path)
    lost = set()
    for index in (17, 19):
        victim = tmp_path / schema.shard_name(1, index)
        lost |= _held(victim)
        with h5py.File(victim, "r+") as handle:
            del next(iter(handle[schema.SITES_GROUP].values()))[schema.RECORDS]
    assert lost == {("b", "probe", 6)}
    run = open_run(tmp_path, warn=False)
    assert sorted((loss.kind, loss.site, loss.shard_index) for loss in run.losses) == [
        ("unreadable", "b", 17), ("unreadable", "b", 19)]
    patterns = run.read("b", 6, "probe")
    assert patterns.lost_records == 2  # the two parts of rank 1
    expected = np.concatenate([_bits(0, "b", 6, part) for part in range(2)])
    np.testing.assert_array_equal(patterns.bits, expected)


@pytest.mark.parametrize("closed", [False, True])
def test_queued_records_of_a_writer_with_no_shard_on_disk_are_reported(tmp_path, closed):
    # A writer killed after its marks named a queued step and before its first shard reached the disk (the writer
    # thread waits up to 50 ms between hand-offs), or a closed one whose every shard was deleted: no site is known.
    _write(tmp_path / "whole", ranks=(0,))
    for path in (tmp_path / "whole").iterdir():
        if path.name.endswith(schema.SHARD_SUFFIX):
            path.unlink()
        elif not closed:  # the marks file as it stood while the writer ran: not closed, the steps it had queued
            marks = json.loads(path.read_text())
            path.write_text(json.dumps({"closed": False, "queued": marks["queued"]}))
    run = open_run(tmp_path / "whole", warn=False)
    assert run.sites == []
    lost = sorted((loss.kind, loss.site or "", loss.split, loss.steps) for loss in run.losses)
    if closed:  # its closing marks name each site's last step
        assert lost == [("missing", site, split, (0, last)) for site in SITES for split, last in (("probe", 6),
                                                                                                  ("train", 5))]
    else:
        assert lost == [("unwritten", "", "probe", (None, 6)), ("unwritten", "", "train", (None, 5))], lost
