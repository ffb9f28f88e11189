"""Linear regions: exact breakpoints against a dense sweep and closed forms; region tables against brute force."""

import math
from collections import Counter

import numpy as np
import pytest

from actpat.analysis.metrics import metric
from actpat.analysis.regions import (
    NETWORK_SITE,
    pair_region_changes,
    region_measures,
    region_table,
    sample_patterns,
    segment_regions,
    segment_table,
)
from actpat.recorder.shards import Record, ShardWriter, SiteMeta


class NumpyMLP:
    """A small ReLU MLP in float64; ``preacts`` returns every hidden unit's pre-activation."""

    def __init__(self, widths, seed, leaky=0.0):
        rng = np.random.default_rng(seed)
        self.layers = [(rng.normal(size=(o, i)) / math.sqrt(i), rng.normal(size=o) * 0.3)
                       for i, o in zip(widths[:-1], widths[1:])]
        self.leaky = leaky

    def preacts(self, x):
        out, h = [], np.asarray(x, dtype=np.float64)
        for w, b in self.layers:
            z = h @ w.T + b
            out.append(z)
            h = np.where(z > 0, z, self.leaky * z)
        return np.concatenate(out, axis=1)


def dense_changes(preacts, a, b, n):
    """Brute force: the on/off pattern at n + 1 evenly spaced points; cells where it changes."""
    t = np.linspace(0.0, 1.0, n + 1)
    on = preacts(a[None] + t[:, None] * (b - a)[None]) > 0
    changed = np.flatnonzero(np.any(on[1:] != on[:-1], axis=1))
    return t, changed


@pytest.mark.parametrize("seed, leaky", [(0, 0.0), (1, 0.0), (2, 0.1), (3, 0.1)])
def test_exact_breakpoints_match_a_dense_sweep(seed, leaky):
    net = NumpyMLP([3, 12, 10, 8], seed, leaky=leaky)
    rng = np.random.default_rng(100 + seed)
    a, b = rng.normal(size=3) * 2, rng.normal(size=3) * 2
    exact = segment_regions(net.preacts, a, b)
    t, changed = dense_changes(net.preacts, a, b, 200_000)
    # Every pattern change of the sweep holds exactly one breakpoint, and every breakpoint lies in one.
    assert exact.changes == changed.size > 5
    cells = np.searchsorted(t, exact.breakpoints) - 1
    assert np.array_equal(cells, changed)
    assert np.all(np.diff(exact.breakpoints) > 0)
    assert exact.length == pytest.approx(np.linalg.norm(b - a))


def test_one_layer_breakpoints_are_the_closed_form_zero_crossings():
    rng = np.random.default_rng(5)
    w, c = rng.normal(size=(40, 6)), rng.normal(size=40)
    a, b = rng.normal(size=6), rng.normal(size=6)
    za, zb = w @ a + c, w @ b + c
    crossing = -za / (zb - za)
    truth = np.sort(crossing[(crossing > 0) & (crossing < 1)])
    got = segment_regions(lambda x: x @ w.T + c, a, b)
    np.testing.assert_allclose(got.breakpoints, truth, rtol=0, atol=1e-12)


