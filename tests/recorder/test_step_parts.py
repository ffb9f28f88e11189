"""A step recorded in several captures (a probe's batches) is read whole, or reported incomplete."""

from __future__ import annotations

import logging

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

from actpat.analysis import summarize
from actpat.analysis.live import live_measures
from actpat.recorder import ActivationRecorder, Prober, open_run
from actpat.recorder.shards import Record, ShardWriter, SiteMeta


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3), nn.ReLU())


def _rows_on_disk(path) -> dict[str, list[tuple[int, int, int, int]]]:
    """Plain h5py: per site, ``(step, part, ends_step, row_count)`` of every record, in file order."""
    out: dict[str, list] = {}
    for shard in sorted(path.glob("*.h5")):
        with h5py.File(shard, "r") as handle:
            for group in handle["sites"].values():
                table = group["records"][()]
                rows = zip(*(table[name].tolist() for name in ("step", "part", "ends_step", "row_count")))
                out.setdefault(group.attrs["site"], []).extend(rows)
    return out


def _capture(rec, model, step, n=2, **kwargs):
    with rec.capture(step, labels=torch.arange(n) % 2, sample_ids=torch.arange(n), **kwargs):
        model(torch.randn(n, 4))


def test_the_captures_of_a_step_are_numbered_and_the_last_ends_it(tmp_path):
    model = _model()
    with ActivationRecorder(model, tmp_path) as rec:
        _capture(rec, model, 5, ends_step=False)
        _capture(rec, model, 5, ends_step=False)
        _capture(rec, model, 5)
        _capture(rec, model, 6)
        _capture(rec, model, 6)  # another capture of an ended step (gradient accumulation): ends it again
    assert _rows_on_disk(tmp_path) == {
        site: [(5, 0, 0, 2), (5, 1, 0, 2), (5, 2, 1, 2), (6, 0, 1, 2), (6, 1, 1, 2)] for site in ("1", "3")
    }
    run = open_run(tmp_path)
    assert run.losses == []
    assert len(run.read("1", 5)) == 6 and run.read("1", 5).lost_records == 0


def test_a_site_missing_from_the_last_capture_gets_an_empty_record_that_ends_its_step(tmp_path):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.use_b = nn.ReLU(), nn.ReLU(), True

        def forward(self, x):
            x = self.a(x)
            return self.b(x) if self.use_b else x

    model = Branchy()
    with ActivationRecorder(model, tmp_path) as rec:
        _capture(rec, model, 0, ends_step=False)
        model.use_b = False
        _capture(rec, model, 0, n=3)
    assert _rows_on_disk(tmp_path) == {"a": [(0, 0, 0, 2), (0, 1, 1, 3)], "b": [(0, 0, 0, 2), (0, 1, 1, 0)]}
    run = open_run(tmp_path)
    assert run.losses == []
    assert (len(run.read("a", 0)), len(run.read("b", 0)), run.read("b", 0).lost_records) == (5, 2, 0)


def test_a_step_without_its_end_is_reported_and_never_measured(tmp_path, caplog):
    model = _model()
    with ActivationRecorder(model, tmp_path) as rec:
        _capture(rec, model, 0)
        _capture(rec, model, 1, ends_step=False)
        _capture(rec, model, 1, ends_step=False)  # the process stops here, before step 1's last capture
    with caplog.at_level(logging.WARNING, logger="actpat"):
        run = open_run(tmp_path)
    assert sorted((loss.site, loss.split, loss.step, loss.kind, loss.records) for loss in run.losses) == [
        ("1", "train", 1, "incomplete", None), ("3", "train", 1, "incomplete", None)
    ]
    assert all("no record ends it (the last on disk is its part 1, parts counting from 0)" in loss.reason
               for loss in run.losses)
    assert "records lost in split 'train', 1 incomplete step(s) from 1 to 1, 2 site(s) (1, 3), rank(s) 0" in caplog.text
    assert len(run.read("1", 1)) == 4 and run.read("1", 1).lost_records == 1  # what is there, flagged
    assert run.verify() == run.losses
    with caplog.at_level(logging.WARNING, logger="actpat"):
        df = summarize(tmp_path, progress=False)
    assert sorted(set(df.step)) == [0]
    assert "*_final measures" in caplog.text  # step 1, the final reference, is the incomplete one


