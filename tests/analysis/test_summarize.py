"""summarize() on real shards written by ShardWriter, against brute force per site and step."""

import logging
import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from actpat.analysis.summarize import summarize
from actpat.recorder.reader import open_run
from actpat.recorder.shards import Record, ShardWriter, SiteMeta

CONV = SiteMeta("block.conv_relu", 0, "ReLU", (65, 2, 2), 65, "channel")
DENSE = SiteMeta("head.relu", 1, "ReLU", (10,), 10, "flat")
N_SAMPLES = 40
STEPS = [0, 5, 10, 15]


def unit_tuple(row, n_units):
    return tuple((int(row[j // 8]) >> (j % 8)) & 1 for j in range(n_units))


def h_of(counter):
    n = sum(counter.values())
    return -sum(c / n * math.log2(c / n) for c in counter.values())


def pack(units01):
    return np.packbits(np.asarray(units01, dtype=np.uint8), axis=1, bitorder="little")


def make_run(tmp_path, *, labels="all"):
    """Probe records of a slowly drifting pattern source; train records of other samples."""
    rng = np.random.default_rng(0)
    truth = {}
    writer = ShardWriter(tmp_path, max_shard_bytes=4000)  # several shards
    writer.start()
    for meta, n_positions in ((CONV, 4), (DENSE, 1)):
        proto = rng.integers(0, 2, (6, meta.n_units))
        which = rng.integers(0, 6, N_SAMPLES * n_positions)
        units = proto[which]
        y = np.arange(N_SAMPLES) % 3
        if labels == "partial":
            y[:5] = -1
        elif labels == "none":
            y[:] = -1
        for i, step in enumerate(STEPS):
            flip = rng.random(units.shape) < 0.02 * i
            cur = units ^ flip
            truth[(meta.site, step)] = (cur, np.repeat(y, n_positions))
            writer.put(Record(meta, step, i // 2, "probe", pack(cur), n_positions, N_SAMPLES, i,
                              sample_ids=np.arange(N_SAMPLES), labels=y))
            other = rng.integers(0, 2, (8 * n_positions, meta.n_units))
            writer.put(Record(meta, step, i // 2, "train", pack(other), n_positions, 8, 0,
                              sample_ids=np.arange(1000 + 8 * i, 1008 + 8 * i), labels=np.zeros(8, dtype=np.int64)))
    writer.close()
    return truth


def brute_metrics(truth, site, step, ref_steps, threshold=10):
    units, y = truth[(site, step)]
    n, n_units = units.shape
    pats = [tuple(r) for r in units.tolist()]
    c = Counter(pats)
    h = h_of(c)
    h_max = min(n_units, math.log2(n))
    m = {
        "n_observations": n, "n_units": n_units, "entropy": h,
        "entropy_mm": h + (len(c) - 1) / (2 * n * math.log(2)), "entropy_max": h_max,
        "normalized_entropy": h / h_max, "distinct": len(c), "distinct_fraction": len(c) / n,
        "top_count": max(c.values()), "top_mass": max(c.values()) / n, "saturated": float(len(c) >= 0.9 * n),
    }
    keep = [i for i in range(n) if y[i] >= 0]
    if keep:
        ca = Counter(pats[i] for i in keep)
        cl = Counter(int(y[i]) for i in keep)
        cal = Counter((pats[i], int(y[i])) for i in keep)
        ha, hl, hal = h_of(ca), h_of(cl), h_of(cal)
        m.update(label_entropy=hl, joint_entropy=hal, conditional_entropy=hal - hl,
                 mutual_information=ha + hl - hal, label_conditional_entropy=hal - ha)
        # The normalizers of the reference implementation, with C = the classes present.
        n_lab, n_cls = len(keep), len(cl)
        h_cond_max = min(n_units, math.log2(n_lab / n_cls))
        m.update(conditional_entropy_normalized=(hal - hl) / h_cond_max,
                 mutual_information_normalized=(ha + hl - hal) / (min(n_units, math.log2(n_lab)) - h_cond_max))
    rates = units.mean(axis=0)
    ent = [0.0 if p in (0, 1) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p)) for p in rates]
    m.update(firing_rate_mean=float(np.mean(rates)), unit_entropy_mean=float(np.mean(ent)),
             dead_units=int((rates == 0).sum()), always_on_units=int((rates == 1).sum()),
             nan_count=STEPS.index(step))
    for name, ref in ref_steps.items():
        ref_units, _ = truth[(site, ref)]
        cr = Counter(tuple(r) for r in ref_units.tolist())
        for suffix, t in (("", 0), ("_t", threshold)):
            s1 = {a for a, k in c.items() if k > t}
            s2 = {a for a, k in cr.items() if k > t}
            m[f"jaccard{suffix}_{name}"] = len(s1 & s2) / len(s1 | s2) if s1 | s2 else math.nan
        keys = set(c) | set(cr)
        m[f"weighted_jaccard_{name}"] = sum(min(c[a], cr[a]) for a in keys) / sum(max(c[a], cr[a]) for a in keys)
        same = [a == b for a, b in zip(units.tolist(), ref_units.tolist())]
        m[f"identical_fraction_{name}"] = sum(same) / n
        m[f"hamming_{name}"] = int((units != ref_units).sum()) / (n * n_units)
        m[f"distinct_change_{name}"] = len(c) - len(cr)
        m[f"distinct_change_relative_{name}"] = (len(c) - len(cr)) / len(c)
    return m


def check_table(table, truth, references=("init", "last", "final")):
    assert list(table.columns) == ["step", "epoch", "split", "site", "site_index", "metric", "value"]
    assert table["step"].dtype == np.int64 and table["value"].dtype == np.float64
    assert list(dict.fromkeys(table["site"])) == [CONV.site, DENSE.site]  # forward order
    for (site, step), group in table.groupby(["site", "step"]):
        refs = {}
        if "init" in references:
            refs["init"] = STEPS[0]
        if "last" in references and step != STEPS[0]:
            refs["last"] = STEPS[STEPS.index(step) - 1]
        if "final" in references:
            refs["final"] = STEPS[-1]
        expected = brute_metrics(truth, site, step, refs)
        got = dict(zip(group["metric"], group["value"]))
        assert set(got) == set(expected), (site, step, set(got) ^ set(expected))
        for key, value in expected.items():
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(got[key]), key
            else:
                assert got[key] == pytest.approx(value, abs=1e-12), (site, step, key)
        assert set(group["epoch"]) == {STEPS.index(step) // 2}
        assert set(group["site_index"]) == {0 if site == CONV.site else 1}
        assert set(group["split"]) == {"probe"}


def test_matches_brute_force(tmp_path):
    truth = make_run(tmp_path)
    assert len(open_run(tmp_path).shards) > 1
    table = summarize(tmp_path, split="probe", progress=False)
    check_table(table, truth)
    assert len(table.groupby(["site", "step"])) == 2 * len(STEPS)


def test_parallel_equals_serial_and_accepts_a_run(tmp_path):
    make_run(tmp_path)
    serial = summarize(open_run(tmp_path), split="probe", progress=False)
    parallel = summarize(tmp_path, split="probe", progress=False, n_jobs=2)
    pd.testing.assert_frame_equal(serial, parallel)


def test_reference_subset_and_threshold(tmp_path):
    truth = make_run(tmp_path)
    table = summarize(tmp_path, "probe", references=["last"], threshold=10, progress=False)
    check_table(table, truth, references=("last",))
    assert not table["metric"].str.endswith(("_init", "_final")).any()


def test_labels_partial_and_missing(tmp_path, caplog):
    truth = make_run(tmp_path / "partial", labels="partial")
    with caplog.at_level(logging.WARNING, logger="actpat.analysis.summarize"):
        table = summarize(tmp_path / "partial", split="probe", progress=False)
    check_table(table, truth)
    assert sum("have no label" in r.message for r in caplog.records) == 2  # once per site
    make_run(tmp_path / "none", labels="none")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="actpat.analysis.summarize"):
        table = summarize(tmp_path / "none", split="probe", progress=False)
    assert not table["metric"].isin(["mutual_information", "label_entropy"]).any()
    # Left out, and said so: once per site.
    assert sum("without any labelled observation" in r.message for r in caplog.records) == 2


def test_different_observations_leave_out_stability(tmp_path, caplog):
    make_run(tmp_path)
    with caplog.at_level(logging.WARNING, logger="actpat.analysis.summarize"):
        table = summarize(tmp_path, split="train", progress=False)
    assert "jaccard_init" in set(table["metric"])
    stab = table[table["metric"].str.startswith(("identical_fraction", "hamming"))]
    # Only a step compared with itself (init at the first step, final at the last) shares observations.
    assert set(zip(stab["step"], stab["metric"])) == {
        (STEPS[0], "identical_fraction_init"), (STEPS[0], "hamming_init"),
        (STEPS[-1], "identical_fraction_final"), (STEPS[-1], "hamming_final"),
    }
    assert any("not provably the same inputs" in r.message for r in caplog.records)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "val"}, r"recorded splits \['probe', 'train'\], but got 'val'"),
        ({"split": None}, r"recorded splits \['probe', 'train'\], but got None \(the run has several splits"),
        ({"references": ("init", "best")}, r"subset of \('init', 'last', 'final'\), but got \['best'\]"),
        ({"n_jobs": 0}, "positive int or -1"),
        ({"threshold": -1}, "non-negative int, but got -1"),
    ],
)
def test_validation(tmp_path, kwargs, match):
    make_run(tmp_path)
    with pytest.raises(ValueError, match=match):
        summarize(tmp_path, progress=False, **{"split": "probe", **kwargs})


