"""The metric registry: every number actpat emits, declared once with its unit, family and meaning.

Tables (:func:`~actpat.analysis.summarize`, the information plane), the callback's live statistics,
the TensorBoard export, the figures and the README's metric table all take names, units and groups
from here, in the manner of torchmetrics' declared metric attributes. Nothing guesses a unit from a
name.

A metric compared with a reference time point is registered once per reference: ``jaccard_init``,
``jaccard_last`` and ``jaccard_final`` are three entries of one family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

__all__ = ["FAMILIES", "METRICS", "REFERENCES", "UNITS", "MetricSpec", "label", "metric", "metric_names", "register"]

#: Reference time points of the similarity measures (SPEC section 4).
REFERENCES = ("init", "last", "final")

#: Units a metric may have. ``bits``: entropies and informations (log base 2); ``fraction``: a
#: dimensionless number in [0, 1]; ``ratio``: dimensionless, not bounded by 1; ``count``: a number of
#: things; ``flag``: 0 or 1.
UNITS = ("bits", "fraction", "ratio", "count", "flag")

#: Families, in the order dashboards and figure folders list them.
FAMILIES = (
    "entropy",
    "label information",
    "similarity to init",
    "similarity to last",
    "similarity to final",
    "units",
    "information plane",
    "bookkeeping",
    "width-controlled",
    "linear regions",
)


@dataclass(frozen=True)
class MetricSpec:
    """What one emitted number is.

    Attributes
    ----------
    name : str
        The name in the ``metric`` column of every table and in TensorBoard tags.
    unit : str
        One of :data:`UNITS`.
    family : str
        One of :data:`FAMILIES`: the TensorBoard custom-scalars category and figure group.
    description : str
        One line, with the symbol of ../shared/SPEC.md where there is one (``H(A)``, ``I(A;L)``).
    symbol : str
        Short label for axes (``"H(A)"``, ``"wJI(final, t)"``); defaults to the name.
    constant : bool
        A property of the site or the record rather than of training (``n_units``, ``nan_count``):
        kept in tables, never drawn as a figure of its own.
    live : bool
        Logged by the callback after every probe.
    headline : bool
        Drawn as a site x time heatmap by default (the figures of Hartmann et al. 2021).
    """

    name: str
    unit: str
    family: str
    description: str
    symbol: str = ""
    constant: bool = False
    live: bool = False
    headline: bool = False

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"Expected `unit` to be one of {UNITS}, but got {self.unit!r} for {self.name!r}.")
        if self.family not in FAMILIES:
            raise ValueError(f"Expected `family` to be one of {FAMILIES}, but got {self.family!r} for {self.name!r}.")


_REGISTRY: dict[str, MetricSpec] = {}

#: Read-only view of every registered metric, in registration order.
METRICS: Mapping[str, MetricSpec] = _REGISTRY


def register(spec: MetricSpec) -> MetricSpec:
    """Add ``spec`` to the registry; a name may be registered once."""
    if spec.name in _REGISTRY:
        raise ValueError(f"Expected a new metric name, but {spec.name!r} is already registered.")
    _REGISTRY[spec.name] = spec
    return spec


def metric(name: str) -> MetricSpec:
    """The declaration of metric ``name``; a clear error for an unregistered name."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"Expected a registered metric name, but got {name!r}. Registered: {sorted(_REGISTRY)}."
        ) from None


def metric_names(
    *, family: str | Iterable[str] | None = None, live: bool | None = None, headline: bool | None = None,
    constant: bool | None = None,
) -> list[str]:
    """Names of the registered metrics that match every given filter, in registration order."""
    families = {family} if isinstance(family, str) else None if family is None else set(family)
    return [
        s.name for s in _REGISTRY.values()
        if (families is None or s.family in families)
        and (live is None or s.live == live)
        and (headline is None or s.headline == headline)
        and (constant is None or s.constant == constant)
    ]


def label(name: str) -> str:
    """Axis label of a metric: its symbol, with the unit in brackets where it has a physical one.

    Examples
    --------
    >>> label("entropy"), label("normalized_entropy"), label("distinct")
    ('H(A) [bits]', 'H(A) / H_max', 'K [count]')
    """
    spec = metric(name)
    symbol = spec.symbol or spec.name
    return f"{symbol} [{spec.unit}]" if spec.unit in ("bits", "count") else symbol


