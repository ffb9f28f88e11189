"""Plug-in entropies of activation patterns and their information about labels, in bits (SPEC section 3).

The sufficient statistic is an exact count (:mod:`actpat.analysis.counts`); the functions here turn
counts into numbers. :func:`entropy` and :func:`miller_madow` take counts; the label measures take the
packed patterns and one label per observation and count ``(pattern, label)`` pairs exactly in one pass.
"""

from __future__ import annotations

import math

import numpy as np

from actpat.analysis.counts import PatternCounts, _check_bits, _factorize, _runs

__all__ = [
    "conditional_entropy",
    "entropy",
    "label_information",
    "miller_madow",
    "mutual_information",
    "normalized_entropy",
]

PRIORS = ("empirical", "uniform")
# Label values below this bound are remapped with a bincount instead of a sort.
_DENSE_LABELS = 1 << 20


# ---------------------------------------------------------------------------------------------------
# counts -> entropy
# ---------------------------------------------------------------------------------------------------
def _as_counts(counts) -> np.ndarray:
    """Validate ``counts`` (a PatternCounts or a 1-D array of non-negative numbers, sum > 0)."""
    if isinstance(counts, PatternCounts):
        arr = counts.counts
    else:
        arr = np.asarray(counts)
        if arr.ndim != 1:
            raise ValueError(f"Expected `counts` to be 1-D, but got shape {arr.shape}.")
        if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise ValueError(f"Expected `counts` to have a numeric dtype, but got {arr.dtype}.")
        if arr.size and not np.all(np.isfinite(arr)):
            raise ValueError("Expected `counts` to be finite, but got NaN or inf.")
        if arr.size and arr.min() < 0:
            raise ValueError(f"Expected `counts` to be non-negative, but got minimum {arr.min()}.")
    if arr.size == 0 or not arr.sum() > 0:
        raise ValueError(f"Expected `counts` to sum to a positive number, but got {arr.size} counts summing to 0.")
    return arr


def _entropy_of_probabilities(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(max(0.0, -np.sum(p * np.log2(p))))


def _entropy_of_counts(c: np.ndarray) -> float:
    c = np.asarray(c, dtype=np.float64)
    return _entropy_of_probabilities(c / c.sum())


def entropy(counts) -> float:
    """Plug-in (maximum-likelihood) entropy ``H = -sum_a p(a) log2 p(a)``, ``p = c / n``.

    Parameters
    ----------
    counts : PatternCounts or array_like
        A :class:`~actpat.analysis.counts.PatternCounts`, or a 1-D array of non-negative counts (zeros
        are ignored; non-integer weights are accepted and normalized the same way).

    Returns
    -------
    float
        Entropy in **bits**, ``0 <= H <= min(log2 n, log2 K)``.

    Raises
    ------
    ValueError
        If the counts are not 1-D, negative, non-finite or sum to 0.

    Notes
    -----
    The plug-in estimate is biased low when ``K`` is not small compared to ``n``; it saturates at
    ``log2 n`` when every observation is distinct. See :func:`miller_madow` for the first-order
    correction.

    Examples
    --------
    >>> entropy([1, 1, 1, 1])
    2.0
    >>> entropy(np.array([5, 0]))
    0.0
    """
    return _entropy_of_counts(_as_counts(counts))


def miller_madow(counts) -> float:
    """Miller-Madow bias-corrected entropy ``H + (K - 1) / (2 n ln 2)``.

    Parameters
    ----------
    counts : PatternCounts or array_like
        As for :func:`entropy`. ``K`` is the number of non-zero counts, ``n`` their sum.

    Returns
    -------
    float
        Entropy in **bits**.

    Notes
    -----
    The correction removes the first-order bias of the plug-in estimate, ``-(K - 1) / (2 n)`` nats. It
    may exceed ``log2 n`` when nearly every observation is distinct.

    References
    ----------
    Miller, G. (1955). Note on the bias of information estimates. Information Theory in Psychology.

    Examples
    --------
    >>> round(miller_madow([1, 1]), 6)
    1.360674
    """
    c = _as_counts(counts)
    k = int(np.count_nonzero(c))
    n = float(c.sum())
    return _entropy_of_counts(c) + (k - 1) / (2.0 * n * math.log(2.0))


def normalized_entropy(counts: PatternCounts) -> float:
    """Entropy divided by its maximum ``H_max = min(n_units, log2 n)`` (SPEC section 3).

    Parameters
    ----------
    counts : PatternCounts
        ``n_units`` is needed for ``H_max``.

    Returns
    -------
    float
        In ``[0, 1]``; NaN when ``n = 1`` (``H_max = 0``).

    Examples
    --------
    >>> from actpat.analysis.counts import pattern_counts
    >>> normalized_entropy(pattern_counts(np.array([[0], [1], [2], [3]], dtype=np.uint8), 2))
    1.0
    """
    if not isinstance(counts, PatternCounts):
        raise TypeError(f"Expected a PatternCounts (n_units is needed), but got {type(counts).__name__}.")
    c = _as_counts(counts)
    h_max = min(float(counts.n_units), math.log2(float(c.sum())))
    if h_max <= 0:
        return float("nan")
    return min(1.0, _entropy_of_counts(c) / h_max)


# ---------------------------------------------------------------------------------------------------
# labels
# ---------------------------------------------------------------------------------------------------
def _check_labels(labels, n: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"Expected `labels` to be 1-D (one label per observation), but got shape {labels.shape}.")
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"Expected `labels` to have an integer dtype, but got {labels.dtype}.")
    if labels.shape[0] != n:
        raise ValueError(
            f"Expected `labels` to have one entry per pattern, len(labels) = bits.shape[0] = {n}, "
            f"but got {labels.shape[0]}."
        )
    if labels.size and labels.min() < 0:
        n_missing = int(np.count_nonzero(labels == -1))
        if n_missing:
            raise ValueError(
                f"Expected every observation to have a label >= 0, but got {n_missing} of {n} equal to -1 "
                "(no label recorded); select the labelled observations first."
            )
        raise ValueError(f"Expected `labels` to be >= 0, but got minimum {labels.min()}.")
    return labels.astype(np.int64, copy=False)


