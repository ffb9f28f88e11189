"""Exact counts of binary activation patterns: the sufficient statistic of every measure (SPEC section 3).

A pattern is one row of packed bits (SPEC section 2): unit ``j`` is bit ``j % 8`` of byte ``j // 8``.
:func:`pattern_counts` turns ``(n, n_bytes)`` rows into a :class:`PatternCounts`, the distinct rows with
their exact multiplicities. Counting is exact for any width: two different patterns are never merged.

- ``n_units <= 64``: each row is read as one little-endian ``uint64`` key (the integer
  ``sum_j a_j 2**j``), the keys are sorted and runs are counted. The key *is* the pattern, so nothing
  can collide.
- ``n_units > 64``: each row gets a 64-bit hash, rows are grouped by hash, and every row is then
  compared word by word with its group's representative. Rows of a group that fails the comparison
  (a hash collision) are regrouped by an exact lexicographic sort, so the result is exact whatever the
  hash does; the hash only makes the common case fast.

The module imports numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from actpat.analysis._validation import check_bits

__all__ = ["PatternCounts", "pattern_codes", "pattern_counts", "pattern_label_cells", "row_words"]

# Rows up to this many units are one uint64 key.
_KEY_UNITS = 64
# Rows hashed per block in the wide path (bounds the temporaries to about 8 MiB).
_HASH_BLOCK_WORDS = 1 << 20
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


# ---------------------------------------------------------------------------------------------------
# validation and conversion to 64-bit words
# ---------------------------------------------------------------------------------------------------
def _n_bytes(n_units: int) -> int:
    return (n_units + 7) // 8


def _as_words(bits: np.ndarray, n_units: int) -> np.ndarray:
    """``(n, n_words)`` little-endian uint64 view (or padded copy) of packed rows, padding bits cleared."""
    n, n_bytes = bits.shape
    n_words = (n_bytes + 7) // 8
    tail = n_units % 8
    if n_bytes % 8 == 0 and tail == 0:
        return bits.view("<u8").reshape(n, n_words)
    buf = np.zeros((n, 8 * n_words), dtype=np.uint8)
    buf[:, :n_bytes] = bits
    if tail:
        buf[:, n_bytes - 1] &= np.uint8((1 << tail) - 1)
    return buf.view("<u8").reshape(n, n_words)


def _narrow_keys(bits: np.ndarray, n_units: int) -> np.ndarray:
    """``(n,)`` uint64 key ``sum_j a_j 2**j`` of each packed row of at most 64 units, padding bits cleared.

    Reads whole 1-, 2-, 4- or 8-byte rows as one integer (no padded copy of the rows)."""
    n, n_bytes = bits.shape
    if n_bytes in (1, 2, 4, 8) and bits.flags.c_contiguous:
        keys = bits.view(f"<u{n_bytes}").reshape(n).astype(np.uint64)
    else:
        keys = np.zeros(n, dtype=np.uint64)
        for b in range(n_bytes):
            keys |= bits[:, b].astype(np.uint64) << np.uint64(8 * b)
    if n_units < 64:
        keys &= np.uint64((1 << n_units) - 1)
    return keys


def _compact(keys: np.ndarray, n_units: int) -> np.ndarray:
    """Keys of at most 32 units as uint32: numpy sorts them about twice as fast as uint64."""
    return keys.astype(np.uint32) if n_units <= 32 else keys


def row_words(bits: np.ndarray, n_units: int) -> np.ndarray:
    """``(n, ceil(n_units / 64))`` little-endian uint64 words of packed rows, padding bits cleared.

    Rows of at most 64 units are one word (a cheap conversion); wider rows a view or padded copy."""
    if n_units <= _KEY_UNITS:
        return _narrow_keys(np.ascontiguousarray(bits), n_units)[:, None]
    return _as_words(bits, n_units)


def _words_to_bits(words: np.ndarray, n_units: int) -> np.ndarray:
    """Inverse of :func:`_as_words` (and of :func:`_narrow_keys` for ``keys[:, None]``): ``(k, n_bytes)`` uint8 rows."""
    words = np.ascontiguousarray(words, dtype="<u8")
    k = words.shape[0]
    return np.ascontiguousarray(words.view(np.uint8).reshape(k, -1)[:, : _n_bytes(n_units)])


# ---------------------------------------------------------------------------------------------------
# hashing (wide rows only; exactness never depends on it)
# ---------------------------------------------------------------------------------------------------
def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer, in place on a uint64 array (wrapping arithmetic)."""
    z ^= z >> np.uint64(30)
    z *= _M1
    z ^= z >> np.uint64(27)
    z *= _M2
    z ^= z >> np.uint64(31)
    return z