def test_stability_on_the_shared_observations_of_subsampled_records(tmp_path):
    # Each step keeps a different random subset of the (sample, position) grid (obs_index).
    rng = np.random.default_rng(3)
    meta = SiteMeta("conv", 0, "ReLU", (12, 3), 12, "channel")
    n_samples, n_positions = 10, 3
    grid = rng.integers(0, 2, (n_samples * n_positions, 12))
    kept, units = {}, {}
    writer = ShardWriter(tmp_path)
    writer.start()
    for step in (0, 1):
        obs = np.sort(rng.choice(n_samples * n_positions, 20, replace=False))
        cur = grid[obs] ^ (rng.random((20, 12)) < 0.2 * step)
        kept[step], units[step] = obs, cur
        writer.put(Record(meta, step, 0, "probe", pack(cur), n_positions, n_samples, 0,
                          sample_ids=np.arange(100, 100 + n_samples), labels=None, obs_index=obs))
    writer.close()
    table = summarize(tmp_path, references=("init",), progress=False)
    got = table[table["step"] == 1].set_index("metric")["value"]
    shared = np.intersect1d(kept[0], kept[1])
    a = units[1][np.searchsorted(kept[1], shared)]
    b = units[0][np.searchsorted(kept[0], shared)]
    assert got["identical_fraction_init"] == pytest.approx(np.mean((a == b).all(axis=1)))
    assert got["hamming_init"] == pytest.approx((a != b).sum() / (shared.size * 12))