def _label_codes(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Dense codes ``0 .. L - 1`` of the label values present, and ``L``."""
    if labels.max() < max(_DENSE_LABELS, labels.size):
        present = np.bincount(labels) > 0
        remap = np.cumsum(present) - 1
        return remap[labels], int(present.sum())
    values, codes = np.unique(labels, return_inverse=True)
    return codes.astype(np.int64, copy=False), int(values.size)


def _joint_cells(codes: np.ndarray, lab: np.ndarray, n_labels: int):
    """Non-empty ``(pattern, label)`` cells: pattern index, label index and count of each."""
    joint = np.sort(codes * n_labels + lab)
    starts = np.flatnonzero(_runs(joint))
    cell_counts = np.diff(starts, append=joint.size)
    keys = joint[starts]
    return keys // n_labels, keys % n_labels, cell_counts


def _compute_empirical(a_idx, l_idx, cell_counts, k, n_labels) -> dict:
    c_al = cell_counts.astype(np.float64)
    c_a = np.bincount(a_idx, weights=c_al, minlength=k)
    c_l = np.bincount(l_idx, weights=c_al, minlength=n_labels)
    return _measures(_entropy_of_counts(c_a), _entropy_of_counts(c_l), _entropy_of_counts(c_al))


def _compute_uniform(a_idx, l_idx, cell_counts, k, n_labels) -> dict:
    c_l = np.bincount(l_idx, weights=cell_counts.astype(np.float64), minlength=n_labels)
    p_al = cell_counts / (n_labels * c_l[l_idx])
    p_a = np.bincount(a_idx, weights=p_al, minlength=k)
    p_a /= p_a.sum()
    p_al = p_al / p_al.sum()
    return _measures(_entropy_of_probabilities(p_a), math.log2(n_labels), _entropy_of_probabilities(p_al))


def _measures(h_a: float, h_l: float, h_al: float) -> dict:
    # Each difference is >= 0 in exact arithmetic; clip the rounding error.
    h_a_given_l = max(0.0, h_al - h_l)
    h_l_given_a = max(0.0, h_al - h_a)
    i_al = min(max(0.0, h_a - h_a_given_l), h_a, h_l)
    return {
        "h_a": h_a,
        "h_l": h_l,
        "h_al": h_al,
        "h_a_given_l": h_a_given_l,
        "i_al": i_al,
        "h_l_given_a": h_l_given_a,
    }


_COMPUTE = {"empirical": _compute_empirical, "uniform": _compute_uniform}


def _compute_label_information(codes: np.ndarray, k: int, labels: np.ndarray, prior: str) -> dict:
    """Label measures from exact pattern codes (``0 .. k - 1``) and validated labels."""
    lab, n_labels = _label_codes(labels)
    a_idx, l_idx, cell_counts = _joint_cells(codes, lab, n_labels)
    out = _COMPUTE[prior](a_idx, l_idx, cell_counts, k, n_labels)
    out.update(n=int(codes.size), k=int(k), n_labels=n_labels)
    return out


def label_information(bits, labels, n_units: int, *, prior: str = "empirical", validate_args: bool = True) -> dict:
    """All pattern-label measures from one exact count of ``(pattern, label)`` pairs.

    Parameters
    ----------
    bits : array_like
        ``(n, ceil(n_units / 8))`` uint8 packed patterns, one observation per row.
    labels : array_like
        ``(n,)`` integer class of each observation, ``>= 0`` (a conv site repeats the sample's label for
        every position). ``-1`` ("no label") is an error here.
    n_units : int
        Units per pattern.
    prior : {"empirical", "uniform"}, default "empirical"
        ``"empirical"``: every observation has weight 1 (the label prior is the observed class
        frequency, SPEC section 3). ``"uniform"``: an observation of class ``l`` gets weight
        ``1 / (L * n_l)``, with ``L`` the number of classes present and ``n_l`` the observations of
        class ``l``, so each class has total mass ``1 / L``; then ``p(a, l) = c(a, l) / (L * n_l)``,
        ``p(l) = 1 / L``, ``p(a) = sum_l p(a, l)`` and ``H(A|L)`` is the class average of the per-class
        entropies (the convention of the reference implementation).
    validate_args : bool, default True
        Check shapes, dtypes and labels.

    Returns
    -------
    dict
        In **bits**: ``h_a`` = H(A), ``h_l`` = H(L), ``h_al`` = H(A, L), ``h_a_given_l`` = H(A|L) =
        H(A, L) - H(L), ``i_al`` = I(A; L) = H(A) - H(A|L), ``h_l_given_a`` = H(L|A) = H(A, L) - H(A);
        and the ints ``n`` (observations), ``k`` (distinct patterns), ``n_labels`` (classes present).

    Notes
    -----
    Plug-in estimates: I(A; L) is biased upwards when patterns are nearly unique (then H(L|A) -> 0
    and I -> H(L)). Differences are clipped at 0 against rounding, and I at ``min(H(A), H(L))``.

    Examples
    --------
    >>> bits = np.array([[0], [0], [1], [1]], dtype=np.uint8)
    >>> info = label_information(bits, np.array([0, 0, 1, 1]), n_units=1)
    >>> info["h_a"], info["h_l"], info["i_al"], info["h_a_given_l"]
    (1.0, 1.0, 1.0, 0.0)
    """
    if prior not in PRIORS:
        raise ValueError(f"Expected `prior` to be one of {PRIORS}, but got {prior!r}.")
    if validate_args:
        bits = _check_bits(bits, n_units)
        labels = _check_labels(labels, bits.shape[0])
    else:
        bits = np.ascontiguousarray(bits)
        labels = np.asarray(labels, dtype=np.int64)
    codes, first = _factorize(bits, int(n_units))
    return _compute_label_information(codes, first.size, labels, prior)


def conditional_entropy(bits, labels, n_units: int, *, prior: str = "empirical", validate_args: bool = True) -> float:
    """Conditional entropy ``H(A|L) = H(A, L) - H(L)`` of patterns given labels, in **bits**.

    Parameters are those of :func:`label_information`.

    Examples
    --------
    >>> bits = np.array([[0], [1], [0], [1]], dtype=np.uint8)
    >>> conditional_entropy(bits, np.array([0, 0, 1, 1]), n_units=1)
    1.0
    """
    return label_information(bits, labels, n_units, prior=prior, validate_args=validate_args)["h_a_given_l"]


def mutual_information(bits, labels, n_units: int, *, prior: str = "empirical", validate_args: bool = True) -> float:
    """Mutual information ``I(A; L) = H(A) - H(A|L)`` between patterns and labels, in **bits**.

    Parameters are those of :func:`label_information`; ``prior="uniform"`` reweights observations so
    that every class present has the same total mass (see there).

    Returns
    -------
    float
        ``0 <= I <= min(H(A), H(L))``.

    References
    ----------
    Hartmann, Franzen & Brodehl (2021), Frontiers in Artificial Intelligence 4.

    Examples
    --------
    >>> bits = np.array([[0], [0], [1], [1]], dtype=np.uint8)
    >>> mutual_information(bits, np.array([0, 0, 1, 1]), n_units=1)
    1.0
    >>> mutual_information(bits, np.array([0, 1, 0, 1]), n_units=1)
    0.0
    """
    return label_information(bits, labels, n_units, prior=prior, validate_args=validate_args)["i_al"]
