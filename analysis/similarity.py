"""Similarity of activation patterns between two time points of one site (SPEC section 4).

Only meaningful when both time points saw the **same inputs** (the probe protocol). The set measures
take :class:`~actpat.analysis.counts.PatternCounts`; :func:`stability` compares the two patterns of
each observation, so it needs the packed rows of both time points in the same observation order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from actpat.analysis._validation import check_bits, check_threshold
from actpat.analysis.counts import PatternCounts, row_words

if TYPE_CHECKING:
    from actpat.recorder.observations import Patterns

__all__ = ["Stability", "UnpairedRows", "aligned_rows", "jaccard", "set_similarities", "stability", "weighted_jaccard"]

# Rows compared per block in :func:`stability` (bounds temporaries to about 16 MiB).
_BLOCK_BYTES = 1 << 24
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _check_counts(c_t, c_u) -> None:
    for name, c in (("c_t", c_t), ("c_u", c_u)):
        if not isinstance(c, PatternCounts):
            raise TypeError(f"Expected `{name}` to be a PatternCounts, but got {type(c).__name__}.")
    if c_t.n_units != c_u.n_units:
        raise ValueError(
            f"Expected `c_t` and `c_u` to have the same `n_units`, but got {c_t.n_units} and {c_u.n_units}."
        )


def jaccard(c_t: PatternCounts, c_u: PatternCounts, threshold: int = 0) -> float:
    """Jaccard index ``|S_t & S_u| / |S_t | S_u|`` of the sets of patterns seen more than ``threshold`` times.

    Parameters
    ----------
    c_t, c_u : PatternCounts
        Counts of the same site (same ``n_units``) at two time points.
    threshold : int, default 0
        ``S = {a : c(a) > threshold}``; 0 gives the plain JI, SPEC's ``JI_T`` uses ``T = 10``.

    Returns
    -------
    float
        In ``[0, 1]``; 1 when both sets are equal and non-empty. **NaN** when both sets are empty
        (0 / 0, only possible for ``threshold > 0``): no pattern is frequent enough to compare, which is
        neither similarity nor dissimilarity.

    Raises
    ------
    ValueError
        If ``n_units`` differ or ``threshold`` is negative.

    References
    ----------
    Hartmann, Franzen & Brodehl (2021), Frontiers in Artificial Intelligence 4.

    Examples
    --------
    >>> from actpat.analysis.counts import pattern_counts
    >>> a = pattern_counts(np.array([[0], [1], [2]], dtype=np.uint8), 2)
    >>> b = pattern_counts(np.array([[1], [2], [3]], dtype=np.uint8), 2)
    >>> jaccard(a, b)
    0.5
    >>> jaccard(a, b, threshold=1)
    nan
    """
    _check_counts(c_t, c_u)
    check_threshold(threshold)
    return _jaccard_shared(c_t, c_u, *c_t.shared(c_u), threshold)


def _jaccard_shared(c_t: PatternCounts, c_u: PatternCounts, shared_t: np.ndarray, shared_u: np.ndarray,
                    threshold: int) -> float:
    """JI from the counts on the shared patterns: ``|S_t & S_u| / (|S_t| + |S_u| - |S_t & S_u|)``."""
    both = int(np.count_nonzero((shared_t > threshold) & (shared_u > threshold)))
    union = int(np.count_nonzero(c_t.counts > threshold)) + int(np.count_nonzero(c_u.counts > threshold)) - both
    if union == 0:
        return float("nan")
    return both / union


def _weighted_jaccard_shared(c_t: PatternCounts, c_u: PatternCounts, shared_t: np.ndarray,
                             shared_u: np.ndarray) -> float:
    """``sum min / sum max``; a pattern on one side only adds its count to the max and nothing to the min."""
    overlap = int(np.minimum(shared_t, shared_u).sum())
    den = c_t.n + c_u.n - overlap
    if den == 0:
        return float("nan")
    return overlap / den


def set_similarities(c_t: PatternCounts, c_u: PatternCounts, threshold: int = 10) -> dict[str, float]:
    """:func:`jaccard`, thresholded :func:`jaccard` and :func:`weighted_jaccard` from one match of the shared patterns.

    Returns
    -------
    dict
        ``jaccard``, ``jaccard_t`` (patterns seen more than ``threshold`` times) and ``weighted_jaccard``,
        each exactly what the function of that name returns.

    Examples
    --------
    >>> from actpat.analysis.counts import pattern_counts
    >>> a = pattern_counts(np.array([[0], [0], [1]], dtype=np.uint8), 1)
    >>> b = pattern_counts(np.array([[0], [1], [1]], dtype=np.uint8), 1)
    >>> set_similarities(a, b, threshold=1)
    {'jaccard': 1.0, 'jaccard_t': 0.0, 'weighted_jaccard': 0.5}
    """
    _check_counts(c_t, c_u)
    check_threshold(threshold)
    shared = c_t.shared(c_u)
    return {"jaccard": _jaccard_shared(c_t, c_u, *shared, 0), "jaccard_t": _jaccard_shared(c_t, c_u, *shared, threshold),
            "weighted_jaccard": _weighted_jaccard_shared(c_t, c_u, *shared)}


def weighted_jaccard(c_t: PatternCounts, c_u: PatternCounts) -> float:
    """Weighted Jaccard index ``sum_a min(c_t(a), c_u(a)) / sum_a max(c_t(a), c_u(a))``.

    Parameters
    ----------
    c_t, c_u : PatternCounts
        Counts of the same site (same ``n_units``) at two time points, normally over the same ``n``.

    Returns
    -------
    float
        In ``[0, 1]``; 1 iff the two count vectors are equal; NaN if both are empty.

    Notes
    -----
    Counts, not probabilities, are compared: with equal ``n`` (the probe protocol) this is the
    Ruzicka similarity of the two pattern distributions.

    Examples
    --------
    >>> from actpat.analysis.counts import pattern_counts
    >>> a = pattern_counts(np.array([[0], [0], [1]], dtype=np.uint8), 1)
    >>> b = pattern_counts(np.array([[0], [1], [1]], dtype=np.uint8), 1)
    >>> weighted_jaccard(a, b)
    0.5
    """
    _check_counts(c_t, c_u)
    return _weighted_jaccard_shared(c_t, c_u, *c_t.shared(c_u))


class Stability(NamedTuple):
    """Per-observation stability of patterns between two time points (see :func:`stability`)."""

    identical_fraction: float
    """Fraction of observations whose pattern is identical at both time points."""
    hamming_per_unit: float
    """Mean Hamming distance per unit: total bit flips / (n * n_units), in ``[0, 1]``."""


def _popcount_sum(x: np.ndarray) -> int:
    """Number of set bits in an unsigned integer array."""
    if hasattr(np, "bitwise_count"):
        return int(np.bitwise_count(x).sum(dtype=np.int64))
    return int(_POPCOUNT[x.view(np.uint8)].sum(dtype=np.int64))


def stability(bits_t, bits_u, n_units: int, *, validate_args: bool = True) -> Stability:
    """Identical-pattern fraction and mean Hamming distance of the same observations at two times.

    Parameters
    ----------
    bits_t, bits_u : array_like
        ``(n, ceil(n_units / 8))`` uint8 packed patterns; row ``i`` of both is the same observation
        (same probe sample and position).
    n_units : int
        Units per pattern.
    validate_args : bool, default True
        Check shapes and dtypes.

    Returns
    -------
    Stability
        ``(identical_fraction, hamming_per_unit)``: the fraction of rows with equal patterns, and the
        total number of differing bits divided by ``n * n_units``. Padding bits are ignored.

    Raises
    ------
    ValueError
        If the shapes differ, ``n_units`` does not fit, or there are no rows.

    Examples
    --------
    >>> t = np.packbits([[1, 0, 1], [1, 1, 1]], axis=1, bitorder="little")
    >>> u = np.packbits([[1, 0, 1], [0, 1, 0]], axis=1, bitorder="little")
    >>> s = stability(t, u, n_units=3)
    >>> s.identical_fraction, round(s.hamming_per_unit, 4)
    (0.5, 0.3333)
    """
    if validate_args:
        bits_t = check_bits(bits_t, n_units, name="bits_t")
        bits_u = check_bits(bits_u, n_units, name="bits_u")
        if bits_t.shape != bits_u.shape:
            raise ValueError(
                f"Expected `bits_t` and `bits_u` to have the same shape (the same observations), "
                f"but got {bits_t.shape} and {bits_u.shape}."
            )
    else:
        bits_t, bits_u = np.asarray(bits_t), np.asarray(bits_u)
    n, n_bytes = bits_t.shape
    block = max(1, _BLOCK_BYTES // n_bytes)
    identical = 0
    flips = 0
    for start in range(0, n, block):
        # 64-bit words with padding cleared: one XOR and one popcount per word, not per byte.
        x = row_words(bits_t[start : start + block], n_units) ^ row_words(bits_u[start : start + block], n_units)
        differs = x[:, 0] != 0 if x.shape[1] == 1 else x.any(axis=1)
        identical += x.shape[0] - int(np.count_nonzero(differs))
        flips += _popcount_sum(x)
    return Stability(identical / n, flips / (n * n_units))


class UnpairedRows(ValueError):
    """No observation of two reads provably is the same input; ``reason`` says why, in a few words."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"Expected observations recorded with sample ids shared by both reads, but {reason}: rows are the same "
            "observation only by their recorded (sample id, position). Pass `sample_ids` to `capture()`, or probe a "
            "fixed probe set (the callback and the prober record its indices)."
        )
        self.reason = reason


