"""The pattern and label measures of one site at one time point, from one exact count."""

from __future__ import annotations

import math

import numpy as np

from actpat.analysis.counts import PatternCounts, _check_bits, _counts_and_codes
from actpat.analysis.entropy import _compute_label_information, entropy, miller_madow, normalized_entropy

__all__ = ["pattern_measures"]


def pattern_measures(
    bits, n_units: int, labels=None, *, validate_args: bool = True
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
    validate_args : bool, default True

    Returns
    -------
    counts : PatternCounts
        Exact distinct patterns of all ``n`` observations (for the similarity measures).
    measures : dict
        ``n_observations, n_units, entropy, entropy_mm, entropy_max, normalized_entropy, distinct,
        distinct_fraction, top_mass`` and, with labels, ``label_entropy, joint_entropy,
        conditional_entropy, mutual_information, label_conditional_entropy`` (empirical label prior).
        Entropies and informations are in **bits**.

    Examples
    --------
    >>> bits = np.array([[1], [1], [2], [3]], dtype=np.uint8)
    >>> _, m = pattern_measures(bits, 2, labels=np.array([0, 0, 1, 1]))
    >>> m["entropy"], m["distinct"], m["top_mass"], m["mutual_information"]
    (1.5, 3, 0.5, 1.0)
    """
    if validate_args:
        bits = _check_bits(bits, n_units)
    counts, codes = _counts_and_codes(bits, n_units)
    n = counts.n
    measures = {
        "n_observations": n,
        "n_units": n_units,
        "entropy": entropy(counts),
        "entropy_mm": miller_madow(counts),
        "entropy_max": min(float(n_units), math.log2(n)),
        "normalized_entropy": normalized_entropy(counts),
        "distinct": counts.k,
        "distinct_fraction": counts.k / n,
        "top_mass": int(counts.counts.max()) / n,
    }
    if labels is None:
        return counts, measures
    labels = np.asarray(labels)
    if validate_args and labels.shape != (n,):
        raise ValueError(f"Expected `labels` to have shape ({n},), but got {labels.shape}.")
    labelled = labels >= 0
    if labelled.any():
        k = counts.k
        if not labelled.all():
            labelled_counts, codes = _counts_and_codes(bits[labelled], n_units)
            k = labelled_counts.k
        info = _compute_label_information(codes, k, labels[labelled], "empirical")
        measures.update(
            label_entropy=info["h_l"],
            joint_entropy=info["h_al"],
            conditional_entropy=info["h_a_given_l"],
            mutual_information=info["i_al"],
            label_conditional_entropy=info["h_l_given_a"],
        )
    return counts, measures
