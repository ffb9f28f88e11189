"""Width-controlled pattern measures: the same measures on ``m`` random units and ``n_obs`` random rows.

Raw JI, wJI and entropy compare whole patterns exactly, so a wide, sparsely observed site reaches
wJI(final, t) > 0.9 later and sits at its entropy ceiling whatever it learns (SPEC section 4). Cut
every site to the same number of units ``m`` (default: the narrowest site's width) and the same number
of observations ``n_obs`` (default: the fewest any site has), repeat over seeded random subsets, and
the measures of different sites become comparable; the spread over subsets is reported beside the
mean. With ``m = n_units`` and all observations they equal the raw measures exactly.

Pure core: :func:`draw_subsets` draws the subsets with its own ``np.random.default_rng``;
:func:`subset_counts` counts each subset exactly (:func:`~actpat.analysis.counts.pattern_counts`);
:func:`subset_measures` and :func:`subset_similarity` turn counts into numbers per subset;
:func:`spread` summarizes them. :func:`width_controlled_table` streams a run through the public
:class:`~actpat.recorder.reader.Run` API into the tidy table of :func:`~actpat.analysis.summarize`.

References
----------
Hartmann, Franzen & Brodehl (2021). Studying the evolution of neural activation patterns during
training of feed-forward ReLU networks. Frontiers in Artificial Intelligence 4.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from actpat.analysis.counts import PatternCounts, pattern_counts
from actpat.analysis.entropy import entropy
from actpat.analysis.metrics import REFERENCES
from actpat.analysis.similarity import jaccard, weighted_jaccard
from actpat.analysis.tables import check_references, recorded_sites, tidy_frame
from actpat.recorder.reader import Run, open_run

__all__ = [
    "Spread",
    "Subsets",
    "draw_subsets",
    "spread",
    "subset_counts",
    "subset_measures",
    "subset_similarity",
    "subset_sizes",
    "width_controlled_table",
]

log = logging.getLogger(__name__)

#: Suffix of every width-controlled metric name; ``<name>_sd`` is its spread over subsets.
SUFFIX = "_wc"


# ---------------------------------------------------------------------------------------------------
# subsets
# ---------------------------------------------------------------------------------------------------
def _check_int(name: str, value, low: int, high: int | None = None, high_text: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"Expected `{name}` to be an int, but got {value!r}.")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high_text or high}" if high is not None else f"at least {low}"
        raise ValueError(f"Expected `{name}` to be {bound}, but got {value}.")
    return value


@dataclass(frozen=True, eq=False)
class Subsets:
    """Random unit and row subsets of one site, drawn by :func:`draw_subsets`.

    Attributes
    ----------
    units : np.ndarray
        ``(n_subsets, m)`` int64, ascending unit indices of each subset.
    rows : np.ndarray or None
        ``(n_subsets, n_obs)`` int64, ascending row indices of each subset; None: every row.
    n_units, n_rows : int
        Width and number of observations of the site the subsets were drawn for.
    """

    units: np.ndarray
    rows: np.ndarray | None
    n_units: int
    n_rows: int

    @property
    def m(self) -> int:
        """Units per subset."""
        return int(self.units.shape[1])

    @property
    def n_obs(self) -> int:
        """Observations per subset."""
        return self.n_rows if self.rows is None else int(self.rows.shape[1])

    def __len__(self) -> int:
        return int(self.units.shape[0])


def draw_subsets(
    n_units: int, n_rows: int, *, m: int | None = None, n_obs: int | None = None, n_subsets: int = 10,
    seed: int | Sequence[int] = 0,
) -> Subsets:
    """Draw ``n_subsets`` random subsets of ``m`` units and ``n_obs`` rows of one site.

    Parameters
    ----------
    n_units : int
        Width of the site.
    n_rows : int
        Observations of the site at one time point.
    m : int, optional
        Units per subset, ``1 <= m <= n_units``; default all.
    n_obs : int, optional
        Rows per subset, ``1 <= n_obs <= n_rows``; default all.
    n_subsets : int, default 10
        Number of subsets. Collapsed to 1 when ``m = n_units`` and ``n_obs = n_rows`` (every subset
        would be the whole site).
    seed : int or sequence of int, default 0
        Seed of the generator ``np.random.default_rng(seed)`` that draws the subsets, and nothing
        else. Units are drawn before rows, so the unit subsets do not depend on ``n_rows``: a site
        keeps its units at every step, and its rows at every step with the same number of rows.

    Returns
    -------
    Subsets

    Examples
    --------
    >>> s = draw_subsets(64, 1000, m=16, n_obs=100, n_subsets=3, seed=(0, 2))
    >>> s.units.shape, s.rows.shape, len(s)
    ((3, 16), (3, 100), 3)
    >>> len(draw_subsets(16, 50, n_subsets=10)), draw_subsets(16, 50).rows is None
    (1, True)
    """
    n_units = _check_int("n_units", n_units, 1)
    n_rows = _check_int("n_rows", n_rows, 1)
    m = n_units if m is None else _check_int("m", m, 1, n_units, f"the site's width n_units = {n_units}")
    n_obs = n_rows if n_obs is None else _check_int(
        "n_obs", n_obs, 1, n_rows, f"the site's number of observations n_rows = {n_rows}"
    )
    n_subsets = _check_int("n_subsets", n_subsets, 1)
    full_units, full_rows = m == n_units, n_obs == n_rows
    if full_units and full_rows:
        return Subsets(np.arange(n_units, dtype=np.int64)[None], None, n_units, n_rows)
    rng = np.random.default_rng(seed)
    units = np.stack([
        np.arange(n_units, dtype=np.int64) if full_units else np.sort(rng.choice(n_units, m, replace=False))
        for _ in range(n_subsets)
    ])
    rows = None if full_rows else np.stack(
        [np.sort(rng.choice(n_rows, n_obs, replace=False)) for _ in range(n_subsets)]
    )
    return Subsets(units, rows, n_units, n_rows)


def subset_counts(bits, n_units: int, subsets: Subsets) -> list[PatternCounts]:
    """Exact pattern counts of each subset of units and rows.

    Parameters
    ----------
    bits : array_like
        ``(n, ceil(n_units / 8))`` uint8 packed patterns of one site at one time point (SPEC section 2).
    n_units : int
    subsets : Subsets
        Drawn for this site: ``subsets.n_units == n_units`` and ``subsets.n_rows == n``.

    Returns
    -------
    list of PatternCounts
        One per subset, each over ``subsets.m`` units and ``subsets.n_obs`` observations.

    Examples
    --------
    >>> bits = np.packbits([[1, 0, 1], [1, 1, 1], [0, 0, 1]], axis=1, bitorder="little")
    >>> s = Subsets(np.array([[0, 2], [1, 2]]), None, 3, 3)
    >>> [c.counts.tolist() for c in subset_counts(bits, 3, s)]
    [[1, 2], [2, 1]]
    """
    bits = np.asarray(bits)
    if not isinstance(subsets, Subsets):
        raise TypeError(f"Expected `subsets` to be a Subsets, but got {type(subsets).__name__}.")
    if bits.ndim != 2 or subsets.n_units != n_units or subsets.n_rows != bits.shape[0]:
        raise ValueError(
            f"Expected `bits` of shape (n_rows, ceil(n_units / 8)) = ({subsets.n_rows}, {(subsets.n_units + 7) // 8}) "
            f"for these subsets (n_units = {subsets.n_units}), but got shape {bits.shape} and n_units = {n_units}."
        )
    pattern_counts(bits[:1], n_units)  # validates dtype and width with the usual messages
    if subsets.rows is None and subsets.m == n_units:
        return [pattern_counts(bits, n_units, validate_args=False)]
    unpacked = np.unpackbits(bits, axis=1, count=n_units, bitorder="little")
    out = []
    for i in range(len(subsets)):
        rows = unpacked if subsets.rows is None else unpacked[subsets.rows[i]]
        packed = np.packbits(rows[:, subsets.units[i]], axis=1, bitorder="little")
        out.append(pattern_counts(packed, subsets.m, validate_args=False))
    return out


def subset_measures(counts: Iterable[PatternCounts], *, ceiling: float = 0.9) -> dict[str, np.ndarray]:
    """Entropy measures of each subset's counts.

    Parameters
    ----------
    counts : iterable of PatternCounts
        One per subset (:func:`subset_counts`).
    ceiling : float, default 0.9
        A subset is at its entropy ceiling when ``K >= ceiling * n``.

    Returns
    -------
    dict of np.ndarray
        Each ``(n_subsets,)``: ``entropy`` H(A) in **bits**, ``normalized_entropy`` H / min(m, log2 n)
        (NaN for n = 1), ``distinct_fraction`` K / n, ``saturated`` 1.0 where K >= ceiling * n.

    Examples
    --------
    >>> c = pattern_counts(np.array([[0], [1], [2], [3]], dtype=np.uint8), 2)
    >>> {k: v.tolist() for k, v in subset_measures([c]).items()}
    {'entropy': [2.0], 'normalized_entropy': [1.0], 'distinct_fraction': [1.0], 'saturated': [1.0]}
    """
    rows = []
    for c in counts:
        h = entropy(c)
        h_max = min(float(c.n_units), math.log2(c.n))
        rows.append((h, min(1.0, h / h_max) if h_max > 0 else math.nan, c.k / c.n, float(c.k >= ceiling * c.n)))
    values = np.array(rows, dtype=np.float64).reshape(-1, 4)
    return dict(zip(("entropy", "normalized_entropy", "distinct_fraction", "saturated"), values.T))


def subset_similarity(counts_t: Sequence[PatternCounts], counts_u: Sequence[PatternCounts]) -> dict[str, np.ndarray]:
    """JI and wJI between two time points, subset by subset (the same units and rows at both).

    Returns
    -------
    dict of np.ndarray
        ``jaccard`` and ``weighted_jaccard``, each ``(n_subsets,)`` in ``[0, 1]``.
    """
    if len(counts_t) != len(counts_u):
        raise ValueError(
            f"Expected the same number of subsets at both time points, but got {len(counts_t)} and {len(counts_u)}."
        )
    return {
        "jaccard": np.array([jaccard(a, b) for a, b in zip(counts_t, counts_u)], dtype=np.float64),
        "weighted_jaccard": np.array([weighted_jaccard(a, b) for a, b in zip(counts_t, counts_u)], dtype=np.float64),
    }


class Spread(NamedTuple):
    """Mean and spread of a measure over random subsets."""

    mean: float
    sd: float
    """Sample standard deviation over subsets (``ddof=1``); 0 for a single subset."""


def spread(values) -> Spread:
    """Mean and sample standard deviation of per-subset values (NaN values ignored).

    Examples
    --------
    >>> spread([1.0, 2.0, 3.0])
    Spread(mean=2.0, sd=1.0)
    >>> spread([0.5])
    Spread(mean=0.5, sd=0.0)
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return Spread(math.nan, math.nan)
    return Spread(float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0)