def _word_salt(n_words: int) -> np.ndarray:
    salt = np.arange(1, n_words + 1, dtype=np.uint64) * _GOLDEN
    return _mix(salt)


def _row_hash(words: np.ndarray) -> np.ndarray:
    """64-bit hash of each row of ``words``: sum over words of ``mix(word ^ salt[position])``, mixed."""
    n, n_words = words.shape
    salt = _word_salt(n_words)
    out = np.empty(n, dtype=np.uint64)
    block = max(1, _HASH_BLOCK_WORDS // n_words)
    for start in range(0, n, block):
        m = words[start : start + block] ^ salt
        _mix(m)
        out[start : start + block] = m.sum(axis=1, dtype=np.uint64)
    out ^= np.uint64(n_words)
    return _mix(out)


# ---------------------------------------------------------------------------------------------------
# grouping
# ---------------------------------------------------------------------------------------------------
def _runs(sorted_keys: np.ndarray) -> np.ndarray:
    """Boolean mask of the first element of each run of equal values in a sorted array."""
    new = np.empty(sorted_keys.shape[0], dtype=bool)
    if new.size:
        new[0] = True
        np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=new[1:])
    return new


def _rows_differ_from_previous(sorted_words: np.ndarray) -> np.ndarray:
    """``out[i]`` is True where sorted row ``i`` differs from row ``i - 1`` in any word (``out[0]`` True)."""
    n = sorted_words.shape[0]
    out = np.zeros(n, dtype=bool)
    if n:
        out[0] = True
        np.any(sorted_words[1:] != sorted_words[:-1], axis=1, out=out[1:])
    return out


def _factorize_keys(keys: np.ndarray, kind: str = "quicksort") -> tuple[np.ndarray, np.ndarray]:
    """Exact group codes of 1-D keys in ascending key order, and one row of each group.

    ``kind="stable"`` (timsort) for keys made of a few ascending runs, as when aligning two sorted
    pattern lists: several times faster there than quicksort, slower on random keys."""
    order = np.argsort(keys, kind=kind)
    new = _runs(keys[order])
    codes = np.empty(keys.shape[0], dtype=np.int64)
    codes[order] = np.cumsum(new) - 1
    return codes, order[new]


