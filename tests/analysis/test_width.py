"""Width-controlled measures against brute force on explicitly chosen unit and row subsets."""

import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from actpat.analysis.counts import pattern_counts
from actpat.analysis.metrics import metric
from actpat.analysis.summarize import summarize
from actpat.analysis.width import (
    Subsets,
    draw_subsets,
    spread,
    subset_counts,
    subset_measures,
    subset_similarity,
    subset_sizes,
    width_controlled_table,
)
from actpat.recorder.shards import Record, ShardWriter, SiteMeta


def pack(units01):
    return np.packbits(np.asarray(units01, dtype=np.uint8), axis=1, bitorder="little")


def brute_counter(units01, cols, rows=None):
    """Patterns of the chosen columns (and rows) of a 0/1 matrix, as tuples, by plain Python."""
    rows = range(len(units01)) if rows is None else rows
    return Counter(tuple(int(units01[r][c]) for c in cols) for r in rows)


def brute_entropy(counter):
    n = sum(counter.values())
    return -sum(c / n * math.log2(c / n) for c in counter.values())


def brute_wjaccard(a, b):
    keys = set(a) | set(b)
    return sum(min(a[k], b[k]) for k in keys) / sum(max(a[k], b[k]) for k in keys)


def brute_jaccard(a, b):
    return len(set(a) & set(b)) / len(set(a) | set(b))


@pytest.fixture
def two_times():
    rng = np.random.default_rng(1)
    proto = rng.integers(0, 2, (5, 20))
    u = proto[rng.integers(0, 5, 60)]
    v = u ^ (rng.random(u.shape) < 0.1)
    return u, v


def test_subset_measures_equal_brute_force_on_chosen_subsets(two_times):
    u, v = two_times
    units = np.array([[0, 3, 7, 19], [1, 2, 5, 11], [4, 8, 9, 10]])
    rows = np.array([np.arange(0, 60, 2), np.arange(1, 60, 2), np.arange(30)])
    subsets = Subsets(units, rows, 20, 60)
    cu, cv = subset_counts(pack(u), 20, subsets), subset_counts(pack(v), 20, subsets)
    measures = subset_measures(cu)
    sim = subset_similarity(cu, cv)
    for i in range(3):
        bu = brute_counter(u, units[i], rows[i])
        bv = brute_counter(v, units[i], rows[i])
        assert sorted(cu[i].counts.tolist()) == sorted(bu.values())
        assert measures["entropy"][i] == pytest.approx(brute_entropy(bu), abs=1e-12)
        assert measures["normalized_entropy"][i] == pytest.approx(brute_entropy(bu) / min(4, math.log2(30)), abs=1e-12)
        assert measures["distinct_fraction"][i] == len(bu) / 30
        assert sim["weighted_jaccard"][i] == pytest.approx(brute_wjaccard(bu, bv), abs=1e-12)
        assert sim["jaccard"][i] == pytest.approx(brute_jaccard(bu, bv), abs=1e-12)


def test_ceiling_flag_and_spread():
    distinct = pattern_counts(pack(np.eye(10, dtype=int)), 10)  # 10 of 10 distinct
    repeated = pattern_counts(pack(np.zeros((10, 10), dtype=int)), 10)
    flags = subset_measures([distinct, repeated], ceiling=0.9)["saturated"]
    assert flags.tolist() == [1.0, 0.0]
    s = spread([0.2, 0.4, np.nan])
    assert s.mean == pytest.approx(0.3) and s.sd == pytest.approx(math.sqrt(0.02))


def test_draw_subsets_seeded_and_units_independent_of_rows():
    a = draw_subsets(64, 1000, m=16, n_obs=100, n_subsets=5, seed=(3, 1))
    b = draw_subsets(64, 1000, m=16, n_obs=100, n_subsets=5, seed=(3, 1))
    c = draw_subsets(64, 700, m=16, n_obs=100, n_subsets=5, seed=(3, 1))
    other = draw_subsets(64, 1000, m=16, n_obs=100, n_subsets=5, seed=(3, 2))
    assert np.array_equal(a.units, b.units) and np.array_equal(a.rows, b.rows)
    assert np.array_equal(a.units, c.units), "a site's units must not depend on the number of rows"
    assert not np.array_equal(a.units, other.units)
    for units, rows in zip(a.units, a.rows):
        assert len(set(units.tolist())) == 16 and units.max() < 64 and np.all(np.diff(units) > 0)
        assert len(set(rows.tolist())) == 100 and rows.max() < 1000
    with pytest.raises(ValueError, match=r"Expected `m` to be between 1 and the site's width n_units = 8, but got 9"):
        draw_subsets(8, 10, m=9)
    with pytest.raises(ValueError, match="n_obs"):
        draw_subsets(8, 10, n_obs=11)


