"""Offline analysis of recorded activation patterns: pure numpy functions, tidy tables, figures.

Nothing here imports torch: the core works on packed ``uint8`` patterns (see the README's format).
Names are loaded on first access (PEP 562), so ``import actpat.analysis`` costs nothing and a command
that only reads shards does not pay for pandas, matplotlib, scipy or TensorBoard it does not use.
"""

from __future__ import annotations

import importlib
import sys
import types

# Public name -> submodule that defines it.
_EXPORTS = {
    "PatternCounts": "counts",
    "pattern_counts": "counts",
    "conditional_entropy": "entropy",
    "entropy": "entropy",
    "label_information": "entropy",
    "miller_madow": "entropy",
    "mutual_information": "entropy",
    "normalized_entropy": "entropy",
    "firing_rates": "firing",
    "information_plane": "information",
    "pattern_measures": "measures",
    "RunAnalysis": "pipeline",
    "analyze_run": "pipeline",
    "Stability": "similarity",
    "UnpairedRows": "similarity",
    "aligned_rows": "similarity",
    "jaccard": "similarity",
    "stability": "similarity",
    "weighted_jaccard": "similarity",
    "summarize": "summarize",
    "to_tensorboard": "tensorboard",
    "UnitStats": "units",
    "unit_stats": "units",
    "compare": "compare",
    "convergence_table": "convergence",
    "dip_table": "convergence",
    "live_measures": "live",
    "metric": "metrics",
    "metric_names": "metrics",
    "pair_region_changes": "regions",
    "region_table": "regions",
    "segment_regions": "regions",
    "width_controlled_table": "width",
}
_SUBMODULES = ("datasets", "metrics", "mi", "plots")

__all__ = sorted([*_EXPORTS, *_SUBMODULES], key=str.lower)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing submodule `entropy` or `summarize` binds it on the package; the function of the same
        # name must stay what `actpat.analysis.entropy` means, whatever was imported first.
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