def test_info_counts_the_incomplete_steps_and_the_corrupt_records(tmp_path, capsys):
    from actpat.analysis.cli import main

    model = _model()
    with ActivationRecorder(model, tmp_path) as rec:
        _capture(rec, model, 0)
        _capture(rec, model, 1, ends_step=False)
    (shard,) = tmp_path.glob("*.h5")
    with h5py.File(shard, "r+") as handle:
        handle["sites"]["3"]["bits"][0, 0] ^= 1  # step 0's record of site 3
    assert main(["info", str(tmp_path), "--verify", "--no-progress"]) == 1  # --verify: 1 where records are lost
    out = capsys.readouterr().out
    assert "lost:           corrupt 1 (1 record), incomplete 2 (2 of unknown size)\n" in out
    assert "those of the losses above included, which the analysis leaves out" in out


def test_a_capture_whose_block_raised_does_not_end_its_step(tmp_path):
    model = _model()
    with ActivationRecorder(model, tmp_path) as rec:
        with pytest.raises(RuntimeError, match="the training step failed"):
            with rec.capture(3):
                model(torch.randn(2, 4))
                raise RuntimeError("the training step failed")
        _capture(rec, model, 4)
    assert _rows_on_disk(tmp_path)["1"] == [(3, 0, 0, 2), (4, 0, 1, 2)]
    run = open_run(tmp_path)
    assert {(loss.step, loss.kind) for loss in run.losses} == {(3, "incomplete")}
    assert run.read("3", 4).lost_records == 0


def _write(path, records, rank=0):
    """Write ``(step, part, ends_step)`` records of one site with a writer of ``rank``."""
    meta = SiteMeta("fc", 0, "ReLU", (3,), 3, "flat")
    writer = ShardWriter(path, rank=rank)
    writer.start()
    for step, part, ends_step in records:
        bits = np.full((2, 1), max(part, 0), dtype=np.uint8)
        writer.put(Record(meta, step, 0, "probe", bits, 1, 2, 0, part=part, ends_step=ends_step))
    writer.close()


def test_missing_parts_between_are_counted_and_untracked_records_never_are(tmp_path, caplog):
    # Step 0 lacks parts 1 and 3 (dropped); step 1 is accumulated (each part ends it); 2 and 3 untracked.
    _write(tmp_path, [(0, 0, False), (0, 2, False), (0, 4, True), (1, 0, True), (1, 1, True),
                      (2, -1, False), (2, -1, False), (3, -1, False)])  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="actpat"):
        run = open_run(tmp_path)
    (loss,) = run.losses
    assert (loss.step, loss.kind, loss.records, loss.rank) == (0, "incomplete", 2, 0)
    assert "2 of its first 5 records are missing" in loss.reason and "no record ends it" not in loss.reason
    assert [run.read("fc", step).lost_records for step in (0, 1, 2, 3)] == [2, 0, 0, 0]


def test_the_parts_of_each_rank_are_checked_apart(tmp_path):
    _write(tmp_path, [(7, 0, False), (7, 1, True)], rank=0)
    _write(tmp_path, [(7, 0, False), (7, 1, False)], rank=1)
    run = open_run(tmp_path)
    assert [(loss.rank, loss.step, loss.kind) for loss in run.losses] == [(1, 7, "incomplete")]


def test_a_damaged_part_counts_once_and_the_step_stays_out(tmp_path):
    model = _model()
    with ActivationRecorder(model, tmp_path) as rec:
        for last in (False, False, True):
            _capture(rec, model, 2, ends_step=last)
    (shard,) = tmp_path.glob("*.h5")
    with h5py.File(shard, "r+") as handle:
        handle["sites"]["1"]["bits"][2, 0] ^= 1  # a bit of part 1's first row
    run = open_run(tmp_path)
    assert run.losses == []  # present and numbered: not missing; its checksum fails when it is read
    assert run.read("1", 2).lost_records == 1 and len(run.read("1", 2)) == 4
    assert [(loss.step, loss.kind) for loss in run.losses] == [(2, "corrupt")]


