"""The one-pass driver: blocks of steps, worker processes, bounded memory, each record read once."""

import logging
import subprocess
import sys
import weakref
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from actpat.analysis import analyze_run, firing_rates, information_plane, summarize
from actpat.analysis.driver import plan_blocks, run_pass
from actpat.analysis.summarize import SummaryConsumer
from actpat.recorder.reader import Run, open_run
from actpat.recorder.shards import Record, ShardWriter, SiteMeta

WIDE = SiteMeta("conv", 0, "ReLU", (24, 2), 24, "channel")  # 2 positions per sample
NARROW = SiteMeta("fc", 1, "ReLU", (5,), 5, "flat")
N_SAMPLES = 30
N_STEPS = 70


def write_run(path, *, ranks=2, empty_steps=(0, 1, 40)):
    """Two ranks of probe records of a drifting source; the wide site has some records without observations."""
    rng = np.random.default_rng(1)
    for rank in range(ranks):
        writer = ShardWriter(path, rank=rank, max_shard_bytes=20_000)
        writer.start()
        ids = np.arange(rank * N_SAMPLES, (rank + 1) * N_SAMPLES)
        for meta, n_positions in ((WIDE, 2), (NARROW, 1)):
            proto = rng.integers(0, 2, (5, meta.n_units))
            units = proto[rng.integers(0, 5, N_SAMPLES * n_positions)]
            for step in range(N_STEPS):
                units = units ^ (rng.random(units.shape) < 0.01)
                bits = np.packbits(units.astype(np.uint8), axis=1, bitorder="little")
                n = N_SAMPLES
                if meta is WIDE and step in empty_steps:
                    bits, n = bits[:0], 0
                writer.put(Record(meta, step, step // 10, "probe", bits, n_positions, n, 0,
                                  sample_ids=ids[:n], labels=ids[:n] % 3))
        writer.close()


@pytest.fixture(scope="module")
def run_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    write_run(path)
    return path


def test_plan_cuts_large_sites_into_blocks_that_cover_every_step_once(run_path):
    run = open_run(run_path)
    assert [(b.site, b.start, b.stop) for b in plan_blocks(run, "probe", run.sites, 1)] == [
        ("conv", 0, N_STEPS), ("fc", 0, N_STEPS)
    ]
    blocks = plan_blocks(run, "probe", run.sites, 2)
    conv = [b for b in blocks if b.site == "conv"]
    assert len(conv) > 1 and all(b.n_steps >= 16 for b in conv)
    for site in run.sites:
        covered = [s for b in blocks if b.site == site for s in b.steps[b.start : b.stop]]
        assert covered == run.steps(site, "probe").tolist()


def test_parallel_blocks_give_the_serial_results(run_path, caplog):
    with caplog.at_level(logging.WARNING, logger="actpat"):
        serial = analyze_run(run_path, progress=False)
    serial_warnings = {r.getMessage() for r in caplog.records}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="actpat"):
        parallel = analyze_run(open_run(run_path), n_jobs=2, progress=False)
    # Warnings logged in the workers come back and are logged here, each once.
    assert "actpat: site 'conv' has records without observations; skipped." in serial_warnings
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("actpat: site 'conv' has records without observations; skipped.") == 1
    pd.testing.assert_frame_equal(serial.metrics, parallel.metrics)
    pd.testing.assert_frame_equal(serial.information_plane, parallel.information_plane)
    assert serial.firing_rates.keys() == parallel.firing_rates.keys()
    for site, per_step in serial.firing_rates.items():
        assert per_step.keys() == parallel.firing_rates[site].keys()
        for step, rates in per_step.items():
            np.testing.assert_array_equal(rates, parallel.firing_rates[site][step])
    # The records without observations are absent, every other (site, step) present once.
    steps = serial.metrics.groupby("site")["step"].unique()
    assert sorted(steps["conv"]) == [s for s in range(N_STEPS) if s not in (0, 1, 40)]
    # init of the wide site is its first record with observations, in every block.
    ji_init = serial.metrics.query("site == 'conv' and metric == 'jaccard_init' and step == 2")["value"].item()
    assert ji_init == 1.0


def test_one_pass_gives_what_each_function_gives(run_path):
    result = analyze_run(run_path, progress=False)
    pd.testing.assert_frame_equal(result.metrics, summarize(run_path, progress=False))
    pd.testing.assert_frame_equal(result.information_plane, information_plane(run_path))
    rates = firing_rates(run_path)
    assert {s: sorted(r) for s, r in rates.items()} == {s: sorted(r) for s, r in result.firing_rates.items()}
    table = result.table()
    keys = ["site", "step", "metric"]
    assert not table.duplicated(keys).any()  # one name, one number
    assert (table.groupby("site_index", sort=False)["step"].apply(lambda s: s.is_monotonic_increasing)).all()
    plane = result.information_plane
    # The flat site's plane is in the table; where both tables name a quantity, it is the same number.
    flat = plane[plane["site"] == "fc"].merge(table, on=keys, suffixes=("", "_table"), validate="one_to_one")
    assert len(flat) == (plane["site"] == "fc").sum() > 0
    np.testing.assert_allclose(flat["value_table"], flat["value"], rtol=0, atol=1e-12)
    # The channel site with two positions per sample: the metric table's mutual_information is per
    # observation, the plane's per sample; the plane stays out of the table.
    assert {"input_information", "mutual_information"} <= set(plane.loc[plane["site"] == "conv", "metric"])
    conv = table[table["site"] == "conv"]
    assert not conv["metric"].str.startswith("input_information").any()
    assert len(conv) == (result.metrics["site"] == "conv").sum()


