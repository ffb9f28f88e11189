"""Linear regions: the whole on/off pattern of a network, from shards and exactly along line segments.

For a network whose nonlinearities are ReLU-family units between affine layers (convolutions, linear
layers, BatchNorm in eval mode, average pooling, residual sums), the concatenation of every unit's
on/off state in one forward identifies the linear region the input lies in: inside a region the
network is one affine map. Two views:

- **From shards** (:func:`region_table`): the region of a probe sample is the concatenation of its
  ``flat`` patterns over all sites of one forward (a ``channel`` record gives the same bits, reordered:
  a fixed permutation identifies the same regions). Per step: distinct regions of the probe set, their
  entropy, the fraction of samples alone in their region, the distinct regions visited so far, and
  the fraction of samples whose region is unchanged since ``init``, ``last`` and ``final``.
- **From a model** (:func:`segment_regions`, :func:`pair_region_changes`): the number of region
  changes along a line segment between two inputs, computed exactly by walking the segment from
  breakpoint to breakpoint, as counted by Hanin & Rolnick (2019) along lines between data points.
  The network enters as a callable that returns all pre-activations of a batch of points, so this
  module needs no torch: ``actpat.recorder.regions.preactivation_fn`` builds it from an ``nn.Module``.

References
----------
Hanin, B. & Rolnick, D. (2019). Complexity of linear regions in deep networks. ICML.
Hartmann, Franzen & Brodehl (2021). Studying the evolution of neural activation patterns during
training of feed-forward ReLU networks. Frontiers in Artificial Intelligence 4.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, NamedTuple, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from actpat.analysis._validation import check_bits, why_not_whole_samples
from actpat.analysis.counts import PatternCounts, pattern_counts
from actpat.analysis.entropy import entropy
from actpat.analysis.metrics import REFERENCES
from actpat.analysis.similarity import stability
from actpat.analysis.tables import check_references, recorded_sites, tidy_frame
from actpat.recorder.reader import Patterns, Run, open_run

__all__ = [
    "NETWORK_SITE",
    "PairRegions",
    "SegmentRegions",
    "pair_region_changes",
    "region_bits",
    "region_measures",
    "region_table",
    "sample_patterns",
    "segment_regions",
    "segment_table",
]

log = logging.getLogger(__name__)

#: ``site`` of the network-level rows in tidy tables (a region spans every site).
NETWORK_SITE = "(all sites)"


# ---------------------------------------------------------------------------------------------------
# regions from recorded patterns
# ---------------------------------------------------------------------------------------------------
def sample_patterns(bits, n_units: int, sample_ids, positions) -> tuple[np.ndarray, np.ndarray, int]:
    """Every sample's whole pattern at one site: its rows over all spatial positions, concatenated.

    Parameters
    ----------
    bits : array_like
        ``(n, ceil(n_units / 8))`` uint8 packed rows of one site at one step (SPEC section 2).
    n_units : int
        Bits per row.
    sample_ids : array_like
        ``(n,)`` int64 sample of each row; all ``-1`` (unknown): rows are taken as sample-major in
        recording order.
    positions : array_like
        ``(n,)`` int64 spatial position of each row (0 for dense layers and ``flat`` records).

    Returns
    -------
    ids : np.ndarray
        ``(n_samples,)`` int64, ascending sample ids (``0 .. n_samples - 1`` in recording order when
        unknown).
    packed : np.ndarray
        ``(n_samples, ceil(P * n_units / 8))`` uint8, the ``P * n_units`` bits of each sample,
        position-major (a fixed permutation of the ``flat`` order: the same patterns are equal).
    n_bits : int
        ``P * n_units``.

    Raises
    ------
    ValueError
        If some sample lacks a position or has one twice (subsampled records hold no whole pattern).

    Examples
    --------
    >>> bits = np.array([[1], [2], [3], [0]], dtype=np.uint8)   # 2 samples x 2 positions of 2 units
    >>> ids, packed, n_bits = sample_patterns(bits, 2, np.array([7, 7, 5, 5]), np.array([0, 1, 0, 1]))
    >>> ids.tolist(), packed.ravel().tolist(), n_bits
    ([5, 7], [3, 9], 4)
    """
    bits = check_bits(bits, n_units, allow_empty=True)
    sample_ids = np.asarray(sample_ids, dtype=np.int64)
    positions = np.asarray(positions, dtype=np.int64)
    n = bits.shape[0]
    if sample_ids.shape != (n,) or positions.shape != (n,):
        raise ValueError(
            f"Expected `sample_ids` and `positions` of shape ({n},), but got {sample_ids.shape} and {positions.shape}."
        )
    n_pos = int(positions.max(initial=0)) + 1
    if n % n_pos:
        raise ValueError(
            f"Expected every sample to have all {n_pos} positions, but {n} rows are not a multiple of {n_pos}: "
            f"{why_not_whole_samples(sample_ids, positions)}; no sample's whole pattern is known."
        )
    if (sample_ids < 0).any():
        if not (sample_ids < 0).all():
            raise ValueError("Expected sample ids for all rows or for none, but some rows have -1 and others not.")
        sample_ids = np.arange(n, dtype=np.int64) // n_pos
    order = np.lexsort((positions, sample_ids))
    ids, pos = sample_ids[order].reshape(-1, n_pos), positions[order].reshape(-1, n_pos)
    if not (np.all(ids == ids[:, :1]) and np.all(pos == np.arange(n_pos)) and np.all(np.diff(ids[:, 0]) > 0)):
        raise ValueError(
            f"Expected each sample to have every position 0..{n_pos - 1} exactly once, but the rows do not: "
            f"{why_not_whole_samples(sample_ids, positions)}; no sample's whole pattern is known."
        )
    unpacked = np.unpackbits(bits[order], axis=1, count=n_units, bitorder="little")
    packed = np.packbits(unpacked.reshape(ids.shape[0], n_pos * n_units), axis=1, bitorder="little")
    return ids[:, 0].copy(), packed, n_pos * n_units


def region_bits(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the per-site sample patterns of one forward into one region pattern per sample.

    Parameters
    ----------
    parts : sequence of (ids, packed)
        For each site, the output of :func:`sample_patterns` (``ids`` ascending).

    Returns
    -------
    ids : np.ndarray
        ``(n_samples,)`` the common sample ids.
    packed : np.ndarray
        ``(n_samples, total_bytes)`` uint8, each site's packed bytes side by side. Padding bits are
        zero, so two samples have equal rows iff every site's pattern is equal: read the rows with
        ``n_units = 8 * total_bytes``.

    Raises
    ------
    ValueError
        If the sites saw different samples.
    """
    if not parts:
        raise ValueError("Expected at least one site, but got none.")
    ids = parts[0][0]
    for i, (other, _) in enumerate(parts[1:], start=1):
        if not np.array_equal(other, ids):
            raise ValueError(
                f"Expected every site to hold the same samples, but site {i} has {other.size} samples against "
                f"{ids.size} of site 0 (or other ids): a region needs every site of one forward."
            )
    return ids, np.ascontiguousarray(np.concatenate([packed for _, packed in parts], axis=1))


