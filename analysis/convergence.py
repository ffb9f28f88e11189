"""When each site converges, and how deep its entropy dips: per-site statistics of a metric's time series.

Hartmann et al. (2021) read two findings off their heatmaps: most networks converge **bottom-up**
(lower layers' wJI(final, t) saturates first) and plain CNNs show **intermediate entropy dips**. This
module turns both into numbers with their thresholds as parameters, for any series of the tidy table,
raw (``weighted_jaccard_final``, ``normalized_entropy``) or width-controlled
(``weighted_jaccard_wc_final``, ``normalized_entropy_wc``, see :mod:`actpat.analysis.width`):

- :func:`convergence_step`: the first step at which a series exceeds a threshold (``stay=True``: from
  which on it stays above it);
- :func:`dip`: the depth of a series' minimum below both of its ends (``relative_to="ends"``) or below
  the highest earlier and the highest later value (``relative_to="peaks"``), and where it lies;
- :func:`depth_order`: Spearman's rank correlation between depth and convergence step.

:func:`convergence_table` and :func:`dip_table` apply them to every site (and every run, if the table
has a ``run`` column) of a tidy table.

References
----------
Hartmann, Franzen & Brodehl (2021). Studying the evolution of neural activation patterns during
training of feed-forward ReLU networks. Frontiers in Artificial Intelligence 4.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import pandas as pd

__all__ = ["Dip", "convergence_step", "convergence_table", "depth_order", "dip", "dip_table"]

DIP_KINDS = ("ends", "peaks")
_KEYS = ("group", "run", "split")


def _series(values, steps) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"Expected `values` to be a non-empty 1-D series, but got shape {v.shape}.")
    s = np.arange(v.size) if steps is None else np.asarray(steps)
    if s.shape != v.shape:
        raise ValueError(f"Expected `steps` to have the shape of `values` {v.shape}, but got {s.shape}.")
    if s.size > 1 and not np.all(np.diff(s) > 0):
        raise ValueError("Expected `steps` to be strictly increasing.")
    return v, s


def convergence_step(values, steps=None, *, threshold: float = 0.9, stay: bool = False) -> float:
    """First step at which a series exceeds ``threshold``.

    Parameters
    ----------
    values : array_like
        ``(n_times,)`` series, e.g. wJI(final, t) of one site; NaN counts as not above.
    steps : array_like, optional
        ``(n_times,)`` strictly increasing steps; default ``0 .. n_times - 1``.
    threshold : float, default 0.9
        Converged means ``value > threshold``.
    stay : bool, default False
        ``False``: the first step above the threshold. ``True``: the first step from which every
        later value stays above it (a series that exceeds it early and falls back counts later).

    Returns
    -------
    float
        The step, or NaN if the series never (``stay``: not at its end) exceeds the threshold.

    Notes
    -----
    wJI(final, t) is 1 at the last record by definition, so every site converges there at the latest:
    a site whose step is the last record is *censored*, not converged (see :func:`convergence_table`).

    Examples
    --------
    >>> convergence_step([0.2, 0.95, 0.8, 0.97, 1.0], [0, 10, 20, 30, 40])
    10.0
    >>> convergence_step([0.2, 0.95, 0.8, 0.97, 1.0], [0, 10, 20, 30, 40], stay=True)
    30.0
    >>> convergence_step([0.1, 0.2], threshold=0.5)
    nan
    """
    v, s = _series(values, steps)
    above = v > threshold
    if stay:
        below = np.flatnonzero(~above)
        first = 0 if below.size == 0 else below[-1] + 1
        return float(s[first]) if first < v.size else math.nan
    hits = np.flatnonzero(above)
    return float(s[hits[0]]) if hits.size else math.nan


class Dip(NamedTuple):
    """Depth and position of a series' deepest dip (see :func:`dip`)."""

    depth: float
    """How far the minimum lies below its reference, in the series' unit; 0 when there is no dip."""
    step: float
    """Step of the minimum (NaN when ``depth`` is 0)."""


def _compute_ends(v: np.ndarray) -> np.ndarray:
    return np.full(v.size, min(v[0], v[-1])) - v


def _compute_peaks(v: np.ndarray) -> np.ndarray:
    before = np.maximum.accumulate(v)
    after = np.maximum.accumulate(v[::-1])[::-1]
    return np.minimum(before, after) - v


