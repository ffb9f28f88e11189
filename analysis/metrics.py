"""The metric registry: every number actpat emits, declared once with its unit, family and meaning.

Tables (:func:`~actpat.analysis.summarize`, the information plane), the callback's live statistics,
the TensorBoard export, the figures and the README's metric table all take names, units and groups
from here, in the manner of torchmetrics' declared metric attributes. Nothing guesses a unit from a
name.

A metric compared with a reference time point is registered once per reference: ``jaccard_init``,
``jaccard_last`` and ``jaccard_final`` are three entries of one family.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

__all__ = [
    "FAMILIES",
    "METRICS",
    "REFERENCES",
    "UNITS",
    "MetricSpec",
    "label",
    "markdown_table",
    "metric",
    "metric_names",
    "register",
]

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
    saturates : bool
        An entropy, information or pattern count whose plug-in estimate is pinned when the distinct
        patterns K come close to the observations n (``saturated``): figures mark those points.
    nan_reason : str
        Why a value can be NaN (a figure of an all-NaN series says so); empty if it is never NaN.
    """

    name: str
    unit: str
    family: str
    description: str
    symbol: str = ""
    constant: bool = False
    live: bool = False
    headline: bool = False
    saturates: bool = False
    nan_reason: str = ""

    @property
    def saturation_flag(self) -> str | None:
        """The table metric that says where this one is pinned (``saturated``, or ``saturated_wc`` for the
        width-controlled measures); None for a metric that does not saturate."""
        if not self.saturates:
            return None
        return "saturated_wc" if self.family == "width-controlled" else "saturated"

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


def markdown_table() -> str:
    """The README's metric table: one row per metric, the three references of a similarity folded into ``<r>``.

    A test checks that the README holds exactly this text between its ``metric-table`` markers.

    Examples
    --------
    >>> markdown_table().splitlines()[2]
    '| `n_observations` | count | bookkeeping | observations n of the site at this step |'
    """
    lines = ["| metric | unit | family | meaning |", "| --- | --- | --- | --- |"]
    seen = set()
    for spec in _REGISTRY.values():
        name, family, description = spec.name, spec.family, spec.description
        for ref in REFERENCES:
            if family == f"similarity to {ref}" and name.endswith(f"_{ref}"):
                name = f"{name[: -len(ref)]}<r>"
                family = "similarity to `<r>`"
                description = _REF_WORD.sub("r", description)
        if name in seen:
            continue
        seen.add(name)
        description = description.replace("|", "\\|")
        lines.append(f"| `{name}` | {spec.unit} | {family} | {description} |")
    return "\n".join(lines) + "\n"


_REF_WORD = re.compile(r"(?<![A-Za-z])(?:" + "|".join(REFERENCES) + r")(?![A-Za-z])")


def _declare(name: str, unit: str, family: str, description: str, symbol: str = "", **flags) -> None:
    register(MetricSpec(name, unit, family, description, symbol, **flags))


# ------------------------------------------------------------------ own measures of one time point
_SATURATES = {"saturates": True}
_declare("n_observations", "count", "bookkeeping", "observations n of the site at this step", "n", constant=True)
_declare("n_units", "count", "bookkeeping", "units of the site (bits per pattern)", "n_units", constant=True)
_declare("nan_count", "count", "bookkeeping", "NaN pre-activations, stored as off", "NaN count", constant=True)
_declare("entropy_max", "bits", "bookkeeping", "H_max = min(n_units, log2 n)", "H_max", constant=True)
_declare(
    "saturated", "flag", "bookkeeping", "1 where K >= 0.9 n: plug-in entropies are pinned near log2 n, "
    "informations near H(L); figures mark these points", "saturated", constant=True,
)
_declare("entropy", "bits", "entropy", "plug-in pattern entropy H(A)", "H(A)", live=True, **_SATURATES)
_declare("entropy_mm", "bits", "entropy", "Miller-Madow corrected H(A) + (K-1)/(2 n ln 2)", "H_MM(A)", **_SATURATES)
_declare(
    "normalized_entropy", "fraction", "entropy", "H(A) / H_max", "H(A) / H_max", live=True, headline=True,
    nan_reason="n = 1, so H_max = 0", **_SATURATES,
)
_declare("distinct", "count", "entropy", "distinct patterns K", "K", live=True, **_SATURATES)
_declare("distinct_fraction", "fraction", "entropy", "K / n", "K / n", headline=True, **_SATURATES)
_declare("top_count", "count", "entropy", "count of the most frequent pattern max_a c(a)", "max c(a)")
_declare("top_mass", "fraction", "entropy", "mass of the most frequent pattern max_a p(a)", "max p(a)", live=True)