def region_measures(packed) -> tuple[PatternCounts, dict[str, float]]:
    """Distinct regions, region entropy and the fraction of samples alone in their region.

    Parameters
    ----------
    packed : array_like
        ``(n_samples, n_bytes)`` uint8 region patterns (:func:`region_bits`).

    Returns
    -------
    counts : PatternCounts
        Exact counts of the regions (over ``8 * n_bytes`` bits).
    measures : dict
        ``region_distinct`` (K), ``region_entropy`` (**bits**, plug-in, at most log2 n_samples),
        ``region_alone_fraction`` (samples that share their region with no other sample, / n).

    Examples
    --------
    >>> c, m = region_measures(np.array([[1, 0], [1, 0], [2, 0], [3, 1]], dtype=np.uint8))
    >>> m
    {'region_distinct': 3, 'region_entropy': 1.5, 'region_alone_fraction': 0.5}
    """
    packed = np.asarray(packed)
    counts = pattern_counts(packed, 8 * packed.shape[1] if packed.ndim == 2 else 0)
    return counts, {
        "region_distinct": counts.k,
        "region_entropy": entropy(counts),
        "region_alone_fraction": int(np.count_nonzero(counts.counts == 1)) / counts.n,
    }


def _regions_at(run: Run, sites: list[str], step: int, split: str) -> tuple[int, np.ndarray, np.ndarray, int] | None:
    """``(epoch, ids, region patterns, bits per region)`` of one step; None where a site's records of the
    step were lost (the reader warned): its regions are unknown."""
    parts, epoch, total = [], -1, 0
    for site in sites:
        p: Patterns = run.read(site, step, split)
        if p.lost_records:
            return None
        epoch = int(p.epoch)
        try:
            ids, packed, n_bits = sample_patterns(p.bits, p.n_units, p.sample_ids, p.positions)
        except ValueError as exc:
            raise ValueError(f"Site {site!r}, step {step}: {exc}") from None
        parts.append((ids, packed))
        total += n_bits
    try:
        ids, packed = region_bits(parts)
    except ValueError as exc:
        raise ValueError(f"Step {step}: {exc}") from None
    return epoch, ids, packed, total


