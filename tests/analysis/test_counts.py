"""Exact pattern counting against a pure-Python brute force."""

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actpat.analysis import counts as counts_mod
from actpat.analysis.counts import PatternCounts, pattern_counts

WIDTHS = [1, 3, 8, 63, 64, 65, 130, 1000]


def unit_tuple(row, n_units):
    """Pattern of one packed row as a tuple of 0/1, by plain bit arithmetic (SPEC section 2)."""
    return tuple((int(row[j // 8]) >> (j % 8)) & 1 for j in range(n_units))


def brute_counts(bits, n_units):
    return Counter(unit_tuple(row, n_units) for row in np.asarray(bits).tolist())


def as_dict(pc):
    return {unit_tuple(p, pc.n_units): int(c) for p, c in zip(pc.patterns.tolist(), pc.counts)}


def pack(units01):
    return np.packbits(np.asarray(units01, dtype=np.uint8), axis=1, bitorder="little")


def random_bits(rng, n, n_units, pool=None):
    n_bytes = (n_units + 7) // 8
    bits = rng.integers(0, 256, (pool or n, n_bytes), dtype=np.uint8)
    if n_units % 8:
        bits[:, -1] &= (1 << (n_units % 8)) - 1
    if pool:
        bits = bits[rng.integers(0, pool, n)]
    return bits


def relu_bits(rng, n, n_units, d=4):
    w = rng.standard_normal((d, n_units))
    b = 0.3 * rng.standard_normal(n_units)
    return pack(rng.standard_normal((n, d)) @ w + b > 0)


@pytest.mark.parametrize("n_units", WIDTHS)
@pytest.mark.parametrize("kind", ["pool", "distinct", "equal", "relu"])
def test_matches_brute_force(n_units, kind):
    rng = np.random.default_rng(n_units)
    if kind == "pool":
        bits = random_bits(rng, 600, n_units, pool=25)
    elif kind == "distinct":
        bits = random_bits(rng, 300, n_units)
    elif kind == "equal":
        bits = np.repeat(random_bits(rng, 1, n_units), 200, axis=0)
    else:
        bits = relu_bits(rng, 800, n_units)
    pc = pattern_counts(bits, n_units)
    truth = brute_counts(bits, n_units)
    assert as_dict(pc) == dict(truth)
    assert pc.n == bits.shape[0] and pc.k == len(truth) == len(pc)
    assert pc.counts.dtype == np.int64 and pc.patterns.dtype == np.uint8
    assert pc.patterns.shape == (len(truth), (n_units + 7) // 8)
    if kind == "equal":
        assert pc.k == 1 and pc.counts.tolist() == [200]
    if kind == "distinct" and n_units >= 16:
        assert pc.k == 300


@pytest.mark.parametrize("n_units", [1, 5, 64])
def test_small_widths_are_in_ascending_integer_order(n_units):
    rng = np.random.default_rng(0)
    pc = pattern_counts(random_bits(rng, 500, n_units, pool=40), n_units)
    values = [sum(bit << j for j, bit in enumerate(unit_tuple(p, n_units))) for p in pc.patterns.tolist()]
    assert values == sorted(values) and len(set(values)) == len(values)


@pytest.mark.parametrize("n_units", [3, 12, 64, 65, 1001])
def test_padding_bits_are_ignored(n_units):
    rng = np.random.default_rng(1)
    bits = random_bits(rng, 200, n_units, pool=10)
    dirty = bits.copy()
    if n_units % 8:
        dirty[:, -1] |= np.uint8(0xFF << (n_units % 8) & 0xFF) & rng.integers(0, 256, 200, dtype=np.uint8)
    pc_clean, pc_dirty = pattern_counts(bits, n_units), pattern_counts(dirty, n_units)
    np.testing.assert_array_equal(pc_clean.patterns, pc_dirty.patterns)
    np.testing.assert_array_equal(pc_clean.counts, pc_dirty.counts)


def test_one_unit_and_canonical_counts():
    pc = pattern_counts(np.array([[1], [0], [1], [1]], dtype=np.uint8), 1)
    assert pc.patterns.ravel().tolist() == [0, 1] and pc.counts.tolist() == [1, 3]


def test_wide_patterns_differing_only_in_high_bits():
    # 10_000 patterns of 300 units that agree on the low 256 bits and differ only in the top 44 bits:
    # a lossy structure keyed on the low words would merge all of them.
    rng = np.random.default_rng(2)
    n_units, n = 300, 10_000
    units = np.zeros((n, n_units), dtype=np.uint8)
    units[:, :256] = rng.integers(0, 2, 256)
    high = rng.choice(2**40, size=2000, replace=False)
    idx = rng.integers(0, high.size, n)
    for j in range(40):
        units[:, 256 + j] = (high[idx] >> j) & 1
    bits = pack(units)
    pc = pattern_counts(bits, n_units)
    assert pc.k == np.unique(idx).size
    assert as_dict(pc) == dict(brute_counts(bits, n_units))


@pytest.mark.parametrize(
    "weak_hash",
    [
        lambda w: np.zeros(w.shape[0], dtype=np.uint64),  # everything collides
        lambda w: w[:, 0] & np.uint64(3),  # low bits only
        lambda w: np.bitwise_xor.reduce(w, axis=1),  # xor fold: swapped words collide
    ],
    ids=["constant", "low-bits", "xor-fold"],
)
@pytest.mark.parametrize("n_units", [65, 128, 1000])
def test_exact_even_when_every_hash_collides(monkeypatch, weak_hash, n_units):
    monkeypatch.setattr(counts_mod, "_row_hash", weak_hash)
    rng = np.random.default_rng(3)
    bits = random_bits(rng, 700, n_units, pool=60)
    # Add rows whose 64-bit words are permutations of each other (xor-fold collisions).
    words = counts_mod._as_words(bits, n_units)
    swapped = words.copy()
    swapped[:, [0, 1]] = swapped[:, [1, 0]]
    bits = np.concatenate([bits, counts_mod._words_to_bits(swapped, n_units)])
    pc = pattern_counts(bits, n_units)
    assert as_dict(pc) == dict(brute_counts(bits, n_units))
    codes, first = counts_mod._factorize(bits, n_units)
    w = counts_mod._as_words(bits, n_units)
    np.testing.assert_array_equal(w[first][codes], w)
    assert np.unique(codes).size == first.size == pc.k


@pytest.mark.parametrize("n_units", [7, 64, 65, 200])
def test_factorize_codes_are_exact(n_units):
    rng = np.random.default_rng(4)
    bits = random_bits(rng, 1000, n_units, pool=50)
    codes, first = counts_mod._factorize(bits, n_units)
    pc = pattern_counts(bits, n_units)
    np.testing.assert_array_equal(bits[first], pc.patterns)
    np.testing.assert_array_equal(np.bincount(codes), pc.counts)


@pytest.mark.parametrize("n_units", [1, 8, 63, 64, 65, 1000])
def test_merging_chunks_equals_counting_the_concatenation(n_units):
    rng = np.random.default_rng(5)
    bits = random_bits(rng, 900, n_units, pool=30)
    whole = pattern_counts(bits, n_units)
    parts = [pattern_counts(chunk, n_units) for chunk in np.array_split(bits, 4)]
    merged = sum(parts)
    np.testing.assert_array_equal(merged.patterns, whole.patterns)
    np.testing.assert_array_equal(merged.counts, whole.counts)
    assert (parts[0] + parts[1]).n == parts[0].n + parts[1].n


def test_align_puts_both_on_the_union():
    a = pattern_counts(pack([[1, 0], [1, 0], [0, 0]]), 2)
    b = pattern_counts(pack([[0, 1], [1, 0]]), 2)
    patterns, ca, cb = a.align(b)
    got = {unit_tuple(p, 2): (x, y) for p, x, y in zip(patterns.tolist(), ca.tolist(), cb.tolist())}
    assert got == {(0, 0): (1, 0), (1, 0): (2, 1), (0, 1): (0, 1)}


def test_merge_and_align_reject_other_widths():
    a = pattern_counts(np.zeros((2, 1), dtype=np.uint8), 3)
    b = pattern_counts(np.zeros((2, 1), dtype=np.uint8), 4)
    with pytest.raises(ValueError, match="same `n_units` = 3, but got 4"):
        a + b
    with pytest.raises(ValueError, match="same `n_units`"):
        a.align(b)
    with pytest.raises(TypeError):
        a + 1


def test_validate_args_false_gives_the_same_result():
    rng = np.random.default_rng(6)
    for n_units in (10, 100):
        bits = random_bits(rng, 300, n_units, pool=20)
        a = pattern_counts(bits, n_units)
        b = pattern_counts(bits, n_units, validate_args=False)
        np.testing.assert_array_equal(a.patterns, b.patterns)
        np.testing.assert_array_equal(a.counts, b.counts)


def test_non_contiguous_input():
    rng = np.random.default_rng(7)
    big = random_bits(rng, 400, 128, pool=20)
    bits = big[::2, :9]
    assert not bits.flags.c_contiguous
    assert as_dict(pattern_counts(bits, 72)) == dict(brute_counts(bits, 72))


@pytest.mark.parametrize(
    "bits, n_units, match",
    [
        (np.zeros((0, 1), dtype=np.uint8), 8, "at least one pattern, but got 0 rows"),
        (np.zeros(4, dtype=np.uint8), 8, "2-D array"),
        (np.zeros((4, 1), dtype=np.int64), 8, "dtype uint8"),
        (np.zeros((4, 8), dtype=np.uint8), 70, r"between 1 and 8 \* bits.shape\[1\] = 64, but got 70"),
        (np.zeros((4, 8), dtype=np.uint8), 0, "between 1 and"),
        (np.zeros((4, 8), dtype=np.uint8), 50, r"ceil\(n_units / 8\) = 7"),
        (np.zeros((4, 1), dtype=np.uint8), 2.0, "to be an int"),
        (np.zeros((4, 1), dtype=np.uint8), True, "to be an int"),
    ],
)
def test_validation_errors(bits, n_units, match):
    with pytest.raises(ValueError, match=match):
        pattern_counts(bits, n_units)


def test_pattern_counts_constructor_validation():
    with pytest.raises(ValueError, match=r"shape \(K, 2\)"):
        PatternCounts(np.zeros((2, 1), dtype=np.uint8), np.ones(2, dtype=np.int64), 9)
    with pytest.raises(ValueError, match="length K = 2"):
        PatternCounts(np.zeros((2, 1), dtype=np.uint8), np.ones(3, dtype=np.int64), 8)
    with pytest.raises(ValueError, match="non-negative"):
        PatternCounts(np.zeros((1, 1), dtype=np.uint8), np.array([-1]), 8)
    with pytest.raises(ValueError, match="integer dtype"):
        PatternCounts(np.zeros((1, 1), dtype=np.uint8), np.array([1.5]), 8)
    with pytest.raises(ValueError, match="positive int"):
        PatternCounts(np.zeros((1, 1), dtype=np.uint8), np.array([1]), 0)


@st.composite
def packed(draw, max_units=140, max_rows=60):
    n_units = draw(st.integers(1, max_units))
    n_bytes = (n_units + 7) // 8
    n_distinct = draw(st.integers(1, 6))
    pool = draw(
        st.lists(st.binary(min_size=n_bytes, max_size=n_bytes), min_size=n_distinct, max_size=n_distinct)
    )
    idx = draw(st.lists(st.integers(0, n_distinct - 1), min_size=1, max_size=max_rows))
    bits = np.frombuffer(b"".join(pool[i] for i in idx), dtype=np.uint8).reshape(len(idx), n_bytes).copy()
    return bits, n_units


@settings(max_examples=60, deadline=None)
@given(packed(), st.data())
def test_property_counts_and_merging(data, draw):
    bits, n_units = data
    pc = pattern_counts(bits, n_units)
    assert as_dict(pc) == dict(brute_counts(bits, n_units))
    cut = draw.draw(st.integers(0, bits.shape[0]))
    if 0 < cut < bits.shape[0]:
        merged = pattern_counts(bits[:cut], n_units) + pattern_counts(bits[cut:], n_units)
        np.testing.assert_array_equal(merged.patterns, pc.patterns)
        np.testing.assert_array_equal(merged.counts, pc.counts)