# ------------------------------------------------------------------ label information (labelled observations)
_declare("label_entropy", "bits", "label information", "H(L), empirical label prior", "H(L)")
_declare("joint_entropy", "bits", "label information", "H(A,L)", "H(A,L)", **_SATURATES)
_declare("conditional_entropy", "bits", "label information", "H(A|L) = H(A,L) - H(L)", "H(A|L)", **_SATURATES)
_declare(
    "mutual_information", "bits", "label information",
    "I(A;L) = H(A) - H(A|L) between pattern and label (information plane: I(T;Y) of the sample's pattern)",
    "I(A;L)", live=True, **_SATURATES,
)
_declare("label_conditional_entropy", "bits", "label information", "H(L|A) = H(A,L) - H(A)", "H(L|A)")
_declare(
    "conditional_entropy_normalized", "ratio", "label information",
    "H(A|L) / min(n_units, log2(n / C)), C classes (the reference's normalizer)", "H(A|L) / max",
    nan_reason="n = C, so the normalizer is 0", **_SATURATES,
)
_declare(
    "mutual_information_normalized", "ratio", "label information",
    "I(A;L) / (min(n_units, log2 n) - min(n_units, log2(n / C))) (the reference's normalizer)", "I(A;L) / max",
    nan_reason="n_units <= log2(n / C), so the normalizer is 0", **_SATURATES,
)
_declare(
    "conditional_entropy_nominal", "bits", "label information",
    "H(A,L) - log2 n_classes: the reference implementation's H(A|L), nominal prior 1/n_classes (given n_classes)",
    "H(A,L) - log2 C", live=True, **_SATURATES,
)
_declare(
    "mutual_information_nominal", "bits", "label information",
    "H(A) - H(A,L) + log2 n_classes: the reference implementation's I(A;L) (given n_classes)",
    "I_nominal(A;L)", live=True, **_SATURATES,
)

# ------------------------------------------------------------------ unit level
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
        f"JI_T({_ref}, t)", nan_reason="no pattern seen more than T times at either step",
    )
    _declare(
        f"weighted_jaccard_{_ref}", "fraction", _family, f"wJI = sum min(c_t, c_{_ref}) / sum max(c_t, c_{_ref})",
        f"wJI({_ref}, t)", live=_ref != "final", headline=_ref == "final",
    )
    _declare(
        f"identical_fraction_{_ref}", "fraction", _family,
        f"fraction of the same observations (shared sample ids) whose pattern is identical at t and {_ref}",
        f"identical({_ref}, t)",
    )
    _declare(
        f"hamming_{_ref}", "fraction", _family,
        f"mean Hamming distance per unit between t and {_ref}, same observations (shared sample ids)",
        f"Hamming({_ref}, t)",
    )
    _declare(f"distinct_change_{_ref}", "count", _family, f"net change in distinct patterns K_t - K_{_ref}",
             f"K_t - K_{_ref}")
    _declare(
        f"distinct_change_relative_{_ref}", "ratio", _family,
        f"relative net change (K_t - K_{_ref}) / K_t (the reference's '% Patterns Changed')",
        f"(K_t - K_{_ref}) / K_t",
    )

# ------------------------------------------------------------------ information plane (SPEC section 5)
_declare(
    "input_information", "bits", "information plane",
    "I(X;T) (= H(T) of the sample's pattern for binary patterns; KDE: upper bound)", "I(X;T)", **_SATURATES,
)
_declare("input_information_mm", "bits", "information plane", "I(X;T) with Miller-Madow correction", "I_MM(X;T)",
         **_SATURATES)
_declare("input_information_lower", "bits", "information plane", "KDE lower bound of I(X;T)", "I(X;T) lower")
_declare("mutual_information_mm", "bits", "information plane", "I(T;Y) with Miller-Madow correction on each entropy",
         "I_MM(T;Y)", **_SATURATES)
_declare("mutual_information_lower", "bits", "information plane", "KDE lower bound of I(T;Y)", "I(T;Y) lower")

# ------------------------------------------------------------------ width-controlled (SPEC section 4; actpat.analysis.width)
_WC = "on m random units and n_obs random observations, mean over subsets"
_declare("entropy_wc", "bits", "width-controlled", f"H(A) {_WC}", "H_m(A)", **_SATURATES)
_declare("normalized_entropy_wc", "fraction", "width-controlled", f"H(A) / min(m, log2 n_obs) {_WC}",
         "H_m(A) / H_max", headline=True, **_SATURATES)
_declare("distinct_fraction_wc", "fraction", "width-controlled", f"K / n_obs {_WC}", "K_m / n", **_SATURATES)
_declare("saturated_wc", "flag", "width-controlled", "1 where the mean K / n_obs of the subsets is >= 0.9",
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
_declare("wc_subsets", "count", "width-controlled", "random subsets of the step's own measures (1 where m and n_obs "
         "are the whole step); a similarity averages over the subsets of its reference", "subsets", constant=True)

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