# ---------------------------------------------------------------------------- the prober
@pytest.mark.parametrize(("n", "batch_size", "parts"), [(10, 4, 3), (8, 4, 2), (3, 4, 1)])
def test_each_probe_batch_is_a_part_and_the_last_ends_the_step(n, batch_size, parts, tmp_path):
    g = torch.Generator().manual_seed(0)
    probe = TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))
    with Prober(_model(), probe, tmp_path, 1, batch_size=batch_size) as prober:
        prober.maybe(0)
        prober.maybe(1)
    expected = [(step, part, int(part == parts - 1), min(batch_size, n - part * batch_size))
                for step in (0, 1) for part in range(parts)]  # fmt: skip
    assert _rows_on_disk(tmp_path) == {"1": expected, "3": expected}
    assert open_run(tmp_path).losses == []


def test_a_probe_that_fails_in_its_third_batch_leaves_a_step_reported_incomplete(tmp_path):
    g = torch.Generator().manual_seed(0)
    probe = TensorDataset(torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g))
    calls = []

    def forward(module, batch):
        calls.append(1)
        if len(calls) == 5 + 3:  # the third batch of the second probe
            raise RuntimeError("out of memory")
        return module(batch[0])

    prober = Prober(_model(), probe, tmp_path, 1, batch_size=4, forward=forward)
    prober.maybe(0)
    with pytest.raises(Exception, match="out of memory"):
        prober.maybe(1)
    prober.close()
    run = open_run(tmp_path)
    assert {(loss.site, loss.step, loss.kind) for loss in run.losses} == {("1", 1, "incomplete"), ("3", 1, "incomplete")}
    assert [run.read("1", step).lost_records for step in (0, 1)] == [0, 1]
    assert len(run.read("1", 1)) == 8  # the two batches before the failure, kept and flagged


@pytest.mark.usefixtures("every_probe_gets_statistics")
def test_a_fit_resumed_after_a_cut_probe_takes_no_live_reference_from_it(tmp_path, caplog):
    from actpat.analysis.live import live_measures

    g = torch.Generator().manual_seed(0)
    probe = TensorDataset(torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g))
    fail = [True]

    def forward(module, batch):
        if fail[0] and forward.calls == 5 + 2:  # the third batch of the second probe
            raise RuntimeError("killed")
        forward.calls += 1
        return module(batch[0])

    forward.calls = 0
    model = _model()
    prober = Prober(model, probe, tmp_path, 1, batch_size=4, forward=forward, stats=live_measures,
                    on_stats=lambda step, metrics: None)  # fmt: skip
    prober.maybe(0)
    with pytest.raises(Exception, match="killed"):
        prober.maybe(1)
    state = prober.state_dict()
    prober.close(wait=False)
    fail[0] = False
    received = {}
    resumed = Prober(model, probe, tmp_path, 1, batch_size=4, forward=forward, stats=live_measures,
                     on_stats=received.__setitem__)  # fmt: skip
    resumed.load_state_dict(state)
    with caplog.at_level(logging.WARNING, logger="actpat"):
        resumed.maybe(2)
    resumed.close()
    assert "the last probe (step 1) of site '1' cannot be read back whole" in caplog.text
    assert "jaccard_init" in received[2]["1"] and "jaccard_last" not in received[2]["1"]  # init is whole, last not


def test_a_capture_that_records_nothing_adds_no_record_to_a_step(tmp_path):
    model = _model()
    with ActivationRecorder(model, tmp_path) as rec:
        _capture(rec, model, 4)
        _capture(rec, model, 4, record=False)  # the hooks run, e.g. a check: no closing record either
    assert _rows_on_disk(tmp_path)["1"] == [(4, 0, 1, 2)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["probe", "train"]), st.integers(0, 3), st.integers(1, 4),
                          st.sets(st.integers(0, 3)), st.booleans()), min_size=1, max_size=5))  # fmt: skip
