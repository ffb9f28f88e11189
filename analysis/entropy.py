"""Plug-in entropies of activation patterns and their information about labels, in bits (SPEC section 3).

The sufficient statistic is an exact count (:mod:`actpat.analysis.counts`); the functions here turn
counts into numbers. :func:`entropy` and :func:`miller_madow` take counts; the label measures take the
packed patterns and one label per observation and count ``(pattern, label)`` pairs exactly in one pass.
"""

from __future__ import annotations

import math

import numpy as np

from actpat.analysis._validation import NO_LABEL, check_labels, check_n_classes
from actpat.analysis.counts import PatternCounts, pattern_codes, pattern_counts, pattern_label_cells

__all__ = [
    "conditional_entropy",
    "dense_labels",
    "entropy",
    "label_information",
    "information_from_cells",
    "label_information_from_codes",
    "miller_madow",
    "mutual_information",
    "nominal_conditional_entropy",
    "normalized_entropy",
    "pattern_label_information",
]

#: Label priors of the label measures (see :func:`label_information`).
PRIORS = ("empirical", "balanced", "nominal")
# Label and code values below this bound are remapped with a bincount instead of a sort.
_DENSE_VALUES = 1 << 20


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
    return _miller_madow_from(_entropy_of_counts(c), int(np.count_nonzero(c)), float(c.sum()))


def _miller_madow_from(h: float, k: int, n: float) -> float:
    return h + (k - 1) / (2.0 * n * math.log(2.0))


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
    return _normalized_from(_entropy_of_counts(c), counts.n_units, float(c.sum()))


def _normalized_from(h: float, n_units: int, n: float) -> float:
    h_max = min(float(n_units), math.log2(n))
    if h_max <= 0:
        return float("nan")
    return min(1.0, h / h_max)