def test_subset_counts_rejects_bits_of_another_site(two_times):
    u, _ = two_times
    with pytest.raises(ValueError, match="Expected `bits` of shape"):
        subset_counts(pack(u), 20, draw_subsets(20, 61, m=4))


# ------------------------------------------------------------------------------------------- a run
NARROW = SiteMeta("narrow", 0, "ReLU", (12,), 12, "flat")
WIDE = SiteMeta("wide", 1, "ReLU", (40, 2, 2), 40, "channel")


def write_run(path, *, seed=0):
    """Probe records of two sites: 12 units x 80 samples and 40 units x 4 positions x 80 samples."""
    rng = np.random.default_rng(seed)
    truth = {}
    writer = ShardWriter(path)
    writer.start()
    for meta, n_positions in ((NARROW, 1), (WIDE, 4)):
        proto = rng.integers(0, 2, (8, meta.n_units))
        units = proto[rng.integers(0, 8, 80 * n_positions)]
        for i, step in enumerate((0, 10, 20, 30)):
            cur = units ^ (rng.random(units.shape) < 0.05 * (3 - i))
            truth[(meta.site, step)] = cur
            writer.put(Record(meta, step, i, "probe", pack(cur), n_positions, 80, 0, sample_ids=np.arange(80),
                              labels=np.arange(80) % 4))
    writer.close()
    return truth


def value(table, site, step, name):
    rows = table[(table["site"] == site) & (table["step"] == step) & (table["metric"] == name)]
    assert len(rows) == 1, (site, step, name, len(rows))
    return float(rows["value"].iloc[0])


def test_table_matches_brute_force_on_the_drawn_subsets(tmp_path):
    truth = write_run(tmp_path)
    assert subset_sizes([tmp_path]) == (12, 80)
    table = width_controlled_table(tmp_path, progress=False, n_subsets=4, seed=7)
    assert list(table.columns) == ["step", "epoch", "split", "site", "site_index", "metric", "value"]
    for meta, n_rows in ((NARROW, 80), (WIDE, 320)):
        subsets = draw_subsets(meta.n_units, n_rows, m=12, n_obs=80, n_subsets=4, seed=(7, meta.site_index))
        final = truth[(meta.site, 30)]
        for step in (0, 10, 20, 30):
            cur, init = truth[(meta.site, step)], truth[(meta.site, 0)]
            per = [brute_counter(cur, subsets.units[i], None if subsets.rows is None else subsets.rows[i])
                   for i in range(len(subsets))]
            h = [brute_entropy(c) for c in per]
            assert value(table, meta.site, step, "entropy_wc") == pytest.approx(np.mean(h), abs=1e-12)
            sd = np.std(h, ddof=1) if len(h) > 1 else 0.0
            assert value(table, meta.site, step, "entropy_wc_sd") == pytest.approx(sd, abs=1e-12)
            for ref_name, ref in (("final", final), ("init", init)):
                w = [brute_wjaccard(per[i], brute_counter(
                    ref, subsets.units[i], None if subsets.rows is None else subsets.rows[i])) for i in range(len(per))]
                assert value(table, meta.site, step, f"weighted_jaccard_wc_{ref_name}") == pytest.approx(np.mean(w))
            assert value(table, meta.site, step, "wc_units") == 12
            assert value(table, meta.site, step, "wc_observations") == 80
    # The narrow site's units are all of its units: its only freedom is the rows, so 4 subsets remain.
    assert value(table, "narrow", 0, "wc_subsets") == 1 and value(table, "wide", 0, "wc_subsets") == 4
    for name in table["metric"].unique():
        metric(name)  # every emitted metric is registered


def test_all_units_and_all_rows_equal_the_raw_measures(tmp_path):
    write_run(tmp_path)
    raw = summarize(tmp_path, progress=False)
    site_raw = raw[raw["site"] == "wide"].set_index(["step", "metric"])["value"]
    wc = width_controlled_table(tmp_path, m=40, n_obs=320, sites=["wide"], progress=False)
    assert set(wc["site"]) == {"wide"}
    wc = wc.set_index(["step", "metric"])["value"]
    for step in (0, 10, 20, 30):
        for name in ("entropy", "normalized_entropy", "distinct_fraction", "jaccard_init", "weighted_jaccard_init",
                     "jaccard_last", "weighted_jaccard_last", "jaccard_final", "weighted_jaccard_final"):
            if (step, name) not in site_raw:
                continue
            wc_name = name.replace("jaccard_", "jaccard_wc_") if "jaccard" in name else f"{name}_wc"
            assert wc[(step, wc_name)] == site_raw[(step, name)], (step, name)
            assert wc[(step, f"{wc_name}_sd")] == 0.0
        assert wc[(step, "saturated_wc")] == float(site_raw[(step, "distinct_fraction")] >= 0.9)
        assert wc[(step, "saturated_wc")] == site_raw[(step, "saturated")]


