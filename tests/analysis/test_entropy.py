"""Entropies and label information against brute-force dictionaries and closed forms."""

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actpat.analysis.counts import pattern_counts
from actpat.analysis.entropy import (
    conditional_entropy,
    entropy,
    label_information,
    miller_madow,
    mutual_information,
    normalized_entropy,
)

WIDTHS = [1, 8, 63, 64, 65, 1000]


def unit_tuple(row, n_units):
    return tuple((int(row[j // 8]) >> (j % 8)) & 1 for j in range(n_units))


def h_of(counter):
    n = sum(counter.values())
    return -sum(c / n * math.log2(c / n) for c in counter.values() if c)


def brute_label_measures(bits, labels, n_units, prior="empirical"):
    pats = [unit_tuple(r, n_units) for r in bits.tolist()]
    labs = list(map(int, labels))
    if prior == "empirical":
        w = [1.0] * len(labs)
    else:  # balanced: each class present has total mass 1 / L
        n_l = Counter(labs)
        w = [1.0 / (len(n_l) * n_l[l]) for l in labs]
    p_a, p_l, p_al = Counter(), Counter(), Counter()
    for a, l, wi in zip(pats, labs, w):
        p_a[a] += wi
        p_l[l] += wi
        p_al[(a, l)] += wi
    h_a, h_l, h_al = h_of(p_a), h_of(p_l), h_of(p_al)
    return {
        "entropy": h_a,
        "label_entropy": h_l,
        "joint_entropy": h_al,
        "conditional_entropy": h_al - h_l,
        "mutual_information": h_a + h_l - h_al,
        "label_conditional_entropy": h_al - h_a,
    }


def random_bits(rng, n, n_units, pool):
    n_bytes = (n_units + 7) // 8
    base = rng.integers(0, 256, (pool, n_bytes), dtype=np.uint8)
    if n_units % 8:
        base[:, -1] &= (1 << (n_units % 8)) - 1
    idx = rng.integers(0, pool, n)
    return base[idx], idx


@pytest.mark.parametrize("n_units", WIDTHS)
@pytest.mark.parametrize("pool", [1, 7, 400])
def test_entropy_matches_brute_force(n_units, pool):
    rng = np.random.default_rng(n_units + pool)
    bits, _ = random_bits(rng, 500, n_units, pool)
    truth = Counter(unit_tuple(r, n_units) for r in bits.tolist())
    pc = pattern_counts(bits, n_units)
    assert entropy(pc) == pytest.approx(h_of(truth), abs=1e-12)
    assert entropy(pc.counts) == pytest.approx(h_of(truth), abs=1e-12)
    k, n = len(truth), 500
    assert miller_madow(pc) == pytest.approx(h_of(truth) + (k - 1) / (2 * n * math.log(2)), abs=1e-12)
    h_max = min(n_units, math.log2(n))
    assert normalized_entropy(pc) == pytest.approx(min(1.0, h_of(truth) / h_max), abs=1e-12)


def test_entropy_closed_forms():
    assert entropy([7]) == 0.0
    assert entropy([1] * 1024) == pytest.approx(10.0)
    assert entropy([2, 1, 1]) == pytest.approx(1.5)
    assert entropy([0.5, 0.25, 0.25]) == pytest.approx(1.5)  # weights are normalized
    assert miller_madow([7]) == 0.0
    # all distinct: saturates at log2 n
    pc = pattern_counts(np.arange(256, dtype=np.uint8)[:, None], 8)
    assert entropy(pc) == pytest.approx(8.0) and normalized_entropy(pc) == pytest.approx(1.0)
    # n = 1: H_max = 0
    assert math.isnan(normalized_entropy(pattern_counts(np.zeros((1, 1), dtype=np.uint8), 1)))


@pytest.mark.parametrize(
    "counts, match",
    [
        ([], "sum to a positive number"),
        ([0, 0], "sum to a positive number"),
        ([1, -1], "non-negative"),
        ([[1, 2]], "1-D"),
        ([1.0, float("nan")], "finite"),
        (np.array([True, False]), "numeric dtype"),
        (np.array(["a"]), "numeric dtype"),
    ],
)
def test_entropy_validation(counts, match):
    with pytest.raises(ValueError, match=match):
        entropy(counts)
    with pytest.raises(ValueError, match=match):
        miller_madow(counts)


def test_normalized_entropy_needs_pattern_counts():
    with pytest.raises(TypeError, match="PatternCounts"):
        normalized_entropy([1, 2])


@pytest.mark.parametrize("n_units", WIDTHS)
@pytest.mark.parametrize("prior", ["empirical", "balanced"])
def test_label_measures_match_brute_force(n_units, prior):
    rng = np.random.default_rng(n_units)
    bits, idx = random_bits(rng, 700, n_units, pool=30)
    # labels correlated with the pattern, unbalanced classes
    labels = np.where(rng.random(700) < 0.7, idx % 4, rng.choice(4, 700, p=[0.55, 0.25, 0.15, 0.05]))
    got = label_information(bits, labels, n_units, prior=prior)
    truth = brute_label_measures(bits, labels, n_units, prior)
    for key, value in truth.items():
        assert got[key] == pytest.approx(value, abs=1e-10), key
    assert got["n"] == 700 and got["n_labels"] == 4
    assert got["k"] == len({unit_tuple(r, n_units) for r in bits.tolist()})
    assert conditional_entropy(bits, labels, n_units, prior=prior) == got["conditional_entropy"]
    assert mutual_information(bits, labels, n_units, prior=prior) == got["mutual_information"]


def test_balanced_prior_closed_form():
    # class 0: 3 obs of pattern 0; class 1: 1 obs of pattern 0 and 1 of pattern 1.
    bits = np.array([[0], [0], [0], [0], [1]], dtype=np.uint8)
    labels = np.array([0, 0, 0, 1, 1])
    info = label_information(bits, labels, 1, prior="balanced")
    # p(a=0) = 1/2 * 1 + 1/2 * 1/2 = 3/4; H(A|L) = 1/2 * 0 + 1/2 * 1 = 1/2
    h_a = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert info["label_entropy"] == pytest.approx(1.0)
    assert info["entropy"] == pytest.approx(h_a)
    assert info["conditional_entropy"] == pytest.approx(0.5)
    assert info["mutual_information"] == pytest.approx(h_a - 0.5)


def test_label_edge_cases():
    bits = np.array([[0], [1], [2], [3]], dtype=np.uint8)
    # one class: no information
    info = label_information(bits, np.zeros(4, dtype=np.int64), 2)
    assert info["label_entropy"] == 0.0 and info["mutual_information"] == 0.0
    assert info["conditional_entropy"] == pytest.approx(2.0)
    # all-distinct patterns determine the label: I = H(L)
    info = label_information(bits, np.array([0, 1, 1, 2]), 2)
    assert info["mutual_information"] == pytest.approx(info["label_entropy"])
    assert info["label_conditional_entropy"] == 0.0
    # sparse, huge label values
    info2 = label_information(bits, np.array([5, 10**12, 10**12, 3 * 10**12]), 2)
    assert info2["mutual_information"] == pytest.approx(info["mutual_information"]) and info2["n_labels"] == 3
    # any integer dtype
    mi = label_information(bits, np.array([0, 1, 1, 2], dtype=np.uint8), 2)["mutual_information"]
    assert mi == info["mutual_information"]


def test_no_label_is_left_out():
    """-1 means "no label": those observations are left out of every label measure.

    Fails on the code before issue 11, which raised on -1 here (while `mi.binning` counted -1 as a class)."""
    rng = np.random.default_rng(4)
    bits, idx = random_bits(rng, 300, 10, pool=12)
    labels = (idx % 3).astype(np.int64)
    labels[rng.random(300) < 0.3] = -1
    keep = labels >= 0
    got = label_information(bits, labels, 10)
    truth = brute_label_measures(bits[keep], labels[keep], 10)
    for key, value in truth.items():
        assert got[key] == pytest.approx(value, abs=1e-10), key
    assert got["n"] == int(keep.sum())
    with pytest.raises(ValueError, match="all 4 labels are -1"):
        label_information(bits[:4], np.full(4, -1), 10)


@pytest.mark.parametrize(
    "labels, match",
    [
        (np.array([0, 1, -3, 1]), ">= 0, or -1 for an observation without a label, but got minimum -3"),
        (np.array([0.0, 1.0, 1.0, 0.0]), "integer dtype"),
        (np.array([True, False, True, False]), "integer dtype"),
        (np.array([0, 1, 1]), r"len\(labels\) = bits.shape\[0\] = 4, but got 3"),
        (np.zeros((4, 1), dtype=np.int64), "1-D"),
    ],
)
def test_label_validation(labels, match):
    bits = np.zeros((4, 1), dtype=np.uint8)
    with pytest.raises(ValueError, match=match):
        label_information(bits, labels, 3)
    with pytest.raises(ValueError, match=match):
        mutual_information(bits, labels, 3)


def test_prior_validation():
    with pytest.raises(ValueError, match="`prior` to be one of"):
        mutual_information(np.zeros((2, 1), dtype=np.uint8), np.array([0, 1]), 1, prior="flat")


@st.composite
def labelled(draw):
    n_units = draw(st.sampled_from([1, 2, 5, 8, 64, 65, 100]))
    n_bytes = (n_units + 7) // 8
    n = draw(st.integers(1, 80))
    raw = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    pool = np.frombuffer(draw(st.binary(min_size=4 * n_bytes, max_size=4 * n_bytes)), dtype=np.uint8)
    bits = pool.reshape(4, n_bytes)[raw].copy()
    labels = np.array(draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)), dtype=np.int64)
    return bits, labels, n_units


@settings(max_examples=80, deadline=None)
@given(labelled(), st.sampled_from(["empirical", "balanced"]))
def test_property_bounds(data, prior):
    bits, labels, n_units = data
    n = bits.shape[0]
    h = entropy(pattern_counts(bits, n_units))
    assert 0.0 <= h <= min(math.log2(n), n_units) + 1e-12
    info = label_information(bits, labels, n_units, prior=prior)
    eps = 1e-9
    assert 0.0 <= info["mutual_information"] <= min(info["entropy"], info["label_entropy"]) + eps
    assert info["conditional_entropy"] <= info["entropy"] + eps
    assert info["label_conditional_entropy"] <= info["label_entropy"] + eps
    assert info["joint_entropy"] <= info["entropy"] + info["label_entropy"] + eps
    if prior == "empirical":
        assert info["entropy"] == pytest.approx(h, abs=1e-12)