def region_table(
    run_or_path,
    split: str | None = None,
    *,
    sites: Sequence[str] | None = None,
    references: Sequence[str] = REFERENCES,
    progress: bool = True,
) -> pd.DataFrame:
    """Linear-region measures of the probe set at every step recorded at every site, as a tidy table.

    Parameters
    ----------
    run_or_path : Run or path
    split : str, optional
        The recorded split; None means the run's only split (see ``Run.resolve_split``). The probe
        protocol: every site records the same samples at each step.
    sites : sequence of str, optional
        Sites whose patterns make up the region; default every site recorded in ``split``. Regions
        are linear regions only when these are all the nonlinear sites of the network.
    references : subset of {"init", "last", "final"}, default all
        Time points for ``region_identical_<r>``.
    progress : bool, default True

    Returns
    -------
    pandas.DataFrame
        Columns ``step, epoch, split, site, site_index, metric, value`` with ``site`` =
        :data:`NETWORK_SITE` and ``site_index`` = -1 (not a site). Metrics: ``region_distinct``, ``region_entropy`` (bits), ``region_alone_fraction``,
        ``region_visited`` (distinct regions visited by the probe set up to this step),
        ``region_identical_<r>`` (fraction of samples in the same region at this step and at ``r``)
        and ``region_units`` (bits of a region pattern).

    Raises
    ------
    ValueError
        If ``split`` is missing, a site is unknown, the sites hold different samples at a step, or a
        record is subsampled (no sample's whole pattern is known).

    Notes
    -----
    Steps not recorded at every chosen site are skipped with a warning. Memory: one step's region
    patterns of ``init``, ``last``, ``final`` and the current step, plus the distinct regions visited
    so far (at most ``n_samples`` per step).
    """
    run = run_or_path if isinstance(run_or_path, Run) else open_run(run_or_path)
    split = run.resolve_split(split)
    chosen = recorded_sites(run, split, sites)
    references = check_references(references)
    per_site = [set(run.steps(s, split).tolist()) for s in chosen]
    steps = sorted(set.intersection(*per_site))
    skipped = sorted(set.union(*per_site) - set(steps))
    if skipped:
        log.warning("actpat: %d steps are not recorded at every site and have no region (first: %s).",
                    len(skipped), skipped[:5])
    final = _regions_at(run, chosen, steps[-1], split) if "final" in references and steps else None
    init = last = None
    visited: PatternCounts | None = None
    rows: list[tuple] = []
    for step in tqdm(steps, disable=not progress, desc=f"actpat regions {split}", unit="step"):
        regions = final if final is not None and step == steps[-1] else _regions_at(run, chosen, step, split)
        if regions is None:  # an incomplete step: no measures, no `last` for the next step, and no init if first
            last = None
            references = references if init is not None else tuple(r for r in references if r != "init")
            continue
        epoch, ids, packed, n_bits = regions
        counts, metrics = region_measures(packed)
        visited = counts if visited is None else visited + counts
        metrics["region_visited"] = visited.k
        init = (epoch, ids, packed, n_bits) if init is None else init
        for name, ref in (("init", init), ("last", last), ("final", final)):
            if name in references and ref is not None:
                if not np.array_equal(ref[1], ids):
                    raise ValueError(
                        f"Expected the same probe samples at every step, but step {step} and its {name!r} reference "
                        "differ: region stability needs the probe protocol."
                    )
                s = stability(packed, ref[2], 8 * packed.shape[1], validate_args=False)
                metrics[f"region_identical_{name}"] = s.identical_fraction
        metrics["region_units"] = n_bits
        rows.extend((step, epoch, split, NETWORK_SITE, -1, k, float(v)) for k, v in metrics.items())
        last = (epoch, ids, packed, n_bits)
    return tidy_frame(rows)


# ---------------------------------------------------------------------------------------------------
# exact region changes along a segment
# ---------------------------------------------------------------------------------------------------
class SegmentRegions(NamedTuple):
    """Region changes along one segment (see :func:`segment_regions`)."""

    breakpoints: np.ndarray
    """``(changes,)`` ascending positions ``t`` in ``(0, 1)`` where the region changes."""
    changes: int
    """Number of region changes: the segment crosses ``changes + 1`` regions."""
    length: float
    """Euclidean length of the segment, in input units."""