def test_a_lost_first_record_is_not_taken_for_init(tmp_path, caplog):
    """The record of step 0 fails its checksum: step 1 is the first readable one, but not the init."""
    import h5py

    from actpat.recorder import schema
    from actpat.recorder.shards import Record, ShardWriter, SiteMeta

    meta = SiteMeta("fc", 0, "ReLU", (8,), 8, "flat")
    writer = ShardWriter(tmp_path)
    writer.start()
    for step in range(3):
        bits = (np.arange(6, dtype=np.uint8) * (step + 1)).reshape(6, 1)
        writer.put(Record(meta, step, 0, "probe", bits, 1, 6, 0, sample_ids=np.arange(6), labels=np.arange(6) % 2))
    writer.close()
    intact = summarize(tmp_path, progress=False)
    assert intact["metric"].str.endswith("_init").any()
    (shard,) = tmp_path.glob("*.h5")
    with h5py.File(shard, "r+") as f:
        group = f["sites"][schema.site_key("fc")]
        group["bits"][0] = group["bits"][0] ^ 1  # row 0 belongs to step 0
    with caplog.at_level("WARNING"):
        table = summarize(tmp_path, progress=False)
    assert table["step"].unique().tolist() == [1, 2]
    assert not table["metric"].str.endswith("_init").any()
    assert table["metric"].str.endswith("_last").any() and table["metric"].str.endswith("_final").any()
    assert "first record may be among the lost ones" in caplog.text and "_init measures are left out" in caplog.text
    # Everything else is what the intact run gives for the same steps.
    keep = ~intact["metric"].str.endswith(("_init", "_last")) & intact["step"].isin([1, 2])
    expected = intact[keep].reset_index(drop=True)
    got = table[~table["metric"].str.endswith("_last")].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected)


def write_halves(path, rng, *, steps: int, halves, rank: int = 0) -> None:
    """Site "fc" (8 units): per step one record of 6 random samples per half (sample ids 6 * half + 0..5)."""
    meta = SiteMeta("fc", 0, "ReLU", (8,), 8, "flat")
    writer = ShardWriter(path, rank=rank)
    writer.start()
    for step in range(steps):
        for half in halves:
            bits = rng.integers(0, 256, (6, 1), dtype=np.uint8)
            writer.put(Record(meta, step, 0, "probe", bits, 1, 6, 0, sample_ids=np.arange(6) + 6 * half,
                              labels=np.arange(6) % 2))
    writer.close()