# ---------------------------------------------------------------------------------------------------
# a run
# ---------------------------------------------------------------------------------------------------
def _as_run(run_or_path) -> Run:
    return run_or_path if isinstance(run_or_path, Run) else open_run(run_or_path)


def _fewest_rows(run: Run, site: str, split: str | None) -> int | None:
    """The fewest observations ``site`` has at a step of ``split`` (by the run's index; steps a known loss may
    touch left out, as the table leaves them); None where it has none."""
    return min((n for n in run.step_observations(site, split).values() if n), default=None)


def subset_sizes(runs: Iterable, split: str | None = None) -> tuple[int, int]:
    """Default ``(m, n_obs)`` for comparing sites of one or more runs.

    ``m`` is the narrowest site's width and ``n_obs`` the fewest observations any site has at any
    recorded step of ``split`` (a smaller last batch included), over every site of every run, as the
    runs' indexes count them; steps that a known loss may touch are left out, as the table leaves them.

    Parameters
    ----------
    runs : iterable of Run or path
    split : str, optional
        The recorded split; None means the run's only split (see ``Run.resolve_split``).

    Returns
    -------
    (int, int)

    Raises
    ------
    ValueError
        If no site of any run recorded ``split``.
    """
    widths, rows = [], []
    for run in map(_as_run, runs):
        for site in run.sites:
            n = _fewest_rows(run, site, split)
            if n:
                widths.append(run.site_info(site)["n_units"])
                rows.append(n)
    if not widths:
        raise ValueError(f"Expected at least one site with records in split {split!r}, but found none.")
    return min(widths), min(rows)


