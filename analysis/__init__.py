"""Offline analysis of recorded activation patterns: pure numpy functions, tidy tables, figures.

Nothing here imports torch: the core works on packed ``uint8`` patterns (see the README's format).
"""

from actpat.analysis import datasets, mi, plots
from actpat.analysis.counts import PatternCounts, pattern_counts
from actpat.analysis.entropy import (
    conditional_entropy,
    entropy,
    label_information,
    miller_madow,
    mutual_information,
    normalized_entropy,
)
from actpat.analysis.firing import firing_rates
from actpat.analysis.information import information_plane
from actpat.analysis.measures import pattern_measures
from actpat.analysis.similarity import Stability, jaccard, stability, weighted_jaccard
from actpat.analysis.summarize import summarize
from actpat.analysis.tensorboard import to_tensorboard
from actpat.analysis.units import UnitStats, unit_stats

__all__ = [
    "PatternCounts",
    "Stability",
    "UnitStats",
    "conditional_entropy",
    "datasets",
    "entropy",
    "firing_rates",
    "information_plane",
    "jaccard",
    "label_information",
    "mi",
    "miller_madow",
    "mutual_information",
    "normalized_entropy",
    "pattern_counts",
    "pattern_measures",
    "plots",
    "stability",
    "summarize",
    "to_tensorboard",
    "unit_stats",
    "weighted_jaccard",
]
