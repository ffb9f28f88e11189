"""Unit-level statistics against brute force, streamed and merged."""

import math

import h5py
import numpy as np
import pytest

from actpat.analysis import units as units_mod
from actpat.analysis.units import UnitStats, unit_stats

WIDTHS = [1, 8, 63, 64, 65, 1000]


def brute(bits, n_units):
    rows = bits.tolist()
    on = [sum((int(r[j // 8]) >> (j % 8)) & 1 for r in rows) for j in range(n_units)]
    n = len(rows)
    rate = [c / n for c in on]
    h = [0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p)) for p in rate]
    return on, rate, h


def make_bits(rng, n, n_units):
    p = rng.choice([0.0, 1.0, 0.5, 0.1], size=n_units)
    units = rng.random((n, n_units)) < p
    bits = np.packbits(units, axis=1, bitorder="little")
    return bits, int((p == 0).sum()), int((p == 1).sum())


@pytest.mark.parametrize("n_units", WIDTHS)
def test_matches_brute_force(n_units):
    rng = np.random.default_rng(n_units)
    bits, n_dead, n_always = make_bits(rng, 257, n_units)
    if n_units % 8:  # padding garbage must be ignored
        bits[:, -1] |= np.uint8((0xFF << (n_units % 8)) & 0xFF)
    s = unit_stats(bits, n_units)
    on, rate, h = brute(bits, n_units)
    assert s.on_counts.tolist() == on and s.n == 257 and s.n_units == n_units
    np.testing.assert_allclose(s.firing_rate, rate)
    np.testing.assert_allclose(s.entropy, h, atol=1e-12)
    assert s.n_dead == n_dead and s.n_always_on == n_always


def test_blocks_and_merging(monkeypatch):
    rng = np.random.default_rng(0)
    bits, _, _ = make_bits(rng, 1000, 77)
    whole = unit_stats(bits, 77)
    monkeypatch.setattr(units_mod, "_BLOCK_BYTES", 100)  # 1-row blocks
    assert unit_stats(bits, 77).on_counts.tolist() == whole.on_counts.tolist()
    merged = unit_stats(bits[:300], 77) + unit_stats(bits[300:], 77)
    assert merged.on_counts.tolist() == whole.on_counts.tolist() and merged.n == 1000


def test_more_rows_than_uint16_block():
    bits = np.full((70_000, 1), 0b101, dtype=np.uint8)
    s = unit_stats(bits, 3)
    assert s.on_counts.tolist() == [70_000, 0, 70_000] and s.n_dead == 1 and s.n_always_on == 2


def test_reads_an_hdf5_dataset(tmp_path):
    rng = np.random.default_rng(1)
    bits, _, _ = make_bits(rng, 500, 20)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["bits"] = bits
    with h5py.File(tmp_path / "x.h5", "r") as f:
        s = unit_stats(f["bits"], 20)
    assert s.on_counts.tolist() == unit_stats(bits, 20).on_counts.tolist()


def test_validation():
    with pytest.raises(ValueError, match="2-D array"):
        unit_stats(np.zeros(3, dtype=np.uint8), 8)
    with pytest.raises(ValueError, match="at least one pattern"):
        unit_stats(np.zeros((0, 1), dtype=np.uint8), 8)
    with pytest.raises(ValueError, match="dtype uint8"):
        unit_stats(np.zeros((2, 1), dtype=np.int32), 8)
    with pytest.raises(ValueError, match=r"between 1 and 8 \* bits.shape\[1\] = 8, but got 9"):
        unit_stats(np.zeros((2, 1), dtype=np.uint8), 9)
    with pytest.raises(ValueError, match="same `n_units`"):
        UnitStats(np.zeros(3, dtype=np.int64), 1) + UnitStats(np.zeros(4, dtype=np.int64), 1)
    with pytest.raises(ValueError, match="between 0 and n = 1"):
        UnitStats(np.array([2]), 1)