def test_a_step_with_a_lost_record_is_left_out_not_measured_on_part_of_its_samples(tmp_path):
    """Two ranks record each step; rank 1's record of step 1 fails its checksum."""
    import h5py

    from actpat.analysis import analyze_run
    from actpat.recorder import schema

    rng = np.random.default_rng(0)
    for rank in (0, 1):
        write_halves(tmp_path, rng, steps=3, halves=(rank,), rank=rank)
    intact = analyze_run(tmp_path, progress=False)
    shard = next(p for p in tmp_path.glob("*.h5") if "rank001" in p.name)
    with h5py.File(shard, "r+") as f:
        group = f["sites"][schema.site_key("fc")]
        row = int(group["records"][1]["row_start"])
        group["bits"][row] = group["bits"][row] ^ 1
    run = open_run(tmp_path)
    p = run.read("fc", 1)
    assert (len(p), p.lost_records) == (6, 1)  # rank 0's half is readable, and says it is half
    result = analyze_run(tmp_path, progress=False)
    for table in (result.metrics, result.information_plane):
        assert sorted(table["step"].unique()) == [0, 2]
    assert sorted(result.firing_rates["fc"]) == [0, 2]
    # Step 2's previous record is the incomplete step 1: it has no *_last (not one measured against step 0).
    assert not result.metrics.query("step == 2")["metric"].str.endswith("_last").any()
    # Every other number is the intact run's.
    keep = lambda t: t[t["step"].isin([0, 2]) & ~t["metric"].str.endswith("_last")].reset_index(drop=True)
    pd.testing.assert_frame_equal(keep(result.metrics), keep(intact.metrics))
    assert set(result.metrics.query("step == 2")["metric"]) == set(keep(intact.metrics).query("step == 2")["metric"])


@pytest.mark.parametrize("field, value, left_out, init_lost", [
    ("nan_count", 7, [1, 2], False),  # step 1's second record: between sound rows of steps 1 and 2
    ("step", 1000, [0, 1], True),  # step 0's second record now claims step 1000: its init is unknown
])
def test_a_damaged_records_row_marks_every_step_it_may_belong_to(tmp_path, field, value, left_out, init_lost):
    """Two records per step (two probe batches). A records-table row that fails its checksum cannot say
    which step it was: the steps between its sound neighbours are incomplete, never measured as whole."""
    import h5py

    from actpat.recorder import schema

    write_halves(tmp_path, np.random.default_rng(0), steps=4, halves=(0, 1))
    intact = summarize(tmp_path, progress=False)
    (shard,) = tmp_path.glob("*.h5")
    with h5py.File(shard, "r+") as f:
        records = f["sites"][schema.site_key("fc")]["records"]
        index = 3 if field == "nan_count" else 1
        row = records[index]
        row[field] = value
        records[index] = row
    table = summarize(tmp_path, progress=False)
    kept = sorted(set(range(4)) - set(left_out))
    assert sorted(table["step"].unique()) == kept
    after = max(left_out) + 1  # the step after an incomplete one has no previous record to compare with
    assert not table.query("step == @after")["metric"].str.endswith("_last").any()
    assert table["metric"].str.endswith("_init").any() != init_lost
    own = lambda t: t[t["step"].isin(kept) & ~t["metric"].str.contains("_init|_last")].reset_index(drop=True)
    pd.testing.assert_frame_equal(own(table), own(intact))


def test_width_controlled_and_region_tables_leave_out_a_lost_step_and_its_successors_last(tmp_path):
    import h5py

    from actpat.analysis.regions import region_table
    from actpat.analysis.width import width_controlled_table
    from actpat.recorder import schema

    write_halves(tmp_path, np.random.default_rng(0), steps=4, halves=(0,))
    (shard,) = tmp_path.glob("*.h5")
    with h5py.File(shard, "r+") as f:
        group = f["sites"][schema.site_key("fc")]
        row = int(group["records"][0]["row_start"])  # step 0: the first record, so init is lost too
        group["bits"][row] = group["bits"][row] ^ 1
    for table in (width_controlled_table(tmp_path, m=4, n_subsets=2, progress=False),
                  region_table(tmp_path, progress=False)):
        assert sorted(table["step"].unique()) == [1, 2, 3]
        assert not table["metric"].str.endswith("_init").any()
        assert not table.query("step == 1")["metric"].str.endswith("_last").any()
        assert table.query("step == 2")["metric"].str.endswith("_last").any()