def _paired(counts_t: list[PatternCounts], counts_u: list[PatternCounts]) -> tuple[list, list]:
    """The subsets of two steps of one site, paired. A step whose only subset is the whole site (all units, all
    its rows: draw_subsets collapses there while a step with more rows draws several) pairs with each subset of
    the other: all units are every subset's units there too (the collapse needs ``m == n_units``)."""
    if len(counts_t) == 1 and len(counts_u) > 1:
        return counts_t * len(counts_u), counts_u
    if len(counts_u) == 1 and len(counts_t) > 1:
        return counts_t, counts_u * len(counts_t)
    return counts_t, counts_u


def _spread_rows(name: str, values: np.ndarray) -> dict[str, float]:
    s = spread(values)
    return {name: s.mean, f"{name}_sd": s.sd}


def _step_metrics(counts: list[PatternCounts], ceiling: float) -> dict[str, float]:
    out: dict[str, float] = {}
    per_subset = subset_measures(counts, ceiling=ceiling)
    for name in ("entropy", "normalized_entropy", "distinct_fraction"):
        out.update(_spread_rows(f"{name}{SUFFIX}", per_subset[name]))
    out[f"saturated{SUFFIX}"] = float(out[f"distinct_fraction{SUFFIX}"] >= ceiling)
    return out


