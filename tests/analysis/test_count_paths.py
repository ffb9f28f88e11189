"""The fast counting paths (one sort of (pattern, label) keys, matching sorted keys) against brute force.

Widths straddle every switch of path: 32 units (uint32 keys), 64 units less the label's bits (joint
keys), 64 units (one word), and wide rows matched by hash, with hashes made to collide.
"""

import math
from collections import Counter

import numpy as np
import pytest

import actpat.analysis.counts as counts_mod
from actpat.analysis.counts import PatternCounts, pattern_counts, pattern_label_cells
from actpat.analysis.measures import pattern_measures
from actpat.analysis.similarity import set_similarities
from actpat.analysis.units import unit_stats

WIDTHS = [1, 8, 17, 32, 33, 60, 61, 64, 65, 300]


def unit_tuple(row, n_units):
    return tuple((int(row[j // 8]) >> (j % 8)) & 1 for j in range(n_units))


def random_bits(rng, n, n_units, pool):
    n_bytes = (n_units + 7) // 8
    base = rng.integers(0, 256, (pool, n_bytes), dtype=np.uint8)
    if n_units % 8:
        base[:, -1] &= (1 << (n_units % 8)) - 1
    return base[rng.integers(0, pool, n)]


def h(counter):
    n = sum(counter.values())
    return -sum(c / n * math.log2(c / n) for c in counter.values())


@pytest.mark.parametrize("n_units", WIDTHS)
@pytest.mark.parametrize("n_label_codes", [1, 2, 11])
def test_pattern_label_cells_match_brute_force(n_units, n_label_codes):
    rng = np.random.default_rng(n_units * 31 + n_label_codes)
    bits = random_bits(rng, 900, n_units, pool=70)
    labels = rng.integers(0, n_label_codes, 900)
    counts, cell_pattern, cell_label, cell_count = pattern_label_cells(bits, n_units, labels, n_label_codes)
    plain = pattern_counts(bits, n_units)
    np.testing.assert_array_equal(counts.patterns, plain.patterns)
    np.testing.assert_array_equal(counts.counts, plain.counts)
    got = Counter()
    for p, lab, c in zip(cell_pattern.tolist(), cell_label.tolist(), cell_count.tolist()):
        got[(unit_tuple(counts.patterns[p], n_units), lab)] += c
    expected = Counter((unit_tuple(r, n_units), int(lab)) for r, lab in zip(bits, labels))
    assert got == expected
    assert len(got) == cell_count.size  # each cell once
    order = cell_pattern * n_label_codes + cell_label
    assert (np.diff(order) > 0).all()  # ordered by (pattern, label)


def test_pattern_label_cells_rejects_bad_codes():
    bits = np.zeros((3, 1), dtype=np.uint8)
    with pytest.raises(ValueError, match="label_codes"):
        pattern_label_cells(bits, 4, np.array([0, 1, 2]), 2)
    with pytest.raises(ValueError, match="label_codes"):
        pattern_label_cells(bits, 4, np.array([0, 1]), 2)


@pytest.mark.parametrize("n_units", [5, 40, 63, 200])
def test_label_measures_with_unlabelled_rows_match_brute_force(n_units):
    rng = np.random.default_rng(n_units)
    bits = random_bits(rng, 1200, n_units, pool=30)
    labels = rng.choice(np.array([-1, 3, 7, 250]), 1200)
    _, m = pattern_measures(bits, n_units, labels, n_classes=300)
    rows = [unit_tuple(r, n_units) for r in bits]
    labelled = [(a, int(lab)) for a, lab in zip(rows, labels) if lab >= 0]
    h_a = h(Counter(a for a, _ in labelled))
    h_l = h(Counter(lab for _, lab in labelled))
    h_al = h(Counter(labelled))
    assert m["entropy"] == pytest.approx(h(Counter(rows)))  # all rows, labelled or not
    assert m["n_observations"] == 1200
    assert m["label_entropy"] == pytest.approx(h_l)
    assert m["joint_entropy"] == pytest.approx(h_al)
    assert m["mutual_information"] == pytest.approx(h_a + h_l - h_al)
    assert m["conditional_entropy_nominal"] == pytest.approx(h_al - math.log2(300))
    assert m["mutual_information_nominal"] == pytest.approx(h_a - (h_al - math.log2(300)))


def brute_shared(a: PatternCounts, b: PatternCounts):
    da = {p.tobytes(): c for p, c in zip(a.patterns, a.counts.tolist())}
    db = {p.tobytes(): c for p, c in zip(b.patterns, b.counts.tolist())}
    return sorted((da[k], db[k]) for k in da.keys() & db.keys())


def check_shared(a, b):
    ca, cb = a.shared(b)
    assert sorted(zip(ca.tolist(), cb.tolist())) == brute_shared(a, b)


@pytest.mark.parametrize("n_units", WIDTHS)
def test_shared_matches_brute_force(n_units):
    rng = np.random.default_rng(n_units + 7)
    pool = random_bits(rng, 60, n_units, 60)
    a = pattern_counts(pool[rng.integers(0, 40, 500)], n_units)
    b = pattern_counts(pool[rng.integers(20, 60, 500)], n_units)
    check_shared(a, b)
    check_shared(b, a)
    check_shared(a, a)
    empty = PatternCounts(np.zeros((0, a.patterns.shape[1]), dtype=np.uint8), np.zeros(0, dtype=np.int64), n_units)
    check_shared(a, empty)


@pytest.mark.parametrize(
    "weak_hash",
    [
        lambda w: np.zeros(w.shape[0], dtype=np.uint64),  # every row collides
        lambda w: np.bitwise_xor.reduce(w, axis=1),  # swapped words collide across the two counts
    ],
    ids=["constant", "xor-fold"],
)
def test_shared_exact_when_hashes_collide(monkeypatch, weak_hash):
    monkeypatch.setattr(counts_mod, "_row_hash", weak_hash)
    n_units = 128
    rng = np.random.default_rng(5)
    bits = random_bits(rng, 300, n_units, pool=25)
    words = counts_mod._as_words(bits, n_units)
    swapped = words.copy()
    swapped[:, [0, 1]] = swapped[:, [1, 0]]
    a = pattern_counts(bits, n_units)
    b = pattern_counts(counts_mod._words_to_bits(swapped, n_units)[:150], n_units)
    check_shared(a, b)
    sims = set_similarities(a, b, threshold=3)
    _, ca, cb = a.align(b)  # the union, independently
    union = np.count_nonzero((ca > 0) | (cb > 0))
    assert sims["jaccard"] == np.count_nonzero((ca > 0) & (cb > 0)) / union
    assert sims["weighted_jaccard"] == np.minimum(ca, cb).sum() / np.maximum(ca, cb).sum()


def test_shared_of_counts_not_in_canonical_order():
    # Built by hand, out of order and with a zero count: matched exactly all the same.
    a = PatternCounts(np.array([[3], [1], [2]], dtype=np.uint8), np.array([4, 0, 2]), 2)
    b = PatternCounts(np.array([[2], [3]], dtype=np.uint8), np.array([5, 1]), 2)
    check_shared(a, b)
    sims = set_similarities(a, b, threshold=1)
    assert sims["jaccard"] == 1.0  # {3, 2} on both sides; pattern 1 has count 0
    assert sims["jaccard_t"] == 0.5  # {3, 2} against {2}
    assert sims["weighted_jaccard"] == 3 / 9


@pytest.mark.parametrize("n_units", [1, 9, 64, 130])
def test_unit_stats_match_unpacked_bits(n_units, monkeypatch):
    rng = np.random.default_rng(n_units)
    bits = random_bits(rng, 777, n_units, pool=777)
    monkeypatch.setattr("actpat.analysis.units._BLOCK_BYTES", 100)  # several blocks
    on = np.unpackbits(bits, axis=1, count=n_units, bitorder="little").sum(axis=0)
    np.testing.assert_array_equal(unit_stats(bits, n_units).on_counts, on)