def test_firing_rates_against_brute_force(run_path):
    run = open_run(run_path)
    rates = firing_rates(run)
    for site in run.sites:
        for step in run.steps(site, "probe")[::17]:
            p = run.read(site, int(step), "probe")
            if len(p):
                np.testing.assert_allclose(rates[site][int(step)], p.unpack().mean(axis=0), rtol=0, atol=1e-15)


def test_each_record_read_once_and_at_most_four_alive(run_path, monkeypatch):
    reads, refs, most = Counter(), [], []
    real = Run.read

    def read(self, site, step, split):
        p = real(self, site, step, split)
        reads[(site, step)] += 1
        refs.append(weakref.ref(p))
        most.append(sum(r() is not None for r in refs))
        return p

    monkeypatch.setattr(Run, "read", read)
    analyze_run(run_path, progress=False)
    run = open_run(run_path)
    assert set(reads) == {(site, int(s)) for site in run.sites for s in run.steps(site, "probe")}
    assert set(reads.values()) == {1}
    # Current, previous, init and final: memory is bounded by a few records of one site, not the run.
    assert max(most) == 4, max(most)


def test_a_block_reads_its_references_again(run_path, monkeypatch):
    run = open_run(run_path)
    blocks = plan_blocks(run, "probe", ["conv"], 2)
    assert len(blocks) > 1
    reads = Counter()
    real = Run.read
    monkeypatch.setattr(Run, "read", lambda self, site, step, split: reads.update([step]) or real(self, site, step, split))
    from actpat.analysis.driver import _read_block

    consumer = {"summary": SummaryConsumer(("init", "last", "final"), 10)}
    for block in blocks:
        _read_block(run, "probe", block, consumer)
    # Beyond one read per step: per later block, init (scanning past the empty steps 0 and 1), the previous
    # step, and the final step (read ahead, kept for when the block reaches it, by the last block only).
    extra = sum(reads.values()) - N_STEPS
    n = len(blocks)
    assert extra == (n - 1) * (3 + 1) + (n - 1)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"n_jobs": 0}, ValueError, "positive int or -1"),
        ({"n_jobs": 2, "client": object()}, ValueError, "either `n_jobs` or a Dask `client`"),
        ({"client": object()}, ValueError, "distributed.Client"),
        ({"split": "val"}, ValueError, r"recorded splits \['probe'\], but got 'val'"),
        ({"sites": ["nope"]}, ValueError, "recorded sites"),
    ],
)
def test_run_pass_validates(run_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        run_pass(run_path, {"s": SummaryConsumer()}, progress=False, **kwargs)


def test_a_failing_worker_stops_the_pass_with_its_error(tmp_path):
    # Channel rows that do not form complete samples: the strict information plane raises in a worker.
    meta = SiteMeta("conv", 0, "ReLU", (4, 3), 4, "channel")
    writer = ShardWriter(tmp_path)
    writer.start()
    for step in range(40):
        bits = np.zeros((3 * 5, 1), dtype=np.uint8)
        writer.put(Record(meta, step, 0, "probe", bits[:-1], 3, 5, 0, obs_index=np.arange(14)))
    writer.put(Record(SiteMeta("fc", 1, "ReLU", (3,), 3, "flat"), 0, 0, "probe", np.zeros((5, 1), np.uint8), 1, 5, 0))
    writer.close()
    with pytest.raises(ValueError, match="complete samples"):
        information_plane(tmp_path, n_jobs=2)
    result = analyze_run(tmp_path, n_jobs=2, progress=False)
    assert set(result.information_plane["site"]) == {"fc"}


@pytest.mark.slow
def test_a_script_without_main_guard_gets_told(run_path, tmp_path):
    script = tmp_path / "no_guard.py"
    script.write_text(f"from actpat.analysis import summarize\nsummarize({str(run_path)!r}, progress=False, n_jobs=2)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "A worker process of the pass died" in out.stderr and "if __name__ == '__main__':" in out.stderr


def _screen(text: str) -> list[str]:
    """The lines a terminal shows for ``text``: a carriage return moves back to the line's start, where what
    follows overwrites what was there."""
    lines, line, col = [], [], 0
    for ch in text:
        if ch == "\n":
            lines.append("".join(line).rstrip())
            line, col = [], 0
        elif ch == "\r":
            col = 0
        else:
            line[col:col + 1] = [ch]
            col += 1
    return lines + ["".join(line).rstrip()]


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_warnings_go_above_the_progress_bar_not_onto_its_line(run_path, capsys, n_jobs):
    console = logging.StreamHandler(sys.stderr)  # a user's console logging (pytest's handlers print nothing)
    logging.getLogger().addHandler(console)
    try:
        summarize(run_path, split="probe", progress=True, n_jobs=n_jobs)
    finally:
        logging.getLogger().removeHandler(console)
    screen = _screen(capsys.readouterr().err)
    warnings = [line for line in screen if "has records without observations" in line]
    assert warnings and all(line.startswith("actpat: site 'conv'") for line in warnings), screen
    assert any("100%" in line for line in screen)  # the bar was drawn