def _group_words(words: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact grouping of the rows of ``words`` (hash, verify, regroup collisions).

    Groups are ordered by row hash; rows whose hashes collide are split exactly and ordered
    lexicographically (most significant word first) within the hash.

    Returns
    -------
    order : np.ndarray
        ``(n,)`` a permutation of the rows (by hash).
    codes_sorted : np.ndarray
        ``(n,)`` int64, the group code of row ``order[i]``.
    first : np.ndarray
        ``(K,)`` int64, one row of each group.
    """
    n = words.shape[0]
    h = _row_hash(words)
    order = np.argsort(h)
    new = _runs(h[order])
    gid = np.cumsum(new) - 1  # hash group of each sorted position
    first_sorted = np.flatnonzero(new)
    # Verify: every row equals the previous row of its hash group (so all equal the first). Only
    # positions that share their hash with the predecessor need a look; all-distinct data costs nothing.
    dup = np.flatnonzero(~new)
    bad_pos = np.zeros(n, dtype=bool)
    step = max(1, _HASH_BLOCK_WORDS // max(1, words.shape[1]))
    for start in range(0, dup.size, step):
        idx = dup[start : start + step]
        bad_pos[idx] = np.any(words[order[idx]] != words[order[idx - 1]], axis=1)
    if not bad_pos.any():
        return order, gid, order[first_sorted]
    # Collisions: regroup the rows of the affected hash groups exactly.
    bad_groups = np.zeros(first_sorted.size, dtype=bool)
    bad_groups[gid[bad_pos]] = True
    positions = np.flatnonzero(bad_groups[gid])  # sorted positions, hash-group-major
    sub_words = words[order[positions]]
    sub_gid = gid[positions]
    perm = np.lexsort(tuple(sub_words.T) + (sub_gid,))
    sw = sub_words[perm]
    sg = sub_gid[perm]
    sub_new = _rows_differ_from_previous(sw)
    sub_new[1:] |= sg[1:] != sg[:-1]
    # Rank of each sub-group inside its hash group (0 for hash groups without collisions).
    sub_rank = np.cumsum(sub_new) - 1
    group_start_rank = np.zeros(first_sorted.size, dtype=np.int64)
    starts = np.flatnonzero(_runs(sg))
    group_start_rank[sg[starts]] = sub_rank[starts]
    sub_id = np.zeros(n, dtype=np.int64)
    sub_id[positions[perm]] = sub_rank - group_start_rank[sg]
    # Final code: rank of (hash group, sub-group) in lexicographic order.
    n_sub = np.ones(first_sorted.size, dtype=np.int64)
    np.maximum.at(n_sub, gid, sub_id + 1)
    offset = np.cumsum(n_sub) - n_sub
    codes_sorted = offset[gid] + sub_id
    k = int(n_sub.sum())
    first = np.empty(k, dtype=np.int64)
    first[codes_sorted] = order  # any row of a group represents it
    return order, codes_sorted, first


def _factorize_words(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact group codes ``(codes (n,), first (K,))`` of the rows of ``words``."""
    order, codes_sorted, first = _group_words(words)
    codes = np.empty(words.shape[0], dtype=np.int64)
    codes[order] = codes_sorted
    return codes, first


def _factorize(bits: np.ndarray, n_units: int, kind: str = "quicksort") -> tuple[np.ndarray, np.ndarray]:
    """Exact pattern codes of validated packed rows (``kind``: see :func:`_factorize_keys`).

    Returns
    -------
    codes : np.ndarray
        ``(n,)`` int64 in ``0 .. K - 1``; equal codes iff equal patterns.
    first : np.ndarray
        ``(K,)`` int64, one row of each pattern; codes follow the canonical pattern order.
    """
    if n_units <= _KEY_UNITS:
        return _factorize_keys(_narrow_keys(bits, n_units), kind)
    return _factorize_words(_as_words(bits, n_units))


def _unique_counts(bits: np.ndarray, n_units: int) -> tuple[np.ndarray, np.ndarray]:
    """``(patterns (K, n_bytes) uint8, counts (K,) int64)`` of validated packed rows, canonical order."""
    n = bits.shape[0]
    if n_units <= _KEY_UNITS:
        keys = np.sort(_compact(_narrow_keys(bits, n_units), n_units))
        starts = np.flatnonzero(_runs(keys))
        counts = np.diff(np.append(starts, n)).astype(np.int64, copy=False)
        return _words_to_bits(keys[starts, None], n_units), counts
    words = _as_words(bits, n_units)
    _, codes_sorted, first = _group_words(words)
    counts = np.bincount(codes_sorted, minlength=first.size).astype(np.int64, copy=False)
    return _words_to_bits(words[first], n_units), counts


def _weighted_counts(codes: np.ndarray, weights: np.ndarray, k: int) -> np.ndarray:
    """Exact int64 sums of integer ``weights`` per code."""
    total = int(weights.sum()) if weights.size else 0
    if total < 2**53:  # every partial sum is an integer a float64 holds exactly
        return np.rint(np.bincount(codes, weights=weights, minlength=k)).astype(np.int64)
    out = np.zeros(k, dtype=np.int64)
    np.add.at(out, codes, weights)
    return out


def _label_cells_by_sort(keys: np.ndarray, label_codes: np.ndarray, label_bits: int, n_units: int):
    """Cells of narrow keys from one sort of ``key << label_bits | label`` (no argsort, no row codes)."""
    joint = _compact(keys << np.uint64(label_bits) | label_codes.astype(np.uint64), n_units + label_bits)
    joint.sort()
    starts = np.flatnonzero(_runs(joint))
    cell_keys = joint[starts]
    cell_count = np.diff(np.append(starts, joint.size)).astype(np.int64, copy=False)
    pattern_of_cell = cell_keys >> cell_keys.dtype.type(label_bits)
    new = _runs(pattern_of_cell)
    first = np.flatnonzero(new)
    counts = np.add.reduceat(cell_count, first) if first.size else cell_count
    cell_label = (cell_keys & cell_keys.dtype.type((1 << label_bits) - 1)).astype(np.int64)
    patterns = _words_to_bits(pattern_of_cell[first, None], n_units)
    return PatternCounts(patterns, counts, n_units), np.cumsum(new) - 1, cell_label, cell_count


# ---------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PatternCounts:
    """Exact counts of distinct binary patterns of one site at one time point.

    Parameters
    ----------
    patterns : np.ndarray
        ``(K, ceil(n_units / 8))`` uint8, the distinct patterns, packed as in SPEC section 2, padding bits
        zero, in canonical order (ascending integer value ``sum_j a_j 2**j`` for ``n_units <= 64``,
        ascending 64-bit row hash otherwise). The constructor trusts that rows are distinct.
    counts : np.ndarray
        ``(K,)`` int64, how often each pattern was observed (all > 0 when built by
        :func:`pattern_counts`).
    n_units : int
        Number of units (bits) per pattern.

    Notes
    -----
    ``a + b`` merges two counts of the same site exactly (chunks of one record, shards, ranks); the
    result equals counting the concatenated observations. :meth:`align` puts two counts on their common
    support, which is what the similarity measures need.

    Examples
    --------
    >>> bits = np.array([[1], [2], [1], [1]], dtype=np.uint8)
    >>> c = pattern_counts(bits, n_units=2)
    >>> c.patterns.ravel().tolist(), c.counts.tolist(), c.n, c.k
    ([1, 2], [3, 1], 4, 2)
    >>> (c + pattern_counts(np.array([[3]], dtype=np.uint8), 2)).counts.tolist()
    [3, 1, 1]
    """

    patterns: np.ndarray
    counts: np.ndarray
    n_units: int

    def __post_init__(self):
        patterns = np.asarray(self.patterns)
        counts = np.asarray(self.counts)
        n_units = self.n_units
        if isinstance(n_units, bool) or not isinstance(n_units, (int, np.integer)) or n_units < 1:
            raise ValueError(f"Expected `n_units` to be a positive int, but got {n_units!r}.")
        n_units = int(n_units)
        if patterns.dtype != np.uint8 or patterns.ndim != 2 or patterns.shape[1] != _n_bytes(n_units):
            raise ValueError(
                f"Expected `patterns` to be uint8 of shape (K, {_n_bytes(n_units)}) for n_units = {n_units}, "
                f"but got {patterns.dtype} of shape {patterns.shape}."
            )
        if counts.ndim != 1 or counts.shape[0] != patterns.shape[0]:
            raise ValueError(
                f"Expected `counts` to be 1-D of length K = {patterns.shape[0]}, but got shape {counts.shape}."
            )
        if counts.size and not np.issubdtype(counts.dtype, np.integer):
            raise ValueError(f"Expected `counts` to have an integer dtype, but got {counts.dtype}.")
        counts = counts.astype(np.int64, copy=False)
        if counts.size and counts.min() < 0:
            raise ValueError(f"Expected `counts` to be non-negative, but got minimum {counts.min()}.")
        object.__setattr__(self, "patterns", np.ascontiguousarray(patterns))
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "n_units", n_units)

    @property
    def n(self) -> int:
        """Total number of observations ``sum(counts)``."""
        return int(self.counts.sum())

    @property
    def k(self) -> int:
        """Number of distinct patterns ``K`` (patterns with a count > 0)."""
        return int(np.count_nonzero(self.counts))

    def __len__(self) -> int:
        return int(self.patterns.shape[0])

    def _check_same_units(self, other) -> None:
        if not isinstance(other, PatternCounts):
            raise TypeError(f"Expected a PatternCounts, but got {type(other).__name__}.")
        if other.n_units != self.n_units:
            raise ValueError(
                f"Expected both PatternCounts to have the same `n_units` = {self.n_units}, "
                f"but got {other.n_units}."
            )

    def align(self, other: "PatternCounts") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Counts of ``self`` and ``other`` on the union of their patterns.

        Parameters
        ----------
        other : PatternCounts
            Counts with the same ``n_units``.

        Returns
        -------
        patterns : np.ndarray
            ``(K_union, n_bytes)`` uint8, canonical order.
        counts_self, counts_other : np.ndarray
            ``(K_union,)`` int64 each, 0 where a pattern is absent from that side.

        Examples
        --------
        >>> a = pattern_counts(np.array([[1], [1], [2]], dtype=np.uint8), 2)
        >>> b = pattern_counts(np.array([[2], [3]], dtype=np.uint8), 2)
        >>> p, ca, cb = a.align(b)
        >>> p.ravel().tolist(), ca.tolist(), cb.tolist()
        ([1, 2, 3], [2, 1, 0], [0, 1, 1])
        """
        self._check_same_units(other)
        stacked, codes, first = self._union_codes(other)
        k, ka = first.size, len(self)
        ca = _weighted_counts(codes[:ka], self.counts, k)
        cb = _weighted_counts(codes[ka:], other.counts, k)
        return stacked[first], ca, cb

    def _union_codes(self, other: "PatternCounts") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Both pattern lists stacked, the code of each stacked row and one row of each code."""
        stacked = np.concatenate([self.patterns, other.patterns], axis=0)
        if stacked.shape[0] == 0:
            empty = np.zeros(0, dtype=np.int64)
            return stacked, empty, empty.copy()
        codes, first = _factorize(stacked, self.n_units, kind="stable")  # two runs in canonical order
        return stacked, codes, first

    @cached_property
    def _sorted_keys(self) -> np.ndarray | None:
        """``(K,)`` uint64 key of each pattern (the pattern itself up to 64 units, else its row hash) when
        they ascend strictly, as in canonical order without hash collisions; None otherwise."""
        if self.n_units <= _KEY_UNITS:
            keys = _narrow_keys(self.patterns, self.n_units)
        else:
            keys = _row_hash(_as_words(self.patterns, self.n_units))
        return keys if keys.size < 2 or bool((keys[1:] > keys[:-1]).all()) else None

    def shared(self, other: "PatternCounts") -> tuple[np.ndarray, np.ndarray]:
        """Counts of ``self`` and ``other`` on the patterns that both list.

        What the set similarities need (patterns on one side only add to neither an intersection nor a
        minimum). For canonical counts this is a merge of the two sorted key lists,
        which :class:`PatternCounts` keeps once computed; rows matched by hash (over 64 units) are
        compared exactly, and any doubt falls back to :meth:`align`.

        Parameters
        ----------
        other : PatternCounts
            Counts with the same ``n_units``.

        Returns
        -------
        counts_self, counts_other : np.ndarray
            ``(K_shared,)`` int64 each, in canonical pattern order.

        Examples
        --------
        >>> a = pattern_counts(np.array([[1], [1], [2]], dtype=np.uint8), 2)
        >>> b = pattern_counts(np.array([[2], [3]], dtype=np.uint8), 2)
        >>> [c.tolist() for c in a.shared(b)]
        [[1], [1]]
        """
        self._check_same_units(other)
        ka, kb = self._sorted_keys, other._sorted_keys
        if ka is not None and kb is not None:
            # Merge the two ascending lists (a stable sort finds the two runs: linear time, several times
            # faster than a binary search of each key); a shared key is an adjacent pair, self's first.
            keys = np.concatenate([ka, kb])
            order = np.argsort(keys, kind="stable")
            merged = keys[order]
            pair = np.flatnonzero(merged[1:] == merged[:-1])
            ia, ib = order[pair], order[pair + 1] - ka.size
            if self.n_units <= _KEY_UNITS or np.array_equal(self.patterns[ia], other.patterns[ib]):
                return self.counts[ia], other.counts[ib]
        _, codes, first = self._union_codes(other)
        k, n_self = first.size, len(self)
        both = np.zeros(k, dtype=bool)
        both[codes[:n_self]] = True
        in_other = np.zeros(k, dtype=bool)
        in_other[codes[n_self:]] = True
        both &= in_other
        ca = _weighted_counts(codes[:n_self], self.counts, k)
        cb = _weighted_counts(codes[n_self:], other.counts, k)
        return ca[both], cb[both]

    def __add__(self, other: "PatternCounts") -> "PatternCounts":
        if not isinstance(other, PatternCounts):
            return NotImplemented
        patterns, ca, cb = self.align(other)
        return PatternCounts(patterns, ca + cb, self.n_units)

    def __radd__(self, other):
        # sum([...]) starts from 0.
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented


def pattern_counts(bits, n_units: int, *, validate_args: bool = True) -> PatternCounts:
    """Exact counts of the distinct packed patterns in ``bits``.

    Parameters
    ----------
    bits : array_like
        ``(n, ceil(n_units / 8))`` uint8, one packed pattern per row (SPEC section 2). Padding bits are
        ignored (cleared before counting).
    n_units : int
        Number of units per pattern, ``1 <= n_units <= 8 * bits.shape[1]`` and
        ``bits.shape[1] == ceil(n_units / 8)``.
    validate_args : bool, default True
        Check shapes and dtypes. ``False`` skips the checks for hot loops (the caller guarantees a
        non-empty 2-D uint8 array of the right width).

    Returns
    -------
    PatternCounts
        Distinct patterns in canonical order with their exact counts (int64, all > 0).

    Raises
    ------
    ValueError
        If ``bits`` is not 2-D uint8 of width ``ceil(n_units / 8)`` or holds no rows.

    Notes
    -----
    Exact for any ``n_units``: up to 64 units the row itself is the sort key; above, rows are grouped by
    a 64-bit hash and every row is verified against its group, collisions being regrouped exactly.
    The reference implementation of Hartmann et al. (2021) counts in a fixed-size hash table: at its own
    table sizes it loses up to 5.5% (32 channels) and 7.7% (64 channels) of the distinct patterns of
    nearly-all-distinct layers, and its 64-bit encoding merges some patterns (bench/analysis_speed.py);
    this function loses none.

    References
    ----------
    Hartmann, Franzen & Brodehl (2021). Studying the evolution of neural activation patterns during
    training of feed-forward ReLU networks. Frontiers in Artificial Intelligence 4.

    Examples
    --------
    >>> bits = np.packbits([[1, 0, 1], [1, 0, 1], [0, 1, 1]], axis=1, bitorder="little")
    >>> c = pattern_counts(bits, n_units=3)
    >>> c.counts.tolist(), c.n, c.k
    ([2, 1], 3, 2)
    """
    if validate_args:
        bits = check_bits(bits, n_units)
    else:
        bits = np.ascontiguousarray(bits)
        n_units = int(n_units)
    patterns, counts = _unique_counts(bits, n_units)
    return PatternCounts(patterns, counts, n_units)