def aligned_rows(p_t: "Patterns", p_u: "Patterns") -> tuple[np.ndarray, np.ndarray]:
    """The packed patterns of the observations present in both reads, paired row by row, for :func:`stability`.

    Rows are the same observation only by their recorded (sample id, position); the callback's probe
    records the probe-set index as sample id. Without sample ids nothing pairs rows: row ``i`` of two
    shuffled batches are different inputs. A sample id that occurs several times in a step (drawn with
    replacement) pairs its k-th occurrence at one step with its k-th at the other, in recorded order: every
    pair is the same input, and the same rows pair whatever order the steps list them in.

    Parameters
    ----------
    p_t, p_u : Patterns
        Two reads of one site (``run.read(site, step)``).

    Returns
    -------
    (np.ndarray, np.ndarray)
        ``(m, ceil(n_units / 8))`` uint8 each: row ``i`` of both is the same observation.

    Raises
    ------
    UnpairedRows
        A ``ValueError``: no sample ids were recorded, or the reads share none.
    """
    if (p_t.sample_ids < 0).any() or (p_u.sample_ids < 0).any():
        raise UnpairedRows("no sample ids were recorded")
    if len(p_t) == len(p_u) and np.array_equal(p_t.sample_ids, p_u.sample_ids) and np.array_equal(
        p_t.positions, p_u.positions
    ):
        return p_t.bits, p_u.bits  # the same probe rows in the same order
    span = int(max(p_t.positions.max(initial=0), p_u.positions.max(initial=0))) + 1
    key_t = _occurrence_keys(p_t.sample_ids * span + p_t.positions)
    key_u = _occurrence_keys(p_u.sample_ids * span + p_u.positions)
    _, it, iu = np.intersect1d(key_t, key_u, assume_unique=True, return_indices=True)
    if it.size == 0:
        raise UnpairedRows("the two steps share no sample id")
    return p_t.bits[it], p_u.bits[iu]


def _occurrence_keys(keys: np.ndarray) -> np.ndarray:
    """Unique ``(key, k)`` for the k-th occurrence of each key, in order, as one structured array."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    rank = np.arange(keys.size) - np.repeat(starts, np.diff(np.r_[starts, keys.size]))
    out = np.empty(keys.size, dtype=[("key", np.int64), ("k", np.int64)])
    out["key"], out["k"] = keys, 0
    out["k"][order] = rank
    return out