def _site_rows(
    run: Run, site: str, split: str, *, m: int, n_obs: int, n_subsets: int, seed: int,
    references: tuple, ceiling: float, tick,
) -> list[tuple]:
    info = run.site_info(site)
    n_units, site_index = int(info["n_units"]), int(info["site_index"])
    steps = [int(s) for s in run.steps(site, split)]
    drawn: dict[int, Subsets] = {}

    def counts_at(step: int):
        p = run.read(site, step, split)
        if p.lost_records:
            return None  # an incomplete step has no measures (the reader warned)
        if len(p) < n_obs:
            raise ValueError(
                f"Expected at least n_obs = {n_obs} observations of site {site!r} at every step, but step {step} "
                f"has {len(p)}. Pass a smaller `n_obs`."
            )
        if len(p) not in drawn:
            drawn[len(p)] = draw_subsets(n_units, len(p), m=m, n_obs=n_obs, n_subsets=n_subsets,
                                         seed=(seed, site_index))
        return p, subset_counts(_by_observation(p), n_units, drawn[len(p)])

    at_end = counts_at(steps[-1]) if "final" in references else None
    final = at_end[1] if at_end else None
    init = last = None
    rows: list[tuple] = []
    for step in steps:
        got = at_end if at_end and step == steps[-1] else counts_at(step)
        if got is None:  # an incomplete step: no measures, no `last` for the next step, and no init if first
            last = None
            references = references if init is not None else tuple(r for r in references if r != "init")
            tick()
            continue
        p, cur = got
        metrics = _step_metrics(cur, ceiling)
        init = cur if init is None else init
        for name, ref in (("init", init), ("last", last), ("final", final)):
            if name in references and ref is not None:
                for measure, values in subset_similarity(*_paired(cur, ref)).items():
                    metrics.update(_spread_rows(f"{measure}{SUFFIX}_{name}", values))
        metrics.update({"wc_units": m, "wc_observations": n_obs, "wc_subsets": len(drawn[len(p)])})
        rows.extend((step, int(p.epoch), split, site, site_index, k, float(v)) for k, v in metrics.items())
        last = cur
        tick()
    return rows


def _by_observation(p) -> np.ndarray:
    """The rows' bits in (sample id, position) order where every row has a sample id, else as recorded:
    row subsets then hold the same observations at every step that records the same ones, in any order
    (a repeated id keeps its recorded order)."""
    if len(p) == 0 or (p.sample_ids < 0).any():
        return p.bits
    return p.bits[np.lexsort((p.positions, p.sample_ids))]