_DIP = {"ends": _compute_ends, "peaks": _compute_peaks}


def dip(values, steps=None, *, relative_to: str = "ends") -> Dip:
    """Depth of a series' minimum below both ends (or below both neighbouring peaks).

    Parameters
    ----------
    values : array_like
        ``(n_times,)`` series, e.g. a site's normalized entropy; NaN values are left out.
    steps : array_like, optional
        ``(n_times,)`` strictly increasing steps; default ``0 .. n_times - 1``.
    relative_to : {"ends", "peaks"}, default "ends"
        ``"ends"``: ``min(v[0], v[-1]) - min(v)``, how far the lowest value lies below both the first
        and the last value. ``"peaks"``: the largest ``min(max(v[:i+1]), max(v[i:])) - v[i]``, the
        deepest drop below both the highest earlier and the highest later value (catches a dip
        after an initial rise that "ends" misses, since the first value is then the lowest).

    Returns
    -------
    Dip
        ``(depth, step)``; ``depth >= 0`` in the unit of the series (``(0.0, nan)`` for a series that
        only rises, only falls, or has fewer than three values).

    Examples
    --------
    >>> dip([0.9, 0.7, 0.8], [0, 5, 10])
    Dip(depth=0.10000000000000009, step=5.0)
    >>> dip([0.3, 0.9, 0.7, 0.8]).depth, round(dip([0.3, 0.9, 0.7, 0.8], relative_to="peaks").depth, 6)
    (0.0, 0.1)
    """
    if relative_to not in _DIP:
        raise ValueError(f"Expected `relative_to` to be one of {DIP_KINDS}, but got {relative_to!r}.")
    v, s = _series(values, steps)
    keep = ~np.isnan(v)
    v, s = v[keep], s[keep]
    if v.size < 3:
        return Dip(0.0, math.nan)
    drop = _DIP[relative_to](v)
    i = int(np.argmax(drop))
    depth = float(drop[i])
    return Dip(depth, float(s[i])) if depth > 0 else Dip(0.0, math.nan)


def depth_order(steps) -> float:
    """Spearman's rank correlation between depth (position in the sequence) and convergence step.

    Parameters
    ----------
    steps : array_like
        ``(n_sites,)`` convergence steps in forward order; NaN sites are left out.

    Returns
    -------
    float
        In ``[-1, 1]``: 1 for strictly bottom-up convergence, -1 for top-down; NaN when fewer than
        two sites remain or every remaining site converges at the same step (no order).

    Examples
    --------
    >>> depth_order([10, 20, 30, 40]), depth_order([40, 30, 20, 10])
    (1.0, -1.0)
    >>> depth_order([5, 5, 5])
    nan
    """
    s = np.asarray(steps, dtype=np.float64)
    depth = np.arange(s.size, dtype=np.float64)
    keep = ~np.isnan(s)
    s, depth = s[keep], depth[keep]
    if s.size < 2 or np.all(s == s[0]):
        return math.nan
    from scipy.stats import spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(spearmanr(depth, s).statistic)


# ---------------------------------------------------------------------------------------------------
# tidy tables
# ---------------------------------------------------------------------------------------------------
def _rows_of(df: pd.DataFrame, metric: str, split: str | None) -> tuple[pd.DataFrame, list[str]]:
    required = ("step", "epoch", "split", "site", "site_index", "metric", "value")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"Expected a tidy metrics table with columns {list(required)}, but it lacks {missing}.")
    rows = df[df["metric"] == metric]
    if rows.empty:
        raise ValueError(
            f"Expected metric {metric!r} in the table, but it has only {sorted(df['metric'].unique().tolist())}."
        )
    if split is not None:
        rows = rows[rows["split"] == split]
        if rows.empty:
            raise ValueError(f"Expected split {split!r} for metric {metric!r}, but it has none.")
    keys = [k for k in _KEYS if k in rows.columns] + ["site"]
    return rows, keys