def test_degenerate_segments_and_bad_callables():
    net = NumpyMLP([2, 5, 1], 0)
    assert segment_regions(net.preacts, [1.0, 2.0], [1.0, 2.0]).changes == 0
    with pytest.raises(ValueError, match=r"Expected `preacts` to return an array of shape \(m, n_units\)"):
        segment_regions(lambda x: x.sum(axis=1), [0.0, 0.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="same shape"):
        segment_regions(net.preacts, [0.0], [1.0, 1.0])


def test_pairs_are_seeded_and_distinct():
    net = NumpyMLP([4, 16, 8], 1)
    x = np.random.default_rng(0).normal(size=(30, 4))
    r1 = pair_region_changes(net.preacts, x, n_pairs=12, seed=3, progress=False)
    r2 = pair_region_changes(net.preacts, x, n_pairs=12, seed=3, progress=False)
    assert np.array_equal(r1.pairs, r2.pairs) and np.array_equal(r1.changes, r2.changes)
    assert np.all(r1.pairs[:, 0] != r1.pairs[:, 1])
    for (i, j), n in zip(r1.pairs, r1.changes):
        assert n == segment_regions(net.preacts, x[i], x[j]).changes
    rows = segment_table(r1, step=7)
    assert rows.set_index("metric")["value"]["segment_region_density"] == pytest.approx(
        r1.changes.sum() / r1.lengths.sum())
    for name in rows["metric"]:
        metric(name)


# ------------------------------------------------------------------------------------ from shards
def test_sample_patterns_reorders_and_rejects_subsampled_records():
    rng = np.random.default_rng(0)
    units = rng.integers(0, 2, (3 * 4, 5))  # 3 samples x 4 positions x 5 units
    bits = np.packbits(units, axis=1, bitorder="little")
    ids = np.repeat([30, 10, 20], 4)
    pos = np.tile(np.arange(4), 3)
    perm = rng.permutation(12)
    out_ids, packed, n_bits = sample_patterns(bits[perm], 5, ids[perm], pos[perm])
    assert out_ids.tolist() == [10, 20, 30] and n_bits == 20
    back = np.unpackbits(packed, axis=1, count=20, bitorder="little")
    for k, sample in enumerate((1, 2, 0)):
        assert back[k].tolist() == units[4 * sample: 4 * sample + 4].ravel().tolist()
    with pytest.raises(ValueError, match="subsampled"):
        sample_patterns(bits[:11], 5, ids[:11], pos[:11])
    with pytest.raises(ValueError, match="hold an observation twice"):  # position 2 of each sample twice
        sample_patterns(bits, 5, ids, np.where(pos == 3, 2, pos))


def test_region_measures_match_brute_force():
    rng = np.random.default_rng(2)
    rows = rng.integers(0, 4, (50, 3)).astype(np.uint8)
    _, m = region_measures(rows)
    counter = Counter(map(tuple, rows.tolist()))
    assert m["region_distinct"] == len(counter)
    assert m["region_entropy"] == pytest.approx(-sum(c / 50 * math.log2(c / 50) for c in counter.values()))
    assert m["region_alone_fraction"] == sum(1 for c in counter.values() if c == 1) / 50


CONV = SiteMeta("conv", 0, "ReLU", (3, 2, 2), 3, "channel")
DENSE = SiteMeta("fc", 1, "ReLU", (4,), 4, "flat")
N = 30
STEPS = (0, 10, 20)


def test_region_table_matches_brute_force(tmp_path):
    rng = np.random.default_rng(1)
    truth = {}
    writer = ShardWriter(tmp_path)
    writer.start()
    conv = rng.integers(0, 2, (N * 4, 3))
    fc = rng.integers(0, 2, (N, 4))
    for i, step in enumerate(STEPS):
        conv = conv ^ (rng.random(conv.shape) < 0.03)
        fc = fc ^ (rng.random(fc.shape) < 0.03)
        # The region of sample s: its conv bits at positions 0..3, then its fc bits.
        truth[step] = [tuple(conv[4 * s: 4 * s + 4].ravel()) + tuple(fc[s]) for s in range(N)]
        writer.put(Record(CONV, step, i, "probe", np.packbits(conv, axis=1, bitorder="little"), 4, N, 0,
                          sample_ids=np.arange(N)))
        order = rng.permutation(N)  # the other site lists the samples in another order
        writer.put(Record(DENSE, step, i, "probe", np.packbits(fc[order], axis=1, bitorder="little"), 1, N, 0,
                          sample_ids=order))
    writer.close()
    table = region_table(tmp_path, progress=False)
    assert set(table["site"]) == {NETWORK_SITE}
    got = table.set_index(["step", "metric"])["value"]
    seen = set()
    for step in STEPS:
        regions = Counter(truth[step])
        seen |= set(regions)
        assert got[(step, "region_distinct")] == len(regions)
        assert got[(step, "region_entropy")] == pytest.approx(
            -sum(c / N * math.log2(c / N) for c in regions.values()))
        assert got[(step, "region_alone_fraction")] == sum(c == 1 for c in regions.values()) / N
        assert got[(step, "region_visited")] == len(seen)
        assert got[(step, "region_units")] == 16
        for name, ref in (("init", 0), ("final", 20)):
            same = sum(truth[step][s] == truth[ref][s] for s in range(N)) / N
            assert got[(step, f"region_identical_{name}")] == same
    assert got[(10, "region_identical_last")] == sum(truth[10][s] == truth[0][s] for s in range(N)) / N
    for name in table["metric"].unique():
        metric(name)


def test_region_table_refuses_sites_with_other_samples(tmp_path):
    writer = ShardWriter(tmp_path)
    writer.start()
    bits = np.zeros((N, 1), dtype=np.uint8)
    writer.put(Record(DENSE, 0, 0, "probe", bits, 1, N, 0, sample_ids=np.arange(N)))
    writer.put(Record(SiteMeta("other", 2, "ReLU", (4,), 4, "flat"), 0, 0, "probe", bits, 1, N, 0,
                      sample_ids=np.arange(N) + 1))
    writer.close()
    with pytest.raises(ValueError, match="Expected every site to hold the same samples"):
        region_table(tmp_path, progress=False)
    with pytest.raises(ValueError, match="Expected `sites` among the sites recorded"):
        region_table(tmp_path, sites=["nope"], progress=False)