def pattern_codes(bits, n_units: int, *, validate_args: bool = True) -> tuple[PatternCounts, np.ndarray]:
    """Exact counts of the patterns in ``bits`` and the code of each row into them.

    The sufficient statistic of every measure that pairs a pattern with something else about the same
    observation (its label, a subset of rows): ``codes[i]`` is the index of row ``i``'s pattern in
    ``counts.patterns``, so ``np.bincount(codes) == counts.counts``.

    Parameters
    ----------
    bits : array_like
        ``(n, ceil(n_units / 8))`` uint8 packed patterns.
    n_units : int
    validate_args : bool, default True

    Returns
    -------
    counts : PatternCounts
        As :func:`pattern_counts`.
    codes : np.ndarray
        ``(n,)`` int64 in ``0 .. K - 1``; equal codes iff equal patterns.

    Examples
    --------
    >>> counts, codes = pattern_codes(np.array([[2], [1], [2]], dtype=np.uint8), 2)
    >>> counts.patterns.ravel().tolist(), counts.counts.tolist(), codes.tolist()
    ([1, 2], [1, 2], [1, 0, 1])
    """
    if validate_args:
        bits = check_bits(bits, n_units)
    else:
        bits = np.ascontiguousarray(bits)
    n_units = int(n_units)
    codes, first = _factorize(bits, n_units)
    counts = np.bincount(codes, minlength=first.size).astype(np.int64, copy=False)
    patterns = _words_to_bits(_as_words(bits[first], n_units), n_units)
    return PatternCounts(patterns, counts, n_units), codes