def test_exactly_the_steps_that_lost_a_part_or_their_end_are_reported(tmp_path_factory, steps):
    """Brute force: each (split, step) written as ``parts`` records, some dropped, its end kept or not; the
    reader reports exactly those steps that miss a part or their end, and counts the parts missing."""
    path = tmp_path_factory.mktemp("run")
    records, expected = [], {}
    for split, step, parts, dropped, ended in {(sp, s): (sp, s, n, d, e) for sp, s, n, d, e in steps}.values():
        kept = [part for part in range(parts) if part not in dropped and (ended or part < parts - 1)]
        if not kept:
            continue
        records += [(split, step, part, part == parts - 1) for part in kept]
        missing_between = max(kept) + 1 - len(kept)
        whole = kept[-1] == parts - 1 and not missing_between
        if not whole:
            expected[(split, step)] = missing_between if kept[-1] == parts - 1 else None
    meta = SiteMeta("fc", 0, "ReLU", (3,), 3, "flat")
    writer = ShardWriter(path)
    writer.start()
    for split, step, part, ends_step in records:
        writer.put(Record(meta, step, 0, split, np.zeros((2, 1), np.uint8), 1, 2, 0, part=part, ends_step=ends_step))
    writer.close()
    run = open_run(path)
    assert {(loss.split, loss.step): loss.records for loss in run.losses} == expected
    assert all(loss.kind == "incomplete" for loss in run.losses)


def test_end_step_ends_a_step_whose_captures_could_not_tell(tmp_path):
    model = _model()
    with ActivationRecorder(model, tmp_path) as rec:
        _capture(rec, model, 3, ends_step=False)
        _capture(rec, model, 3, ends_step=False)
        rec.end_step(3, epoch=0)  # e.g. after the optimizer step of two accumulated micro-batches
        rec.end_step(9)  # no capture recorded step 9: nothing to end
    assert _rows_on_disk(tmp_path)["1"] == [(3, 0, 0, 2), (3, 1, 0, 2), (3, 2, 1, 0)]
    run = open_run(tmp_path)
    assert run.losses == [] and len(run.read("1", 3)) == 4


def test_a_step_captured_again_after_a_capture_that_ended_it_is_warned_of_once(tmp_path, caplog):
    model = _model()
    with caplog.at_level(logging.WARNING, logger="actpat"), ActivationRecorder(model, tmp_path) as rec:
        _capture(rec, model, 1, ends_step=False)
        _capture(rec, model, 1)  # the protocol: every capture of the step but its last says ends_step=False
        assert "captured again" not in caplog.text
        _capture(rec, model, 2)
        _capture(rec, model, 2)  # two captures that each end step 2
        _capture(rec, model, 3)
        _capture(rec, model, 3)
        rec.end_step(4)
        _capture(rec, model, 4)
    assert caplog.text.count("captured again") == 1
    assert "step 2 of split 'train' is captured again" in caplog.text and "ends_step=False" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="actpat"), ActivationRecorder(model, tmp_path / "b") as rec:
        rec.end_step(7)  # no capture recorded step 7: nothing was ended
        _capture(rec, model, 7)
    assert "captured again" not in caplog.text


@pytest.mark.parametrize("live", [False, True])
def test_a_resumed_prober_names_a_checkpointed_probe_that_never_reached_the_disk(tmp_path, caplog, live):
    g = torch.Generator().manual_seed(0)
    probe = TensorDataset(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g))
    model = _model()
    with Prober(model, probe, tmp_path, 2, batch_size=4) as prober:
        prober.maybe(0)
        prober.maybe(2)
    # The killed fit probed at steps 4 and 6 and saved a checkpoint saying the last was 6; the records of both
    # never reached the disk. The note names 6, the step the checkpoint holds, and those between as uncertain: which
    # steps the loop reached after each multiple is not known (a module stepping two optimizers per batch reaches
    # only even steps). It spoke of live statistics that this prober has none of.
    stats = dict(stats=live_measures, on_stats=lambda step, metrics: None) if live else {}
    resumed = Prober(model, probe, tmp_path, 2, batch_size=4, **stats)
    resumed.load_state_dict({"version": 1, "last_probe_step": 6, "init_step": 0}, step=7)
    with caplog.at_level(logging.WARNING, logger="actpat"):
        resumed.maybe(8)
    resumed.close()
    assert "recorded probe records at step 6 and any between steps 2 and 6 (its checkpoint says so)" in caplog.text
    assert "holds none there: they never reached the disk" in caplog.text
    assert ("Live statistics against them are left out" in caplog.text) == live
    assert open_run(tmp_path).steps("1", "probe").tolist() == [0, 2, 8]


