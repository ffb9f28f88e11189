"""The pattern and label measures of one site at one time point, from one exact count."""

from __future__ import annotations

import math

import numpy as np

from actpat.analysis._validation import check_bits, check_labels
from actpat.analysis.counts import PatternCounts, pattern_counts
from actpat.analysis.entropy import (
    _miller_madow_from,
    _normalized_from,
    entropy,
    nominal_conditional_entropy,
    pattern_label_information,
)

__all__ = ["SATURATION", "pattern_measures"]

#: A point is ``saturated`` when its distinct patterns reach this fraction of its observations: then
#: plug-in entropies are pinned near ``log2 n`` and label informations near ``H(L)``.
SATURATION = 0.9

_LABEL_METRICS = (
    "label_entropy",
    "joint_entropy",
    "conditional_entropy",
    "mutual_information",
    "label_conditional_entropy",
    "conditional_entropy_normalized",
    "mutual_information_normalized",
)


def pattern_measures(
    bits, n_units: int, labels=None, *, n_classes: int | None = None, saturation: float = SATURATION,
    validate_args: bool = True,
) -> tuple[PatternCounts, dict[str, float]]:
    """SPEC section 3 measures of a set of observations, counting their patterns once.

    Parameters
    ----------
    bits : array_like
        ``(n, ceil(n_units / 8))`` uint8 packed patterns.
    n_units : int
    labels : array_like, optional
        ``(n,)`` int labels, ``-1`` where unknown. Label measures use the labelled observations only
        and are left out when none is labelled.
    n_classes : int, optional
        The dataset's class count (at least the classes present). Adds the measures of the reference
        implementation's nominal convention, ``conditional_entropy_nominal`` = H(A,L) - log2 n_classes
        and ``mutual_information_nominal`` = H(A) - that, and is the ``C`` of the normalizers
        (default: the classes present).
    saturation : float, default :data:`SATURATION`
        ``saturated`` is 1 where ``K >= saturation * n``.
    validate_args : bool, default True

    Returns
    -------
    counts : PatternCounts
        Exact distinct patterns of all ``n`` observations (for the similarity measures).
    measures : dict
        Names of :mod:`actpat.analysis.metrics`: ``n_observations, n_units, entropy, entropy_mm,
        entropy_max, normalized_entropy, distinct, distinct_fraction, top_count, top_mass, saturated``
        and, with labels, ``label_entropy, joint_entropy, conditional_entropy, mutual_information,
        label_conditional_entropy, conditional_entropy_normalized, mutual_information_normalized``
        (empirical label prior, see :func:`actpat.analysis.entropy.label_information`), plus the two
        ``*_nominal`` ones with ``n_classes``. Entropies and informations are in **bits**.

    Examples
    --------
    >>> bits = np.array([[1], [1], [2], [3]], dtype=np.uint8)
    >>> _, m = pattern_measures(bits, 2, labels=np.array([0, 0, 1, 1]), n_classes=4)
    >>> m["entropy"], m["distinct"], m["top_count"], m["top_mass"], m["mutual_information"]
    (1.5, 3, 2, 0.5, 1.0)
    >>> m["conditional_entropy_nominal"], m["mutual_information_nominal"]
    (-0.5, 2.0)
    """
    if validate_args:
        bits = check_bits(bits, n_units)
        if labels is not None:
            labels = check_labels(labels, bits.shape[0])
    if labels is None:
        counts, info = pattern_counts(bits, n_units, validate_args=False), None
    else:
        counts, info = pattern_label_information(bits, n_units, np.asarray(labels), n_classes=n_classes)
    n = counts.n
    h = entropy(counts)  # once: the corrected and normalized entropies derive from it
    top = int(counts.counts.max())
    measures = {
        "n_observations": n,
        "n_units": n_units,
        "entropy": h,
        "entropy_mm": _miller_madow_from(h, counts.k, n),
        "entropy_max": min(float(n_units), math.log2(n)),
        "normalized_entropy": _normalized_from(h, n_units, n),
        "distinct": counts.k,
        "distinct_fraction": counts.k / n,
        "top_count": top,
        "top_mass": top / n,
        "saturated": float(counts.k >= saturation * n),
    }
    if info is not None:
        measures.update((name, info[name]) for name in _LABEL_METRICS)
        if n_classes is not None:
            h_nominal = nominal_conditional_entropy(info["joint_entropy"], n_classes)
            measures.update(
                conditional_entropy_nominal=h_nominal, mutual_information_nominal=info["entropy"] - h_nominal
            )
    return counts, measures
