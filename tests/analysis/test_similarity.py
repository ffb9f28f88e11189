"""Jaccard indices and per-observation stability against brute force."""

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actpat.analysis.counts import pattern_counts
from actpat.analysis.similarity import Stability, jaccard, set_similarities, stability, weighted_jaccard

WIDTHS = [1, 8, 63, 64, 65, 1000]


def unit_tuple(row, n_units):
    return tuple((int(row[j // 8]) >> (j % 8)) & 1 for j in range(n_units))


def brute(bits, n_units):
    return Counter(unit_tuple(r, n_units) for r in bits.tolist())


def brute_jaccard(ct, cu, threshold=0):
    st_ = {a for a, c in ct.items() if c > threshold}
    su = {a for a, c in cu.items() if c > threshold}
    union = st_ | su
    return len(st_ & su) / len(union) if union else math.nan


def brute_wjaccard(ct, cu):
    keys = set(ct) | set(cu)
    return sum(min(ct[a], cu[a]) for a in keys) / sum(max(ct[a], cu[a]) for a in keys)


def random_bits(rng, n, n_units, pool):
    n_bytes = (n_units + 7) // 8
    base = rng.integers(0, 256, (pool, n_bytes), dtype=np.uint8)
    if n_units % 8:
        base[:, -1] &= (1 << (n_units % 8)) - 1
    return base[rng.integers(0, pool, n)]


@pytest.mark.parametrize("n_units", WIDTHS)
@pytest.mark.parametrize("threshold", [0, 1, 10])
def test_jaccard_matches_brute_force(n_units, threshold):
    rng = np.random.default_rng(n_units)
    pool = random_bits(rng, 40, n_units, 40)
    bt = pool[rng.integers(0, 30, 600)]
    bu = pool[rng.integers(10, 40, 600)]
    ct, cu = brute(bt, n_units), brute(bu, n_units)
    pt, pu = pattern_counts(bt, n_units), pattern_counts(bu, n_units)
    expected = brute_jaccard(ct, cu, threshold)
    assert jaccard(pt, pu, threshold) == pytest.approx(expected)
    assert weighted_jaccard(pt, pu) == pytest.approx(brute_wjaccard(ct, cu))
    assert jaccard(pt, pt, threshold) == 1.0 and weighted_jaccard(pt, pt) == 1.0
    # One alignment for all three (what summarize uses): the same numbers as the brute force.
    together = set_similarities(pt, pu, threshold)
    assert together["jaccard"] == pytest.approx(brute_jaccard(ct, cu, 0))
    assert together["jaccard_t"] == pytest.approx(expected)
    assert together["weighted_jaccard"] == pytest.approx(brute_wjaccard(ct, cu))


def test_disjoint_and_empty_sets():
    a = pattern_counts(np.array([[0], [1]], dtype=np.uint8), 2)
    b = pattern_counts(np.array([[2], [3]], dtype=np.uint8), 2)
    assert jaccard(a, b) == 0.0 and weighted_jaccard(a, b) == 0.0
    assert math.isnan(jaccard(a, b, threshold=5))  # both thresholded sets empty
    assert math.isnan(jaccard(a, a, threshold=5))


def test_similarity_validation():
    a = pattern_counts(np.zeros((2, 1), dtype=np.uint8), 3)
    b = pattern_counts(np.zeros((2, 1), dtype=np.uint8), 4)
    with pytest.raises(ValueError, match="same `n_units`, but got 3 and 4"):
        jaccard(a, b)
    with pytest.raises(ValueError, match="same `n_units`"):
        weighted_jaccard(a, b)
    with pytest.raises(ValueError, match="non-negative int, but got -1"):
        jaccard(a, a, threshold=-1)
    with pytest.raises(TypeError, match="PatternCounts"):
        jaccard(a, [1, 2])


@pytest.mark.parametrize("n_units", WIDTHS)
def test_stability_matches_brute_force(n_units):
    rng = np.random.default_rng(n_units)
    bt = random_bits(rng, 300, n_units, 300)
    flip = rng.random((300, n_units)) < rng.choice([0.0, 0.05, 0.5], size=(300, 1))
    ut = np.unpackbits(bt, axis=1, count=n_units, bitorder="little")
    bu = np.packbits(ut ^ flip, axis=1, bitorder="little")
    if n_units % 8:  # garbage in the padding must not count
        bu[:, -1] |= np.uint8((0xFF << (n_units % 8)) & 0xFF)
    rows_t = [unit_tuple(r, n_units) for r in bt.tolist()]
    rows_u = [unit_tuple(r, n_units) for r in bu.tolist()]
    same = sum(a == b for a, b in zip(rows_t, rows_u)) / 300
    ham = sum(x != y for a, b in zip(rows_t, rows_u) for x, y in zip(a, b)) / (300 * n_units)
    s = stability(bt, bu, n_units)
    assert isinstance(s, Stability)
    assert s.identical_fraction == pytest.approx(same) and s.hamming_per_unit == pytest.approx(ham)
    assert stability(bt, bt, n_units) == (1.0, 0.0)


def test_stability_blocks(monkeypatch):
    from actpat.analysis import similarity

    monkeypatch.setattr(similarity, "_BLOCK_BYTES", 16)
    rng = np.random.default_rng(0)
    bt, bu = random_bits(rng, 101, 70, 3), random_bits(rng, 101, 70, 3)
    monkeypatch.undo()
    expected = stability(bt, bu, 70)
    monkeypatch.setattr(similarity, "_BLOCK_BYTES", 16)
    assert stability(bt, bu, 70) == expected


def test_stability_validation():
    a = np.zeros((4, 2), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"same shape \(the same observations\), but got \(4, 2\) and \(3, 2\)"):
        stability(a, a[:3], 16)
    with pytest.raises(ValueError, match="at least one pattern"):
        stability(a[:0], a[:0], 16)
    with pytest.raises(ValueError, match="bits_t.shape"):
        stability(a, a, 3)


@st.composite
def two_counts(draw):
    n_units = draw(st.sampled_from([1, 3, 8, 64, 65, 130]))
    n_bytes = (n_units + 7) // 8
    pool = np.frombuffer(draw(st.binary(min_size=5 * n_bytes, max_size=5 * n_bytes)), dtype=np.uint8)
    pool = pool.reshape(5, n_bytes)
    it = draw(st.lists(st.integers(0, 4), min_size=1, max_size=50))
    iu = draw(st.lists(st.integers(0, 4), min_size=1, max_size=50))
    return pattern_counts(pool[it], n_units), pattern_counts(pool[iu], n_units)


@settings(max_examples=80, deadline=None)
@given(two_counts(), st.integers(0, 5))
def test_property_bounds(pair, threshold):
    ct, cu = pair
    ji, wji = jaccard(ct, cu, threshold), weighted_jaccard(ct, cu)
    assert math.isnan(ji) or 0.0 <= ji <= 1.0
    assert 0.0 <= wji <= 1.0
    assert jaccard(ct, cu) == jaccard(cu, ct) and wji == weighted_jaccard(cu, ct)
    assert jaccard(ct, ct) == 1.0 and weighted_jaccard(cu, cu) == 1.0


def _read(ids, positions, units01, step):
    from actpat.recorder.observations import Patterns

    bits = np.packbits(np.asarray(units01, dtype=np.uint8), axis=1, bitorder="little")
    n = len(ids)
    return Patterns("s", step, 0, "train", len(units01[0]), bits, np.full(n, -1), np.asarray(ids, dtype=np.int64),
                    np.asarray(positions, dtype=np.int64), 0)


def test_aligned_rows_pair_the_same_inputs_of_two_shuffled_batches_whatever_their_order():
    from actpat.analysis import UnpairedRows, aligned_rows

    rng = np.random.default_rng(5)
    # Step t: ids 0..9 at 2 positions, id 3 drawn twice; step u: another order, ids 5..14, id 3 absent.
    ids_t = np.repeat(np.r_[np.arange(10), 3], 2)
    pos_t = np.tile([0, 1], 11)
    ids_u = np.repeat(np.arange(5, 15), 2)
    pos_u = np.tile([0, 1], 10)
    order = rng.permutation(len(ids_u))
    ids_u, pos_u = ids_u[order], pos_u[order]
    t_units, u_units = rng.integers(0, 2, (len(ids_t), 11)), rng.integers(0, 2, (len(ids_u), 11))
    a, b = aligned_rows(_read(ids_t, pos_t, t_units, 0), _read(ids_u, pos_u, u_units, 1))
    # Brute force: for every (id, position) in both, its row at t and at u (ids 5..9 once each at both).
    by_t = {(i, p): row for i, p, row in zip(ids_t, pos_t, t_units)}
    by_u = {(i, p): row for i, p, row in zip(ids_u, pos_u, u_units)}
    shared = sorted(set(by_t) & set(by_u))
    assert len(shared) == len(a) == 10
    got = {tuple(np.unpackbits(x, count=11, bitorder="little")) + tuple(np.unpackbits(y, count=11, bitorder="little"))
           for x, y in zip(a, b)}
    assert got == {tuple(by_t[k]) + tuple(by_u[k]) for k in shared}
    same = stability(a, b, 11).identical_fraction
    assert same == pytest.approx(np.mean([np.array_equal(by_t[k], by_u[k]) for k in shared]))
    with pytest.raises(UnpairedRows, match="no sample ids were recorded.*Pass `sample_ids`"):
        aligned_rows(_read([-1] * 3, [0] * 3, t_units[:3], 0), _read(ids_u[:3], pos_u[:3], u_units[:3], 1))
    with pytest.raises(ValueError, match="share no sample id"):
        aligned_rows(_read([0, 1], [0, 0], t_units[:2], 0), _read([7, 8], [0, 0], u_units[:2], 1))
