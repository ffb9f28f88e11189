"""Argument checks shared by every analysis function that takes packed bits or labels.

One place for each rule, so that no two functions disagree on what an input means:

- packed bits: ``(n, ceil(n_units / 8))`` uint8 rows (SPEC section 2);
- labels: integer class indices, one per observation; ``-1`` means "no label" and such observations are
  left out of every label measure (SPEC section 3); any other negative value, a float or a bool dtype
  is an error.

Splits follow one rule too, owned by the reader (:meth:`actpat.recorder.reader.Run.resolve_split`).

Messages follow one template: ``Expected `name` to be ..., but got ...``. The module imports numpy only.
"""

from __future__ import annotations

import numpy as np

__all__ = ["NO_LABEL", "check_bits", "check_labels", "check_n_classes", "check_threshold", "why_not_whole_samples"]

#: Label value of an observation without a label.
NO_LABEL = -1


def check_bits(bits, n_units, *, name: str = "bits", allow_empty: bool = False) -> np.ndarray:
    """Validate packed rows and ``n_units``; return ``bits`` as a C-contiguous uint8 array.

    Examples
    --------
    >>> check_bits(np.zeros((2, 1), dtype=np.uint8), 9)
    Traceback (most recent call last):
    ...
    ValueError: Expected `n_units` to be between 1 and 8 * bits.shape[1] = 8, but got 9.
    """
    bits = np.asarray(bits)
    if bits.ndim != 2:
        raise ValueError(
            f"Expected `{name}` to be a 2-D array of packed rows (n, n_bytes), but got shape {bits.shape}."
        )
    if bits.dtype != np.uint8:
        raise ValueError(f"Expected `{name}` to have dtype uint8 (packed bits), but got {bits.dtype}.")
    if isinstance(n_units, bool) or not isinstance(n_units, (int, np.integer)):
        raise ValueError(f"Expected `n_units` to be an int, but got {n_units!r}.")
    n_units = int(n_units)
    n_bytes = bits.shape[1]
    if not 1 <= n_units <= 8 * n_bytes:
        raise ValueError(
            f"Expected `n_units` to be between 1 and 8 * {name}.shape[1] = {8 * n_bytes}, but got {n_units}."
        )
    if n_bytes != (n_units + 7) // 8:
        raise ValueError(
            f"Expected `{name}.shape[1]` to be ceil(n_units / 8) = {(n_units + 7) // 8} for n_units = "
            f"{n_units}, but got {n_bytes}."
        )
    if bits.shape[0] == 0 and not allow_empty:
        raise ValueError(f"Expected `{name}` to hold at least one pattern, but got 0 rows (shape {bits.shape}).")
    return np.ascontiguousarray(bits)


def check_labels(labels, n: int, *, name: str = "labels", of: str = "bits.shape[0]") -> np.ndarray:
    """Validate one integer label per observation; return them as int64, ``-1`` kept as "no label".

    Parameters
    ----------
    labels : array_like
        ``(n,)`` integer class indices, ``-1`` where an observation has no label.
    n : int
        Number of observations.
    name, of : str
        Names used in messages: the argument, and the expression that gives ``n``.

    Returns
    -------
    np.ndarray
        ``(n,)`` int64.

    Raises
    ------
    ValueError
        If ``labels`` is not 1-D of length ``n``, has a float, bool or non-numeric dtype (class
        indices are integers: a float label is an error rather than silently truncated), or holds a
        value below ``-1``.

    Examples
    --------
    >>> check_labels([0, 1, -1], 3).tolist()
    [0, 1, -1]
    >>> check_labels(np.array([0.0, 1.0]), 2)
    Traceback (most recent call last):
    ...
    ValueError: Expected `labels` to have an integer dtype (class indices, -1 = no label), but got float64; \
convert class indices with `.astype(np.int64)`.
    """
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"Expected `{name}` to be 1-D (one label per observation), but got shape {arr.shape}.")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"Expected `{name}` to have an integer dtype (class indices, -1 = no label), but got {arr.dtype}; "
            "convert class indices with `.astype(np.int64)`."
        )
    if arr.shape[0] != n:
        raise ValueError(
            f"Expected `{name}` to have one entry per observation, len({name}) = {of} = {n}, "
            f"but got {arr.shape[0]}."
        )
    if arr.size and np.issubdtype(arr.dtype, np.signedinteger) and arr.min() < NO_LABEL:
        raise ValueError(
            f"Expected `{name}` to be >= 0, or -1 for an observation without a label, but got minimum {arr.min()}."
        )
    if arr.dtype == np.uint64 and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"Expected `{name}` to fit in int64, but got maximum {arr.max()}.")
    return arr.astype(np.int64, copy=False)


def check_n_classes(n_classes, n_present: int) -> int:
    """Validate the dataset's class count against the ``n_present`` classes seen in the labels.

    Examples
    --------
    >>> check_n_classes(10, 3)
    10
    >>> check_n_classes(2, 3)
    Traceback (most recent call last):
    ...
    ValueError: Expected `n_classes` to be at least the 3 classes present in the labels, but got 2.
    """
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
        raise ValueError(
            f"Expected `n_classes` to be a positive int (the dataset's class count), but got {n_classes!r}."
        )
    if n_classes < n_present:
        raise ValueError(
            f"Expected `n_classes` to be at least the {n_present} classes present in the labels, but got {n_classes}."
        )
    return int(n_classes)


def check_threshold(threshold) -> int:
    """The ``T`` of the thresholded Jaccard index (patterns seen more than ``T`` times): an int >= 0.

    Examples
    --------
    >>> check_threshold(10)
    10
    >>> check_threshold(-1)
    Traceback (most recent call last):
    ...
    ValueError: Expected `threshold` to be a non-negative int, but got -1.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, np.integer)) or threshold < 0:
        raise ValueError(f"Expected `threshold` to be a non-negative int, but got {threshold!r}.")
    return int(threshold)


def why_not_whole_samples(sample_ids: np.ndarray, positions: np.ndarray) -> str:
    """Why rows that should hold every position of each sample once do not, with the fix (for a message).

    Rows without sample ids (-1) are grouped as recorded: a sample starts at each position 0.

    Examples
    --------
    >>> why_not_whole_samples(np.array([0, 0, 1]), np.array([0, 1, 0]))
    'the samples have 1 to 2 of the 2 positions: sequences of different lengths (batches each padded to its own \
longest: pad every batch to one fixed length), padding left out by a mask, or records subsampled by max_observations \
(record without it)'
    """
    positions = np.asarray(positions, dtype=np.int64)
    ids = np.asarray(sample_ids, dtype=np.int64)
    if (ids < 0).any():
        ids = np.cumsum(positions == 0) - 1
    pairs = np.unique(np.stack([ids, positions]), axis=1)
    if pairs.shape[1] < ids.size:
        return "the records hold an observation twice (repeated sample ids): record with unique sample ids"
    counts = np.unique(ids, return_counts=True)[1]
    n_positions = int(positions.max(initial=0)) + 1
    have = f"{counts.min()}" if counts.min() == counts.max() else f"{counts.min()} to {counts.max()}"
    return (f"the samples have {have} of the {n_positions} positions: sequences of different lengths (batches each "
            "padded to its own longest: pad every batch to one fixed length), padding left out by a mask, or records "
            "subsampled by max_observations (record without it)")
