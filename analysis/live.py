"""The live statistics of one probe of one site (SPEC section 6): what the prober's worker computes.

A pure function of the reader's public :class:`~actpat.recorder.reader.Patterns`, built on
:func:`~actpat.analysis.measures.pattern_measures` and the Jaccard indices of
:mod:`~actpat.analysis.similarity`; the names are the registry's live metrics
(:func:`~actpat.analysis.metrics.metric_names` with ``live=True``).
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from actpat.analysis.counts import PatternCounts
from actpat.analysis.measures import pattern_measures
from actpat.analysis.metrics import metric_names
from actpat.analysis.similarity import set_similarities

__all__ = ["LIVE_METRICS", "live_measures"]

#: Every metric :func:`live_measures` can return, in registry order.
LIVE_METRICS: tuple[str, ...] = tuple(metric_names(live=True))


def live_measures(
    patterns,
    references: Mapping[str, Optional[PatternCounts]] = {},  # noqa: B006 - read only
    *,
    n_classes: int | str | None = None,
) -> tuple[PatternCounts, dict[str, float]]:
    """Exact per-site statistics of one probe, compared with reference probes of the same site.

    Parameters
    ----------
    patterns : Patterns
        All observations of one site at one probe (``bits``, ``n_units``, ``labels`` with -1 unknown).
    references : mapping of str to PatternCounts or None, default {}
        Pattern counts of earlier probes of the same site by reference name (``"init"``, ``"last"``);
        None where this probe is the reference itself (``init`` at the first probe: indices of 1).
    n_classes : int, "probe" or None, default None
        The dataset's class count: adds ``conditional_entropy_nominal`` and
        ``mutual_information_nominal`` (the reference implementation's convention). ``"probe"``: the
        classes present among the probe's labels (a fixed probe set: the same count at every probe).

    Returns
    -------
    counts : PatternCounts
        The exact pattern counts of this probe: the reference for later probes.
    metrics : dict of str to float
        ``entropy`` (bits), ``normalized_entropy``, ``distinct``, ``top_mass``, ``mutual_information``
        (bits; only with labels) and ``jaccard_<ref>``, ``weighted_jaccard_<ref>`` per reference.

    Examples
    --------
    >>> import numpy as np
    >>> from actpat.recorder.reader import Patterns
    >>> def probe(bits, step):
    ...     bits = np.array(bits, dtype=np.uint8)[:, None]
    ...     n = len(bits)
    ...     return Patterns("fc", step, 0, "probe", 2, bits, np.array([0, 0, 1, 1]), np.arange(n), np.zeros(n, int), 0)
    >>> init, m0 = live_measures(probe([0, 1, 2, 3], 0), {"init": None})
    >>> _, m1 = live_measures(probe([0, 0, 2, 2], 4), {"init": init, "last": init})
    >>> m0["entropy"], m0["jaccard_init"], m1["jaccard_init"], m1["weighted_jaccard_last"], m1["mutual_information"]
    (2.0, 1.0, 0.5, 0.3333333333333333, 1.0)
    """
    if n_classes == "probe":
        labels = np.asarray(patterns.labels)
        n_classes = int(np.unique(labels[labels >= 0]).size) or None
    counts, measures = pattern_measures(
        patterns.bits, patterns.n_units, patterns.labels, n_classes=n_classes, validate_args=False
    )
    metrics = {name: float(measures[name]) for name in LIVE_METRICS if name in measures}
    for name, reference in references.items():
        reference = counts if reference is None else reference
        both = set_similarities(counts, reference)  # one alignment of the two counts for both indices
        metrics[f"jaccard_{name}"] = both["jaccard"]
        metrics[f"weighted_jaccard_{name}"] = both["weighted_jaccard"]
    return counts, metrics