def _per_site(df: pd.DataFrame, metric: str, split: str | None, compute) -> pd.DataFrame:
    rows, keys = _rows_of(df, metric, split)
    out = []
    for key, site_rows in rows.groupby(keys, sort=False):
        site_rows = site_rows.sort_values("step", kind="stable")
        if site_rows["step"].duplicated().any():
            raise ValueError(
                f"Expected one value of {metric!r} per step for {dict(zip(keys, key))}, but steps repeat; "
                "pass `split=` or select one run."
            )
        steps = site_rows["step"].to_numpy()
        epochs = site_rows.groupby("step")["epoch"].first()
        record = dict(zip(keys, key))
        record["site_index"] = int(site_rows["site_index"].iloc[0])
        record["metric"] = metric
        record.update(compute(site_rows["value"].to_numpy(dtype=float), steps, epochs))
        out.append(record)
    table = pd.DataFrame(out)
    return table.sort_values([k for k in keys if k != "site"] + ["site_index"], kind="stable").reset_index(drop=True)


def _epoch_at(epochs: pd.Series, step: float) -> float:
    return math.nan if math.isnan(step) else float(epochs.loc[int(step)])


def convergence_table(
    df: pd.DataFrame, metric: str = "weighted_jaccard_final", *, threshold: float = 0.9, stay: bool = False,
    split: str | None = None,
) -> pd.DataFrame:
    """Convergence step of every site (of every run) of a tidy table.

    Parameters
    ----------
    df : pandas.DataFrame
        Tidy metrics table (``step, epoch, split, site, site_index, metric, value``, optionally ``run``
        and ``group``), e.g. from :func:`~actpat.analysis.summarize`,
        :func:`~actpat.analysis.width.width_controlled_table` or :func:`~actpat.analysis.compare.compare`.
    metric : str, default "weighted_jaccard_final"
        The series; ``"weighted_jaccard_wc_final"`` for the width-controlled one.
    threshold, stay
        As for :func:`convergence_step`.
    split : str, optional
        Keep one split.

    Returns
    -------
    pandas.DataFrame
        One row per (``group``, ``run``,) ``split``, ``site``: ``site_index``, ``metric``, ``threshold``,
        ``stay``, ``step`` and ``epoch`` of convergence (NaN if never), ``censored`` (True where the
        site converges only at its last record, i.e. not before the end), ``last_step``.

    Examples
    --------
    >>> df = pd.DataFrame({"step": [0, 5, 10] * 2, "epoch": 0, "split": "probe",
    ...                    "site": ["a"] * 3 + ["b"] * 3, "site_index": [0] * 3 + [1] * 3,
    ...                    "metric": "weighted_jaccard_final", "value": [0.5, 0.95, 1, 0.2, 0.5, 1]})
    >>> convergence_table(df)[["site", "step", "censored"]].to_numpy().tolist()
    [['a', 5.0, False], ['b', 10.0, True]]
    """

    def compute(values, steps, epochs):
        step = convergence_step(values, steps, threshold=threshold, stay=stay)
        return {
            "threshold": threshold, "stay": stay, "step": step, "epoch": _epoch_at(epochs, step),
            "censored": bool(step == steps[-1]), "last_step": int(steps[-1]),
        }

    return _per_site(df, metric, split, compute)


def dip_table(
    df: pd.DataFrame, metric: str = "normalized_entropy", *, relative_to: str = "ends", split: str | None = None,
) -> pd.DataFrame:
    """Deepest dip of every site (of every run) of a tidy table.

    Parameters
    ----------
    df : pandas.DataFrame
        Tidy metrics table, as for :func:`convergence_table`.
    metric : str, default "normalized_entropy"
        The series; ``"normalized_entropy_wc"`` for the width-controlled one.
    relative_to : {"ends", "peaks"}, default "ends"
        As for :func:`dip`.
    split : str, optional

    Returns
    -------
    pandas.DataFrame
        One row per (``group``, ``run``,) ``split``, ``site``: ``site_index``, ``metric``,
        ``relative_to``, ``depth`` (in the metric's unit), ``step`` and ``epoch`` of the minimum.
    """
    if relative_to not in DIP_KINDS:
        raise ValueError(f"Expected `relative_to` to be one of {DIP_KINDS}, but got {relative_to!r}.")

    def compute(values, steps, epochs):
        d = dip(values, steps, relative_to=relative_to)
        return {"relative_to": relative_to, "depth": d.depth, "step": d.step, "epoch": _epoch_at(epochs, d.step)}

    return _per_site(df, metric, split, compute)