def pattern_label_cells(
    bits, n_units: int, label_codes, n_label_codes: int, *, validate_args: bool = True
) -> tuple[PatternCounts, np.ndarray, np.ndarray, np.ndarray]:
    """Exact counts of the patterns in ``bits`` and of the non-empty ``(pattern, label)`` cells.

    What every pattern-label measure needs, without a code per row: for patterns of up to 64 units
    (with the label's bits) it takes one sort of ``(pattern, label)`` keys, several times faster than
    :func:`pattern_codes` followed by a count of the pairs.

    Parameters
    ----------
    bits : array_like
        ``(n, ceil(n_units / 8))`` uint8 packed patterns.
    n_units : int
    label_codes : array_like
        ``(n,)`` int in ``0 .. n_label_codes - 1``, the (dense) label of each observation.
    n_label_codes : int
        Number of label codes, at least 1.
    validate_args : bool, default True

    Returns
    -------
    counts : PatternCounts
        As :func:`pattern_counts` (all ``n`` observations).
    cell_pattern, cell_label, cell_count : np.ndarray
        ``(K_cells,)`` int64 each, ordered by (pattern, label): the index of the cell's pattern in
        ``counts.patterns``, its label code and its count (> 0).

    Examples
    --------
    >>> bits = np.array([[1], [2], [1], [1]], dtype=np.uint8)
    >>> counts, cp, cl, cc = pattern_label_cells(bits, 2, np.array([0, 1, 1, 0]), 2)
    >>> counts.counts.tolist(), cp.tolist(), cl.tolist(), cc.tolist()
    ([3, 1], [0, 0, 1], [0, 1, 1], [2, 1, 1])
    """
    if validate_args:
        bits = check_bits(bits, n_units)
        label_codes = np.asarray(label_codes)
        n_label_codes = int(n_label_codes)
        if (
            label_codes.shape != (bits.shape[0],) or not np.issubdtype(label_codes.dtype, np.integer)
            or n_label_codes < 1 or (label_codes.size and not 0 <= label_codes.min() <= label_codes.max() < n_label_codes)
        ):
            raise ValueError(
                f"Expected `label_codes` to be {bits.shape[0]} ints in 0 .. n_label_codes - 1 = {n_label_codes - 1}, "
                f"but got {label_codes.dtype} of shape {label_codes.shape}."
            )
    else:
        bits = np.ascontiguousarray(bits)
    n_units = int(n_units)
    label_bits = max(1, (int(n_label_codes) - 1).bit_length())
    if n_units + label_bits <= _KEY_UNITS:
        return _label_cells_by_sort(_narrow_keys(bits, n_units), np.asarray(label_codes), label_bits, n_units)
    counts, codes = pattern_codes(bits, n_units, validate_args=False)
    cells, cell_count = np.unique(codes * int(n_label_codes) + label_codes, return_counts=True)
    return counts, cells // n_label_codes, cells % n_label_codes, cell_count.astype(np.int64, copy=False)