def _preacts_at(preacts: Callable, a: np.ndarray, d: np.ndarray, ts: np.ndarray, n_units: int | None) -> np.ndarray:
    z = np.asarray(preacts(a[None, :] + ts[:, None] * d[None, :]), dtype=np.float64)
    if z.ndim != 2 or z.shape[0] != ts.size or (n_units is not None and z.shape[1] != n_units):
        raise ValueError(
            f"Expected `preacts` to return an array of shape (m, n_units) = ({ts.size}, {n_units or 'n_units'}) "
            f"for m = {ts.size} points, but got shape {z.shape}."
        )
    return z


def segment_regions(
    preacts: Callable[[np.ndarray], np.ndarray], a, b, *, resolution: float = 1e-9, max_changes: int = 1_000_000,
) -> SegmentRegions:
    """Exact region changes of a piecewise-linear network along the segment from ``a`` to ``b``.

    Parameters
    ----------
    preacts : callable
        ``preacts(points)`` with ``points`` of shape ``(m, d)`` returns the ``(m, n_units)``
        pre-activations of every unit of every site (float64 for exactness). The network must be
        continuous and piecewise linear with kinks only where a returned unit crosses zero (ReLU,
        leaky ReLU, PReLU between affine layers; not ReLU6, max-pooling or BatchNorm in train mode).
    a, b : array_like
        ``(d,)`` end points (flattened inputs).
    resolution : float, default 1e-9
        Breakpoints closer than this (in units of the segment, ``t`` in [0, 1]) are counted once; the
        walk steps this far past each breakpoint.
    max_changes : int, default 1_000_000
        Stop with an error beyond this many changes.

    Returns
    -------
    SegmentRegions
        ``(breakpoints, changes, length)``.

    Notes
    -----
    Walk from ``t = 0``. Along the segment every pre-activation is continuous and piecewise linear,
    and a unit's slope changes only where a unit upstream of it changes sign. So if the pattern at
    ``t`` equals the pattern at ``t + h``, no unit changes sign in between (by induction over the
    units in forward order, each is affine there and has the same sign at both ends): ``[t, t + h]``
    lies in one region, and ``(z(t + h) - z(t)) / h`` is the exact slope of that region's affine map.
    The next breakpoint is the first zero crossing of that map, ``min_j t - z_j / s_j`` over units
    moving towards zero; the walk steps ``resolution`` past it and repeats. Each step costs one call of
    ``preacts`` on at most 7 points: ``t``, the end of the segment, and steps around the previous gap
    down to ``resolution / 2`` (the largest with an unchanged pattern gives the slope). A predicted
    crossing after which no unit has changed sign (a unit touching zero) is not counted, just as a
    dense sweep would not see it.

    References
    ----------
    Hanin, B. & Rolnick, D. (2019). Complexity of linear regions in deep networks. ICML.

    Examples
    --------
    >>> w = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> preacts = lambda x: x @ w.T - 0.5                        # three lines, one layer
    >>> r = segment_regions(preacts, [0.0, 0.0], [1.0, 2.0])
    >>> r.changes, np.round(r.breakpoints, 6).tolist()
    (3, [0.166667, 0.25, 0.5])
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"Expected `a` and `b` of the same shape, but got {a.shape} and {b.shape}.")
    if not 0 < resolution < 1e-3:
        raise ValueError(f"Expected `resolution` to be in (0, 1e-3), but got {resolution!r}.")
    d = b - a
    length = float(np.linalg.norm(d))
    if length == 0:
        return SegmentRegions(np.zeros(0), 0, 0.0)
    t, n_units, gap = 0.0, None, 1.0 / 64
    breakpoints: list[float] = []
    pending, left = None, None  # a predicted breakpoint, and the pattern of the region before it
    while True:
        # One call per step: the current point, the rest of the segment, and steps around the last gap.
        rest = 1.0 - t
        hs = np.unique(np.minimum(rest, [rest, 4 * gap, gap, gap / 16, gap / 256, resolution / 2]))[::-1]
        z = _preacts_at(preacts, a, d, np.concatenate([[t], t + hs]), n_units)
        n_units = z.shape[1]
        on = z > 0
        if pending is not None:
            if np.any(on[0] != left):  # a unit did change sign: a region change, not a touch of zero
                _append(breakpoints, pending, max_changes)
            pending = None
        same = np.all(on[1:] == on[0], axis=1)
        if same[0]:
            break  # one region from t to the end
        if not same.any():
            t_next = t + hs[-1]  # another breakpoint within the resolution: counted once
        else:
            k = int(np.argmax(same))  # largest step inside the current region (hs descends)
            s = (z[1 + k] - z[0]) / hs[k]
            z0 = z[0]
            with np.errstate(divide="ignore", invalid="ignore"):
                cross = np.where((z0 > 0) & (s < 0) | (z0 <= 0) & (s > 0), t - z0 / s, np.inf)
            # The crossing lies between the step that stayed and the next larger one that did not.
            t_next = float(min(max(cross.min(), t + hs[k]), t + hs[k - 1]))
        gap = max(t_next - t, resolution)
        if t_next + resolution >= 1.0:
            _append(breakpoints, t_next, max_changes)  # the pattern at the end differs: confirmed
            break
        pending, left, t = t_next, on[0], t_next + resolution
    return SegmentRegions(np.array(breakpoints, dtype=np.float64), len(breakpoints), length)


def _append(breakpoints: list, t: float, max_changes: int) -> None:
    breakpoints.append(t)
    if len(breakpoints) > max_changes:
        raise ValueError(
            f"Expected at most max_changes = {max_changes} region changes, but the segment has more; raise "
            "`max_changes` or shorten the segment."
        )


class PairRegions(NamedTuple):
    """Region changes along segments between random pairs of samples (see :func:`pair_region_changes`)."""

    pairs: np.ndarray
    """``(n_pairs, 2)`` int64 indices into the samples."""
    changes: np.ndarray
    """``(n_pairs,)`` int64 region changes along each segment."""
    lengths: np.ndarray
    """``(n_pairs,)`` float64 Euclidean length of each segment."""


def pair_region_changes(
    preacts: Callable[[np.ndarray], np.ndarray], x, *, n_pairs: int = 100, seed: int = 0,
    resolution: float = 1e-9, progress: bool = True,
) -> PairRegions:
    """Exact region changes along segments between random pairs of samples (Hanin & Rolnick 2019).

    Parameters
    ----------
    preacts : callable
        As for :func:`segment_regions`.
    x : array_like
        ``(n, ...)`` samples (e.g. the probe set); each is flattened to ``(d,)``.
    n_pairs : int, default 100
        Pairs of two different samples, drawn with ``np.random.default_rng(seed)``.
    seed : int, default 0
    resolution : float, default 1e-9
    progress : bool, default True
        Show a ``tqdm`` progress bar over the pairs.

    Returns
    -------
    PairRegions
        Divide ``changes`` by ``lengths`` for the density of region boundaries per unit of input
        distance.
    """
    x = np.asarray(x, dtype=np.float64)
    x = x.reshape(x.shape[0], -1)
    if x.shape[0] < 2:
        raise ValueError(f"Expected at least 2 samples to pair, but got {x.shape[0]}.")
    if isinstance(n_pairs, bool) or not isinstance(n_pairs, (int, np.integer)) or n_pairs < 1:
        raise ValueError(f"Expected `n_pairs` to be a positive int, but got {n_pairs!r}.")
    rng = np.random.default_rng(seed)
    pairs = np.array([rng.choice(x.shape[0], 2, replace=False) for _ in range(n_pairs)], dtype=np.int64)
    changes = np.zeros(n_pairs, dtype=np.int64)
    lengths = np.zeros(n_pairs, dtype=np.float64)
    for i in tqdm(range(n_pairs), disable=not progress, desc="actpat region changes", unit="segment"):
        r = segment_regions(preacts, x[pairs[i, 0]], x[pairs[i, 1]], resolution=resolution)
        changes[i], lengths[i] = r.changes, r.length
    return PairRegions(pairs, changes, lengths)


def segment_table(results: PairRegions, *, step: int, epoch: int = -1, split: str = "probe") -> pd.DataFrame:
    """Tidy rows of :func:`pair_region_changes` at one step, concatenable with the other tables.

    Returns
    -------
    pandas.DataFrame
        Metrics ``segment_region_changes`` (mean over pairs), ``segment_region_changes_sd`` (sample
        standard deviation over pairs) and ``segment_region_density`` (total changes / total length,
        per unit of input distance), ``site`` = :data:`NETWORK_SITE`, ``site_index`` = -1.

    Examples
    --------
    >>> r = PairRegions(np.array([[0, 1], [1, 2]]), np.array([3, 5]), np.array([1.0, 3.0]))
    >>> segment_table(r, step=10)["value"].tolist()
    [4.0, 1.4142135623730951, 2.0]
    """
    changes = np.asarray(results.changes, dtype=np.float64)
    values = {
        "segment_region_changes": float(changes.mean()),
        "segment_region_changes_sd": float(changes.std(ddof=1)) if changes.size > 1 else 0.0,
        "segment_region_density": float(changes.sum() / results.lengths.sum()) if results.lengths.sum() > 0 else math.nan,
    }
    return tidy_frame((int(step), int(epoch), split, NETWORK_SITE, -1, k, v) for k, v in values.items())