# ---------------------------------------------------------------------------------------------------
# labels
# ---------------------------------------------------------------------------------------------------
def _dense_codes(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Dense codes ``0 .. L - 1`` (in ascending order) of the non-negative int values present, and ``L``."""
    if values.max() < max(_DENSE_VALUES, values.size):
        present = np.bincount(values) > 0
        remap = np.cumsum(present) - 1
        return remap[values], int(present.sum())
    unique, codes = np.unique(values, return_inverse=True)
    return codes.reshape(-1).astype(np.int64, copy=False), int(unique.size)


def dense_labels(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Dense codes of int labels: ``0 .. L - 1`` for the ``L`` labels present (ascending), ``L`` for -1 (none).

    Returns ``(codes (n,) int64, L)``."""
    labelled = labels != NO_LABEL
    if not labelled.any():
        return np.zeros(labels.shape[0], dtype=np.int64), 0
    codes, n_labels = _dense_codes(labels[labelled].astype(np.int64, copy=False))
    if labelled.all():
        return codes, n_labels
    out = np.full(labels.shape[0], n_labels, dtype=np.int64)
    out[labelled] = codes
    return out, n_labels


def _joint_cells(codes: np.ndarray, lab: np.ndarray, n_labels: int):
    """Non-empty ``(pattern, label)`` cells: pattern index, label index and count of each."""
    keys, cell_counts = np.unique(codes * n_labels + lab, return_counts=True)
    return keys // n_labels, keys % n_labels, cell_counts


def _clipped(h_a: float, h_l: float, h_al: float) -> tuple[float, float, float]:
    """H(A|L), I(A;L), H(L|A) of a proper joint distribution: each >= 0 exactly, so rounding is clipped."""
    h_a_given_l = max(0.0, h_al - h_l)
    return h_a_given_l, min(max(0.0, h_a - h_a_given_l), h_a, h_l), max(0.0, h_al - h_a)


def _compute_empirical(a_idx, l_idx, cell_counts, k, n_labels, n_classes) -> tuple:
    c_al = cell_counts.astype(np.float64)
    h_a = _entropy_of_counts(np.bincount(a_idx, weights=c_al, minlength=k))
    h_l = _entropy_of_counts(np.bincount(l_idx, weights=c_al, minlength=n_labels))
    h_al = _entropy_of_counts(c_al)
    return (h_a, h_l, h_al, *_clipped(h_a, h_l, h_al))


def _compute_balanced(a_idx, l_idx, cell_counts, k, n_labels, n_classes) -> tuple:
    c_l = np.bincount(l_idx, weights=cell_counts.astype(np.float64), minlength=n_labels)
    p_al = cell_counts / (n_labels * c_l[l_idx])
    p_a = np.bincount(a_idx, weights=p_al, minlength=k)
    h_a = _entropy_of_probabilities(p_a / p_a.sum())
    h_l = math.log2(n_labels)
    h_al = _entropy_of_probabilities(p_al / p_al.sum())
    return (h_a, h_l, h_al, *_clipped(h_a, h_l, h_al))


def nominal_conditional_entropy(joint_entropy: float, n_classes: int) -> float:
    """``H(A|L)`` with the nominal label prior ``1 / n_classes``: ``H(A, L) - log2 n_classes``, in **bits**.

    The convention of the reference implementation of Hartmann et al. (2021); see ``prior="nominal"``
    of :func:`label_information`. Not clipped: it is negative when the observed classes are less
    uncertain than ``log2 n_classes`` and the patterns add less than the difference.

    Examples
    --------
    >>> nominal_conditional_entropy(2.5, 4)
    0.5
    """
    return float(joint_entropy) - math.log2(n_classes)


def _compute_nominal(a_idx, l_idx, cell_counts, k, n_labels, n_classes) -> tuple:
    c_al = cell_counts.astype(np.float64)
    h_a = _entropy_of_counts(np.bincount(a_idx, weights=c_al, minlength=k))
    h_al = _entropy_of_counts(c_al)
    h_a_given_l = nominal_conditional_entropy(h_al, n_classes)
    return h_a, math.log2(n_classes), h_al, h_a_given_l, h_a - h_a_given_l, h_al - h_a


_COMPUTE = {"empirical": _compute_empirical, "balanced": _compute_balanced, "nominal": _compute_nominal}


def _check_prior(prior: str, n_classes) -> None:
    if prior not in PRIORS:
        raise ValueError(f"Expected `prior` to be one of {PRIORS}, but got {prior!r}.")
    if prior == "nominal" and n_classes is None:
        raise ValueError(
            "Expected `n_classes` (the dataset's class count) for prior='nominal', which computes "
            "H(A|L) = H(A,L) - log2 n_classes, but got None."
        )


def _normalizers(n: int, n_classes: int, n_units: float) -> tuple[float, float]:
    """Maxima of H(A|L) and I(A;L) in the reference's convention: min(n_units, log2(n / C)) and the gap to H_max."""
    h_max = min(n_units, math.log2(n))
    h_cond_max = min(n_units, math.log2(n / n_classes))
    return h_cond_max, h_max - h_cond_max


def _ratio(value: float, limit: float) -> float:
    return value / limit if limit > 0 else float("nan")


def label_information_from_codes(
    codes, labels, *, n_units: int | None = None, prior: str = "empirical", n_classes: int | None = None,
    validate_args: bool = True,
) -> dict:
    """All pattern-label measures from exact pattern codes and one label per observation.

    The shared core of :func:`label_information`, :func:`actpat.analysis.measures.pattern_measures`,
    the information plane and the binned estimators of :mod:`actpat.analysis.mi`, for callers that
    already hold the codes of their rows (:func:`actpat.analysis.counts.pattern_codes`, or the codes of
    binned rows).

    Parameters
    ----------
    codes : array_like
        ``(n,)`` non-negative int pattern code of each observation; equal codes iff equal patterns.
    labels : array_like
        ``(n,)`` integer class of each observation, ``-1`` for none.
    n_units : int or None, default None
        Bits per pattern: caps the normalizers at ``n_units``; None leaves them uncapped (binned rows).
    prior, n_classes, validate_args
        As in :func:`label_information`.

    Returns
    -------
    dict
        As :func:`label_information`.
    """
    _check_prior(prior, n_classes)
    codes = np.asarray(codes)
    if validate_args:
        if codes.ndim != 1 or not np.issubdtype(codes.dtype, np.integer) or (codes.size and codes.min() < 0):
            raise ValueError(
                f"Expected `codes` to be 1-D non-negative ints, but got {codes.dtype} of shape {codes.shape}."
            )
        labels = check_labels(labels, codes.shape[0], of="len(codes)")
    else:
        labels = np.asarray(labels, dtype=np.int64)
    labelled = labels != NO_LABEL
    if not labelled.any():
        raise ValueError(
            f"Expected at least one labelled observation (label >= 0), but all {labels.size} labels are -1 "
            "(no label): label measures cannot be computed."
        )
    if not labelled.all():
        codes, labels = codes[labelled], labels[labelled]
    dense, k = _dense_codes(codes.astype(np.int64, copy=False))
    lab, n_labels = _dense_codes(labels)
    return information_from_cells(
        *_joint_cells(dense, lab, n_labels), k=k, n_labels=n_labels, n_units=n_units, prior=prior, n_classes=n_classes
    )


def pattern_label_information(
    bits: np.ndarray, n_units: int, labels: np.ndarray, *, n_classes: int | None = None
) -> tuple[PatternCounts, dict | None]:
    """Exact counts of all observations and the label measures of the labelled ones, from one sort.

    Parameters
    ----------
    bits : np.ndarray
        ``(n, ceil(n_units / 8))`` uint8 packed patterns, validated by the caller.
    n_units : int
    labels : np.ndarray
        ``(n,)`` int labels, ``-1`` where unknown: such observations count as patterns only.
    n_classes : int, optional
        As in :func:`information_from_cells`.

    Returns
    -------
    counts : PatternCounts
        Of all ``n`` observations.
    info : dict or None
        As :func:`information_from_cells` (empirical prior), plus ``k_joint``, the number of non-empty
        ``(pattern, label)`` cells; None when no observation is labelled.
    """
    label_codes, n_labels = dense_labels(labels)
    if not n_labels:
        return pattern_counts(bits, n_units, validate_args=False), None
    counts, cell_pattern, cell_label, cell_count = pattern_label_cells(
        bits, n_units, label_codes, n_labels + 1, validate_args=False
    )
    keep = cell_label < n_labels  # the last code is "no label"
    info = information_from_cells(
        cell_pattern[keep], cell_label[keep], cell_count[keep], k=len(counts), n_labels=n_labels, n_units=n_units,
        n_classes=n_classes,
    )
    return counts, {**info, "k_joint": int(np.count_nonzero(keep))}


def information_from_cells(
    cell_pattern: np.ndarray, cell_label: np.ndarray, cell_count: np.ndarray, *, k: int, n_labels: int,
    n_units: int | None = None, prior: str = "empirical", n_classes: int | None = None,
) -> dict:
    """All pattern-label measures from the non-empty ``(pattern, label)`` cells of labelled observations.

    The core of :func:`label_information_from_codes`, for callers that counted the cells themselves
    (:func:`actpat.analysis.counts.pattern_label_cells`). No argument is validated.

    Parameters
    ----------
    cell_pattern, cell_label, cell_count : np.ndarray
        ``(K_cells,)`` ints: pattern index in ``0 .. k - 1``, label index in ``0 .. n_labels - 1`` (every
        label index occurring) and count (> 0) of each cell.
    k, n_labels : int
        Number of pattern indices (``k`` of the result counts those that occur in a cell) and of labels
        present.
    n_units, prior, n_classes
        As in :func:`label_information_from_codes`.

    Returns
    -------
    dict
        As :func:`label_information`.
    """
    _check_prior(prior, n_classes)
    if n_classes is not None:
        n_classes = check_n_classes(n_classes, n_labels)
    h_a, h_l, h_al, h_a_given_l, i_al, h_l_given_a = _COMPUTE[prior](
        cell_pattern, cell_label, cell_count, k, n_labels, n_classes
    )
    n = int(cell_count.sum())
    k = int(np.count_nonzero(np.bincount(cell_pattern, minlength=k)))  # the patterns of labelled observations
    classes = n_labels if n_classes is None else n_classes
    h_cond_max, i_max = _normalizers(n, classes, math.inf if n_units is None else float(n_units))
    return {
        "entropy": h_a,
        "label_entropy": h_l,
        "joint_entropy": h_al,
        "conditional_entropy": h_a_given_l,
        "mutual_information": i_al,
        "label_conditional_entropy": h_l_given_a,
        "conditional_entropy_normalized": _ratio(h_a_given_l, h_cond_max),
        "mutual_information_normalized": _ratio(i_al, i_max),
        "n": n,
        "k": k,
        "n_labels": n_labels,
        "n_classes": classes,
    }


def label_information(
    bits, labels, n_units: int, *, prior: str = "empirical", n_classes: int | None = None,
    validate_args: bool = True,
) -> dict:
    """All pattern-label measures from one exact count of ``(pattern, label)`` pairs.

    Parameters
    ----------
    bits : array_like
        ``(n, ceil(n_units / 8))`` uint8 packed patterns, one observation per row.
    labels : array_like
        ``(n,)`` integer class of each observation (a conv site repeats the sample's label for every
        position); ``-1`` means "no label": such observations are left out of every measure here.
        Float labels are an error.
    n_units : int
        Units per pattern.
    prior : {"empirical", "balanced", "nominal"}, default "empirical"
        How the label prior ``p(l)`` enters.

        - ``"empirical"`` (SPEC section 3): every observation has weight 1; ``p(a, l) = c(a, l) / n`` and
          ``H(A|L) = H(A, L) - H(L)`` with the observed class frequencies.
        - ``"balanced"``: observations are reweighted so that each class present has total mass
          ``1 / L`` (``L`` classes present, ``n_l`` observations of class ``l``):
          ``p(a, l) = c(a, l) / (L n_l)``, ``H(L) = log2 L``, and ``H(A|L)`` is the unweighted class
          average of the per-class entropies. A proper joint distribution, as if every class had been
          observed equally often.
        - ``"nominal"``: the joint stays empirical, ``p(a, l) = c(a, l) / n``, but the label prior is
          taken to be the nominal ``1 / n_classes``: ``H(A|L) = H(A, L) - log2 n_classes`` and
          ``I(A;L) = H(A) - H(A|L)``. This is the convention of the reference implementation of
          Hartmann et al. (2021), which passes the dataset's class count. It equals ``"empirical"``
          only for exactly balanced classes (then ``H(L) = log2 n_classes``); otherwise its ``I(A;L)``
          exceeds the empirical one by ``log2 n_classes - H(L)``. Not a distribution's entropy: the
          values are not clipped and ``H(A|L)`` may be negative. Offered for comparison with the
          reference only.
    n_classes : int or None, default None
        The dataset's class count, at least the number of classes present. Required by
        ``prior="nominal"``; also the ``C`` of the normalizers (default: the classes present).
    validate_args : bool, default True
        Check shapes, dtypes and labels.

    Returns
    -------
    dict
        In **bits**, over the labelled observations: ``entropy`` = H(A), ``label_entropy`` = H(L),
        ``joint_entropy`` = H(A, L), ``conditional_entropy`` = H(A|L), ``mutual_information`` = I(A;L)
        = H(A) - H(A|L), ``label_conditional_entropy`` = H(L|A) = H(A, L) - H(A). Dimensionless,
        with the reference's normalizers (``C`` classes, ``n`` observations):
        ``conditional_entropy_normalized`` = H(A|L) / min(n_units, log2(n / C)) and
        ``mutual_information_normalized`` = I(A;L) / (min(n_units, log2 n) - min(n_units, log2(n / C)))
        (NaN where the normalizer is 0). Ints: ``n`` (labelled observations), ``k`` (their distinct
        patterns), ``n_labels`` (classes present), ``n_classes`` (``C``).

    Raises
    ------
    ValueError
        Bad shapes or dtypes, float labels, a label below -1, no labelled observation, an unknown
        ``prior``, ``"nominal"`` without ``n_classes``, or ``n_classes`` below the classes present.

    Notes
    -----
    Plug-in estimates: I(A; L) is biased upwards when patterns are nearly unique (then H(L|A) -> 0
    and I -> H(L)). For ``"empirical"`` and ``"balanced"`` differences are clipped at 0 against
    rounding, and I at ``min(H(A), H(L))``.

    References
    ----------
    Hartmann, Franzen & Brodehl (2021). Studying the evolution of neural activation patterns during
    training of feed-forward ReLU networks. Frontiers in Artificial Intelligence 4.

    Examples
    --------
    >>> bits = np.array([[0], [0], [1], [1], [1]], dtype=np.uint8)
    >>> info = label_information(bits, np.array([0, 0, 1, 1, -1]), n_units=1)
    >>> info["entropy"], info["label_entropy"], info["mutual_information"], info["n"]
    (1.0, 1.0, 1.0, 4)
    >>> nominal = label_information(bits, np.array([0, 0, 1, 1, -1]), 1, prior="nominal", n_classes=4)
    >>> nominal["conditional_entropy"], nominal["mutual_information"]
    (-1.0, 2.0)
    """
    if validate_args:
        _check_prior(prior, n_classes)
        counts, codes = pattern_codes(bits, n_units)
        labels = check_labels(labels, codes.shape[0])
    else:
        counts, codes = pattern_codes(bits, n_units, validate_args=False)
    return label_information_from_codes(
        codes, labels, n_units=counts.n_units, prior=prior, n_classes=n_classes, validate_args=False
    )


def conditional_entropy(
    bits, labels, n_units: int, *, prior: str = "empirical", n_classes: int | None = None,
    validate_args: bool = True,
) -> float:
    """Conditional entropy ``H(A|L) = H(A, L) - H(L)`` of patterns given labels, in **bits**.

    Parameters are those of :func:`label_information` (``-1`` labels are left out).

    Examples
    --------
    >>> bits = np.array([[0], [1], [0], [1]], dtype=np.uint8)
    >>> conditional_entropy(bits, np.array([0, 0, 1, 1]), n_units=1)
    1.0
    """
    info = label_information(bits, labels, n_units, prior=prior, n_classes=n_classes, validate_args=validate_args)
    return info["conditional_entropy"]


def mutual_information(
    bits, labels, n_units: int, *, prior: str = "empirical", n_classes: int | None = None,
    validate_args: bool = True,
) -> float:
    """Mutual information ``I(A; L) = H(A) - H(A|L)`` between patterns and labels, in **bits**.

    Parameters are those of :func:`label_information` (``-1`` labels are left out).

    Returns
    -------
    float
        ``0 <= I <= min(H(A), H(L))`` for the ``"empirical"`` and ``"balanced"`` priors.

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
    info = label_information(bits, labels, n_units, prior=prior, n_classes=n_classes, validate_args=validate_args)
    return info["mutual_information"]