def test_table_rejects_bad_arguments(tmp_path):
    write_run(tmp_path)
    with pytest.raises(ValueError, match="Expected `m` to be between 1 and the width of site 'narrow', n_units = 12"):
        width_controlled_table(tmp_path, m=13, progress=False)
    with pytest.raises(ValueError, match="Expected at least n_obs = 81 observations of site 'narrow'"):
        width_controlled_table(tmp_path, n_obs=81, progress=False)
    with pytest.raises(ValueError, match="recorded splits"):
        width_controlled_table(tmp_path, split="train", progress=False)
    with pytest.raises(ValueError, match=r"Expected `sites` among the sites recorded in 'probe'"):
        width_controlled_table(tmp_path, sites=["nope"], progress=False)
    with pytest.raises(ValueError, match="references"):
        width_controlled_table(tmp_path, references=("first",), progress=False)


def test_table_concatenates_with_summarize(tmp_path):
    write_run(tmp_path)
    both = pd.concat([summarize(tmp_path, progress=False), width_controlled_table(tmp_path, progress=False)])
    assert not both.duplicated(["site", "step", "metric"]).any()


def test_subsets_hold_the_same_observations_whatever_order_each_step_lists_them_in(tmp_path):
    """A probe listed in another order at each step (sample ids recorded) of an unchanged network: every subset
    took other observations at each step by row position, so wJI to init fell to ~0.87 and entropy moved."""
    rng = np.random.default_rng(3)
    units = rng.integers(0, 2, (80 * 4, WIDE.n_units))  # row 4 s + q: sample s at position q
    writer = ShardWriter(tmp_path)
    writer.start()
    for i, step in enumerate((0, 10, 20)):
        order = np.arange(80) if i == 0 else rng.permutation(80)
        rows = (4 * order[:, None] + np.arange(4)).ravel()
        writer.put(Record(WIDE, step, i, "probe", pack(units[rows]), 4, 80, 0, sample_ids=order, labels=order % 4))
    writer.close()
    table = width_controlled_table(tmp_path, m=6, n_obs=50, n_subsets=5, seed=1, progress=False)
    subsets = draw_subsets(WIDE.n_units, 320, m=6, n_obs=50, n_subsets=5, seed=(1, WIDE.site_index))
    per = [brute_counter(units, subsets.units[k], subsets.rows[k]) for k in range(5)]  # (sample, position) order
    for step in (0, 10, 20):
        assert value(table, "wide", step, "entropy_wc") == pytest.approx(np.mean([brute_entropy(c) for c in per]))
        assert value(table, "wide", step, "weighted_jaccard_wc_init") == 1.0
        assert value(table, "wide", step, "jaccard_wc_last" if step else "jaccard_wc_final") == 1.0


def test_defaults_take_the_fewest_rows_of_any_step_and_a_whole_site_step_pairs_with_every_subset(tmp_path):
    # Batch mode with a smaller last batch: 8, 8 and 6 observations. The narrow site's 3 units are all its units,
    # so at the 6-row step its only subset is the whole site, while the 8-row steps draw 6 of 8 rows per subset.
    narrow, wide = SiteMeta("narrow", 0, "ReLU", (3,), 3, "flat"), SiteMeta("wide", 1, "ReLU", (10,), 10, "flat")
    rng = np.random.default_rng(3)
    truth = {}
    writer = ShardWriter(tmp_path)
    writer.start()
    for step, n in ((0, 8), (1, 8), (2, 6)):
        for meta in (narrow, wide):
            units, ids = rng.integers(0, 2, (n, meta.n_units)), rng.permutation(30)[:n]
            truth[(meta.site, step)] = units[np.argsort(ids)]  # subsets draw rows in sample-id order
            writer.put(Record(meta, step, 0, "train", pack(units), 1, n, 0, sample_ids=ids))
    writer.close()
    assert subset_sizes([tmp_path]) == (3, 6)  # the first step has 8: the fewest is the last batch's
    table = width_controlled_table(tmp_path, progress=False, n_subsets=5, seed=2)
    assert value(table, "narrow", 2, "wc_observations") == 6
    for step in (0, 1, 2):  # JI(init, t) by brute force on the drawn subsets (all 3 units; rows per step)
        per_step = {}
        for s in (0, step):
            subsets = draw_subsets(3, len(truth[("narrow", s)]), m=3, n_obs=6, n_subsets=5, seed=(2, 0))
            per_step[s] = [brute_counter(truth[("narrow", s)], subsets.units[i],
                                         None if subsets.rows is None else subsets.rows[i]) for i in range(len(subsets))]
        init, cur = per_step[0], per_step[step]
        pairs = [(init[i % len(init)], cur[i % len(cur)]) for i in range(max(len(init), len(cur)))]
        expected = np.mean([brute_jaccard(b, a) for a, b in pairs])
        assert value(table, "narrow", step, "jaccard_wc_init") == pytest.approx(expected, abs=1e-12)