def width_controlled_table(
    run_or_path,
    split: str | None = None,
    *,
    m: int | None = None,
    n_obs: int | None = None,
    n_subsets: int = 10,
    seed: int = 0,
    references: Sequence[str] = REFERENCES,
    ceiling: float = 0.9,
    sites: Sequence[str] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Width-controlled measures of every site at every recorded step, as a tidy table.

    Parameters
    ----------
    run_or_path : Run or path
        A :class:`~actpat.recorder.reader.Run` or its directory.
    split : str, optional
        The recorded split; None means the run's only split (see ``Run.resolve_split``). Similarity
        needs the same inputs at every step (the probe protocol).
    m : int, optional
        Units per subset, the same for every site; default the narrowest site's width.
    n_obs : int, optional
        Observations per subset, the same for every site; default the fewest observations any
        site has at its first step (:func:`subset_sizes`). Pass the values of :func:`subset_sizes`
        over several runs to compare runs on one footing.
    n_subsets : int, default 10
        Random subsets per site, averaged.
    seed : int, default 0
        Site ``i``'s subsets (``i`` its ``site_index``) come from ``np.random.default_rng((seed, i))``,
        units drawn before rows: the same units at every step, and the same rows at every step with
        the same number of observations. Rows are taken in (sample id, position) order where sample ids
        are recorded, so that a subset holds the same observations at every step that records the same
        ones (the probe protocol), whatever order each step lists them in.
    references : subset of {"init", "last", "final"}, default all
    ceiling : float, default 0.9
        ``saturated_wc`` flags steps whose mean ``K / n_obs`` over the subsets is at least ``ceiling``
        (the raw flag is summarize's ``saturated``): nearly every pattern is distinct and the entropy sits at ``log2 n``: it cannot rise and a dip cannot show.
    sites : sequence of str, optional
        Sites to measure (default every site with records in ``split``); the defaults of ``m`` and
        ``n_obs`` are taken over these.
    progress : bool, default True
        Show a ``tqdm`` progress bar over the steps.

    Returns
    -------
    pandas.DataFrame
        Columns ``step, epoch, split, site, site_index, metric, value``, concatenable with
        :func:`~actpat.analysis.summarize`'s table. Metrics: ``entropy_wc`` (bits),
        ``normalized_entropy_wc`` (H / min(m, log2 n_obs)), ``distinct_fraction_wc``, per reference
        ``r``: ``jaccard_wc_r``, ``weighted_jaccard_wc_r``, each with its ``_sd`` over subsets;
        ``saturated_wc`` (0/1, on the mean K / n);
        ``wc_units`` (m), ``wc_observations`` (n_obs) and ``wc_subsets``.

    Raises
    ------
    ValueError
        If ``split`` was not recorded, ``m`` exceeds a site's width or ``n_obs`` a step's
        observations.

    Notes
    -----
    With ``m = n_units`` and ``n_obs`` = all observations, ``*_wc`` equals the raw measure exactly and
    its ``_sd`` is 0. Counting is exact (:func:`~actpat.analysis.counts.pattern_counts`).

    Examples
    --------
    >>> import tempfile
    >>> from actpat.recorder.shards import Record, ShardWriter, SiteMeta
    >>> meta = SiteMeta("fc", 0, "ReLU", (2,), 2, "flat")
    >>> with tempfile.TemporaryDirectory() as out:
    ...     writer = ShardWriter(out)
    ...     writer.start()
    ...     for step, rows in ((0, [[1], [1], [2], [3]]), (1, [[1], [2], [2], [3]])):
    ...         _ = writer.put(Record(meta, step, 0, "probe", np.array(rows, dtype=np.uint8), 1, 4, 0))
    ...     writer.close()
    ...     table = width_controlled_table(out, progress=False)
    >>> table.set_index(["step", "metric"]).loc[1, "value"][["entropy_wc", "weighted_jaccard_wc_init"]].tolist()
    [1.5, 0.6]
    """
    run = _as_run(run_or_path)
    split = run.resolve_split(split)
    sites = recorded_sites(run, split, sites)
    references = check_references(references)
    if not 0 < ceiling <= 1:
        raise ValueError(f"Expected `ceiling` to be in (0, 1], but got {ceiling!r}.")
    if m is None:
        m = min(run.site_info(s)["n_units"] for s in sites)
    if n_obs is None:
        n_obs = min((n for s in sites if (n := _fewest_rows(run, s, split))), default=None)
        if n_obs is None:
            raise ValueError(f"Expected a site with observations in split {split!r}, but every step of {sites} has none.")
    for site in sites:
        width = run.site_info(site)["n_units"]
        _check_int("m", m, 1, width, f"the width of site {site!r}, n_units = {width}")
    n_obs = _check_int("n_obs", n_obs, 1)
    total = sum(len(run.steps(s, split)) for s in sites)
    rows: list[tuple] = []
    with tqdm(total=total, disable=not progress, desc=f"actpat width-controlled {split}", unit="step") as bar:
        for site in sites:
            rows.extend(_site_rows(
                run, site, split, m=m, n_obs=n_obs, n_subsets=n_subsets, seed=seed, references=references,
                ceiling=ceiling, tick=lambda: bar.update(1),
            ))
    return tidy_frame(rows)
