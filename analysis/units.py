"""Unit-level statistics of packed activation patterns: firing rates, binary entropies, dead units.

The sufficient statistic is the number of observations in which each unit is on; :func:`unit_stats`
computes it block by block (never unpacking more than a few MiB at once), and two
:class:`UnitStats` of the same site add up exactly, so shards and chunks can be streamed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from actpat.analysis._validation import check_bits

__all__ = ["UnitStats", "unit_stats"]

# Bytes of packed rows read per block (rows may come from an HDF5 dataset).
_BLOCK_BYTES = 1 << 23
# Bit j of byte value v (little-endian bit order, SPEC section 2).
_BITS_OF_BYTE = (np.arange(256)[:, None] >> np.arange(8) & 1).astype(np.int64)


def _binary_entropy(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    out = np.zeros_like(p)
    inside = (p > 0) & (p < 1)
    q = p[inside]
    out[inside] = -(q * np.log2(q) + (1 - q) * np.log2(1 - q))
    return out


@dataclass(frozen=True, eq=False)
class UnitStats:
    """How often each unit of one site is on, over ``n`` observations.

    Parameters
    ----------
    on_counts : np.ndarray
        ``(n_units,)`` int64, observations in which unit ``j`` is on.
    n : int
        Number of observations.

    Notes
    -----
    ``a + b`` merges two statistics of the same site exactly (chunks, shards, ranks).

    Examples
    --------
    >>> s = UnitStats(np.array([0, 2, 4]), n=4)
    >>> s.firing_rate.tolist(), s.entropy.tolist(), s.n_dead, s.n_always_on
    ([0.0, 0.5, 1.0], [0.0, 1.0, 0.0], 1, 1)
    """

    on_counts: np.ndarray
    n: int

    def __post_init__(self):
        on = np.asarray(self.on_counts)
        if on.ndim != 1 or on.size == 0 or not np.issubdtype(on.dtype, np.integer):
            raise ValueError(
                f"Expected `on_counts` to be a non-empty 1-D integer array, but got {on.dtype} of shape {on.shape}."
            )
        n = int(self.n)
        if n < 0 or (on.size and (on.min() < 0 or on.max() > n)):
            raise ValueError(f"Expected `on_counts` to be between 0 and n = {n}, but got [{on.min()}, {on.max()}].")
        object.__setattr__(self, "on_counts", on.astype(np.int64, copy=False))
        object.__setattr__(self, "n", n)

    @property
    def n_units(self) -> int:
        """Number of units."""
        return int(self.on_counts.size)

    @property
    def firing_rate(self) -> np.ndarray:
        """``(n_units,)`` fraction of observations in which each unit is on (NaN if ``n = 0``)."""
        if self.n == 0:
            return np.full(self.n_units, np.nan)
        return self.on_counts / self.n

    @property
    def entropy(self) -> np.ndarray:
        """``(n_units,)`` binary entropy of each unit's on/off state, in **bits** (0 for dead units)."""
        return _binary_entropy(self.firing_rate)

    @property
    def n_dead(self) -> int:
        """Units never on."""
        return int(np.count_nonzero(self.on_counts == 0)) if self.n else 0

    @property
    def n_always_on(self) -> int:
        """Units on in every observation."""
        return int(np.count_nonzero(self.on_counts == self.n)) if self.n else 0

    def __add__(self, other: "UnitStats") -> "UnitStats":
        if not isinstance(other, UnitStats):
            return NotImplemented
        if other.n_units != self.n_units:
            raise ValueError(
                f"Expected both UnitStats to have the same `n_units` = {self.n_units}, but got {other.n_units}."
            )
        return UnitStats(self.on_counts + other.on_counts, self.n + other.n)


def unit_stats(bits, n_units: int, *, validate_args: bool = True) -> UnitStats:
    """Per-unit firing counts of packed patterns, streamed in blocks of rows.

    Parameters
    ----------
    bits : array_like
        ``(n, ceil(n_units / 8))`` uint8 packed patterns (an ``h5py`` dataset or memory map works too:
        only one block of rows is read at a time).
    n_units : int
        Units per pattern.
    validate_args : bool, default True
        Check shape and dtype.

    Returns
    -------
    UnitStats
        ``firing_rate`` and ``entropy`` (bits) per unit, ``n_dead`` and ``n_always_on``.

    Examples
    --------
    >>> bits = np.packbits([[1, 0, 1], [1, 0, 0]], axis=1, bitorder="little")
    >>> s = unit_stats(bits, n_units=3)
    >>> s.firing_rate.tolist(), s.n_dead, s.n_always_on
    ([1.0, 0.0, 0.5], 1, 1)
    """
    if not hasattr(bits, "shape") or not hasattr(bits, "dtype"):
        bits = np.asarray(bits)
    if validate_args:
        if len(bits.shape) != 2:
            raise ValueError(
                f"Expected `bits` to be a 2-D array of packed rows (n, n_bytes), but got shape {bits.shape}."
            )
        # Validate on an empty slice of the same width so that a dataset is not read whole.
        check_bits(np.empty((int(bits.shape[0] > 0), bits.shape[1]), dtype=bits.dtype), n_units)
    n = int(bits.shape[0])
    # A histogram of each byte column, times the bits of each byte value: no unpacked copy of the rows.
    on = np.zeros(8 * bits.shape[1], dtype=np.int64)
    block = int(max(1, _BLOCK_BYTES // bits.shape[1]))
    for start in range(0, n, block):
        chunk = np.asarray(bits[start : start + block])
        for b in range(chunk.shape[1]):
            on[8 * b : 8 * b + 8] += np.bincount(chunk[:, b], minlength=256) @ _BITS_OF_BYTE
    return UnitStats(on[:n_units], n)