def _declare(name: str, unit: str, family: str, description: str, symbol: str = "", **flags: bool) -> None:
    register(MetricSpec(name, unit, family, description, symbol, **flags))


# ------------------------------------------------------------------ own measures of one time point
_declare("n_observations", "count", "bookkeeping", "observations n of the site at this step", "n", constant=True)
_declare("n_units", "count", "bookkeeping", "units of the site (bits per pattern)", "n_units", constant=True)
_declare("nan_count", "count", "bookkeeping", "NaN pre-activations, stored as off", "NaN count", constant=True)
_declare("entropy", "bits", "entropy", "plug-in pattern entropy H(A)", "H(A)", live=True)
_declare("entropy_mm", "bits", "entropy", "Miller-Madow corrected H(A) + (K-1)/(2 n ln 2)", "H_MM(A)")
_declare("entropy_max", "bits", "bookkeeping", "H_max = min(n_units, log2 n)", "H_max", constant=True)
_declare(
    "normalized_entropy", "fraction", "entropy", "H(A) / H_max", "H(A) / H_max", live=True, headline=True
)
_declare("distinct", "count", "entropy", "distinct patterns K", "K", live=True)
_declare("distinct_fraction", "fraction", "entropy", "K / n", "K / n", headline=True)
_declare("top_mass", "fraction", "entropy", "mass of the most frequent pattern max_a p(a)", "max p(a)", live=True)
_declare("label_entropy", "bits", "label information", "H(L), empirical label prior", "H(L)")
_declare("joint_entropy", "bits", "label information", "H(A,L)", "H(A,L)")
_declare("conditional_entropy", "bits", "label information", "H(A|L) = H(A,L) - H(L)", "H(A|L)")
_declare("mutual_information", "bits", "label information", "I(A;L) = H(A) - H(A|L)", "I(A;L)", live=True)
_declare("label_conditional_entropy", "bits", "label information", "H(L|A)", "H(L|A)")
_declare("firing_rate_mean", "fraction", "units", "mean over units of the fraction of observations on", "mean rate")
_declare("unit_entropy_mean", "bits", "units", "mean over units of the binary entropy of each unit", "mean H(unit)")
_declare("dead_units", "count", "units", "units never on", "dead units")
_declare("always_on_units", "count", "units", "units always on", "always-on units")

# ------------------------------------------------------------------ similarity to a reference time point
for _ref in REFERENCES:
    _family = f"similarity to {_ref}"
    _declare(
        f"jaccard_{_ref}", "fraction", _family, f"JI = |S_t n S_{_ref}| / |S_t u S_{_ref}|", f"JI({_ref}, t)",
        live=_ref != "final", headline=_ref == "init",
    )
    _declare(
        f"jaccard_t_{_ref}", "fraction", _family, f"JI on patterns seen more than T times, to {_ref}",
        f"JI_T({_ref}, t)",
    )
    _declare(
        f"weighted_jaccard_{_ref}", "fraction", _family, f"wJI = sum min(c_t, c_{_ref}) / sum max(c_t, c_{_ref})",
        f"wJI({_ref}, t)", live=_ref != "final", headline=_ref == "final",
    )
    _declare(
        f"identical_fraction_{_ref}", "fraction", _family,
        f"fraction of the same observations whose pattern is identical at t and {_ref}", f"identical({_ref}, t)",
    )
    _declare(
        f"hamming_{_ref}", "fraction", _family, f"mean Hamming distance per unit between t and {_ref}",
        f"Hamming({_ref}, t)",
    )
    _declare(f"distinct_change_{_ref}", "count", _family, f"net change in distinct patterns K_t - K_{_ref}",
             f"K_t - K_{_ref}")