def test_a_step_before_the_latest_of_its_split_is_refused_and_nothing_is_pooled(tmp_path):
    """Steps that restart (a batch index each epoch) pooled each epoch's records into one step, silently."""
    model = _model()
    with ActivationRecorder(model, tmp_path) as rec:
        for step in (0, 1, 2):
            _capture(rec, model, step)
        with pytest.raises(ValueError, match=r"capture\(1\)` comes after this recorder recorded step 2.*batch index"):
            _capture(rec, model, 1)
        _capture(rec, model, 2, n=3)  # one more capture of the latest step continues it
        _capture(rec, model, 0, split="probe")  # every split has its own time
        with rec.capture(1, record=False):  # a check records nothing: its step is not checked
            model(torch.randn(2, 4))
        # Captures that wrote nothing (a block that raised before the forward, a failed check) set no step to
        # follow: they refused every later capture of an earlier step.
        with pytest.raises(RuntimeError, match="before the forward"):
            with rec.capture(100):
                raise RuntimeError("before the forward")

        def refuse():
            raise ValueError("a setup check")

        with pytest.raises(ValueError, match="a setup check"):
            _capture(rec, model, 50, check=refuse)
        _capture(rec, model, 5)
    rows = _rows_on_disk(tmp_path)["1"]
    assert [(step, rows) for step, _, _, rows in rows] == [(0, 2), (1, 2), (2, 2), (2, 3), (0, 2), (5, 2)]
    run = open_run(tmp_path)
    assert [len(run.read("1", s, "train").bits) for s in (0, 1, 2, 5)] == [2, 2, 5, 2]


def test_a_fractional_step_or_epoch_is_refused_whole_ones_of_any_type_recorded(tmp_path):
    """``capture(1.5)`` was stored as step 1 and pooled with step 1's records, silently."""
    model = _model()
    with ActivationRecorder(model, tmp_path) as rec:
        _capture(rec, model, 1)
        with pytest.raises(ValueError, match=r"`step` to be a whole number, but got 1\.5.*stored as step 1"):
            _capture(rec, model, 1.5)
        with pytest.raises(ValueError, match=r"`epoch` to be a whole number, but got 0\.25"):
            _capture(rec, model, 2, epoch=0.25)
        with pytest.raises(TypeError, match=r"`step` to be an integer, but got None"):
            _capture(rec, model, None)
        with pytest.raises(ValueError, match=r"`step` to be a whole number, but got 2\.5"):
            rec.end_step(2.5)
        for step in (2.0, np.int64(3), torch.tensor(4)):
            _capture(rec, model, step, epoch=np.int32(1))
    run = open_run(tmp_path)
    assert run.steps("1").tolist() == [1, 2, 3, 4]
    assert [len(run.read("1", s).bits) for s in (1, 2, 3, 4)] == [2, 2, 2, 2]
    assert run.read("1", 3).epoch == 1


def test_a_resumed_prober_whose_steps_grew_by_two_names_no_step_it_never_reached(tmp_path, caplog):
    # Two optimizers per batch: steps 0, 2, 4, ...; probes at the first step after each multiple of 3 (4, 6, 10, ...).
    g = torch.Generator().manual_seed(0)
    probe = TensorDataset(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g))
    model = _model()
    with Prober(model, probe, tmp_path, 3, batch_size=8) as prober:
        assert [s for s in range(0, 5, 2) if prober.maybe(s)] == [0, 4]
    resumed = Prober(model, probe, tmp_path, 3, batch_size=8)  # the checkpoint of a fit killed after step 18
    resumed.load_state_dict({"version": 1, "last_probe_step": 18, "init_step": 0}, step=18)
    with caplog.at_level(logging.WARNING, logger="actpat"):
        resumed.open()
    resumed.close()
    assert "recorded probe records at step 18 and any between steps 4 and 18 (its checkpoint says so)" in caplog.text