# ------------------------------------------------------------------ information plane (SPEC section 5)
_declare("I_XT", "bits", "information plane", "I(X;T) (= H(T) for binary patterns; KDE: upper bound)", "I(X;T)")
_declare("I_XT_mm", "bits", "information plane", "I(X;T) with Miller-Madow correction", "I_MM(X;T)")
_declare("I_XT_lower", "bits", "information plane", "KDE lower bound of I(X;T)", "I(X;T) lower")
_declare("I_TY", "bits", "information plane", "I(T;Y) (KDE: upper bound)", "I(T;Y)")
_declare("I_TY_mm", "bits", "information plane", "I(T;Y) with Miller-Madow correction", "I_MM(T;Y)")
_declare("I_TY_lower", "bits", "information plane", "KDE lower bound of I(T;Y)", "I(T;Y) lower")
_declare("saturated", "flag", "information plane", "1 where K is close to n: the estimate is pinned at log2 n",
         "saturated", constant=True)

# ------------------------------------------------------------------ width-controlled (SPEC section 4; actpat.analysis.width)
_declare("entropy_ceiling", "flag", "entropy",
         "1 where K >= 0.9 n: nearly every pattern is distinct, H(A) sits at log2 n and cannot rise", "at ceiling")
_WC = "on m random units and n_obs random observations, mean over subsets"
_declare("entropy_wc", "bits", "width-controlled", f"H(A) {_WC}", "H_m(A)")
_declare("normalized_entropy_wc", "fraction", "width-controlled", f"H(A) / min(m, log2 n_obs) {_WC}",
         "H_m(A) / H_max", headline=True)
_declare("distinct_fraction_wc", "fraction", "width-controlled", f"K / n_obs {_WC}", "K_m / n")
_declare("entropy_ceiling_wc", "flag", "width-controlled", "1 where the mean K / n_obs of the subsets is >= 0.9",
         "at ceiling (m units)")
for _name in ("entropy_wc", "normalized_entropy_wc", "distinct_fraction_wc"):
    _declare(f"{_name}_sd", METRICS[_name].unit, "width-controlled",
             f"standard deviation over subsets of {_name}", f"sd {METRICS[_name].symbol}")
for _ref in REFERENCES:
    for _name, _symbol in (("jaccard", "JI"), ("weighted_jaccard", "wJI")):
        _declare(f"{_name}_wc_{_ref}", "fraction", "width-controlled", f"{_symbol}({_ref}, t) {_WC}",
                 f"{_symbol}_m({_ref}, t)", headline=(_name, _ref) == ("weighted_jaccard", "final"))
        _declare(f"{_name}_wc_{_ref}_sd", "fraction", "width-controlled",
                 f"standard deviation over subsets of {_symbol}({_ref}, t) on m units", f"sd {_symbol}_m({_ref}, t)")
_declare("wc_units", "count", "width-controlled", "m, units per subset (the same for every site)", "m", constant=True)
_declare("wc_observations", "count", "width-controlled", "n_obs, observations per subset", "n_obs", constant=True)
_declare("wc_subsets", "count", "width-controlled", "random subsets averaged", "subsets", constant=True)

# ------------------------------------------------------------------ linear regions (actpat.analysis.regions)
_declare("region_distinct", "count", "linear regions", "distinct linear regions of the probe set (whole-network patterns)",
         "regions")
_declare("region_entropy", "bits", "linear regions", "plug-in entropy of the probe set's distribution over regions",
         "H(region)")
_declare("region_alone_fraction", "fraction", "linear regions", "fraction of samples alone in their region",
         "alone")
_declare("region_visited", "count", "linear regions", "distinct regions visited by the probe set up to this step",
         "regions visited")
_declare("region_units", "count", "linear regions", "bits of a region pattern (units of all sites, flat)",
         "region bits", constant=True)
for _ref in REFERENCES:
    _declare(f"region_identical_{_ref}", "fraction", "linear regions",
             f"fraction of samples in the same region at t and {_ref}", f"same region({_ref}, t)")
_declare("segment_region_changes", "count", "linear regions",
         "region changes along a segment between two probe samples, mean over random pairs (exact)", "changes/segment")
_declare("segment_region_changes_sd", "count", "linear regions",
         "standard deviation over pairs of the region changes along a segment", "sd changes/segment")
_declare("segment_region_density", "ratio", "linear regions",
         "region changes per unit of input distance along segments between probe samples", "changes/distance")
