"""Compare runs: architectures, initializations, seeds, with the spread over seeds stated.

One run per figure cannot say whether a difference is real. :func:`compare` summarizes several runs
into one tidy table with a ``run`` and a ``group`` column (the seeds of one configuration share a
group); :func:`heatmaps` draws any metric of every run side by side on one colour scale;
:func:`band_curves` draws each site's curve per group as the mean over runs with a band (min-max or a
bootstrap interval of the mean, stated on the figure); :func:`convergence` and :func:`summary` give
each site's convergence step per run and its spread per group; :func:`report` writes all of it to a
folder (the ``actpat compare`` command).

The width-controlled measures (:mod:`actpat.analysis.width`) are computed with one ``m`` and one
``n_obs`` for every site of every run, so sites and runs are compared on one footing.

References
----------
Hartmann, Franzen & Brodehl (2021). Studying the evolution of neural activation patterns during
training of feed-forward ReLU networks. Frontiers in Artificial Intelligence 4.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd

from actpat.analysis import metrics as registry
from actpat.analysis.convergence import convergence_table, depth_order, dip_table
from actpat.analysis.regions import region_table
from actpat.analysis.summarize import summarize
from actpat.analysis.width import subset_sizes, width_controlled_table
from actpat.recorder.reader import Run, open_run

__all__ = [
    "BANDS",
    "PARTIAL_GID",
    "RunSpec",
    "band",
    "band_curves",
    "common_split",
    "compare",
    "convergence",
    "dips",
    "heatmaps",
    "parse_runs",
    "report",
    "split_run_spec",
    "summary",
]

log = logging.getLogger(__name__)

#: Bands of :func:`band_curves`.
BANDS = ("minmax", "bootstrap")
#: ``gid`` of :func:`band_curves`' markers of a group's mean at steps that only some of its runs recorded.
PARTIAL_GID = "partial"


class RunSpec(NamedTuple):
    """One run of a comparison."""

    run: str
    """Unique name: the group's name, or ``<group>/<k>`` when the group has several runs."""
    group: str
    """Configuration the run belongs to (its seeds share it)."""
    path: Path
    """Run directory."""
    opened: Run | None = None
    """The run, where it was opened before (for checks made before the comparison); else read from ``path``."""


def split_run_spec(item) -> tuple[str | None, Path]:
    """``(group, directory)`` of one run as :func:`parse_runs` takes it: a ``(group, dir)`` pair, or a string
    that is an existing path (its own group: None) or else ``GROUP=DIR`` split at its first ``=`` (so that a
    directory may hold ``=``, as sweep folders like ``lr=0.1/seed=0`` do)."""
    if isinstance(item, tuple):
        if len(item) != 2:
            raise ValueError(f"Expected a run as (group, directory), but got {item!r}.")
        return str(item[0]), Path(item[1])
    if isinstance(item, (str, os.PathLike)):
        text = os.fspath(item)
        if isinstance(item, str) and "=" in text and not Path(text).exists():
            group, _, path = text.partition("=")
            if not group or not path:
                raise ValueError(f"Expected a run as DIR or GROUP=DIR, but got {text!r}.")
            return group, Path(path)
        return None, Path(text)
    raise ValueError(f"Expected a run directory, GROUP=DIR or (group, directory), but got {item!r}.")


def parse_runs(runs) -> list[RunSpec]:
    """Name and group the runs of a comparison.

    Parameters
    ----------
    runs : mapping or sequence
        ``{group: dir or [dirs]}``; or a sequence of run directories, ``"GROUP=DIR"`` strings or
        ``(group, dir)`` pairs (a bare directory is its own group, named as given). Several
        directories of one group are its seeds. A list of :class:`RunSpec` is returned as it is.

    Returns
    -------
    list of RunSpec
        In the given order; run names are the group's name for a group of one run, else
        ``<group>/0``, ``<group>/1``, ... in the given order.

    Raises
    ------
    ValueError
        If no run is given, a directory is given twice or a spec is malformed.

    Examples
    --------
    >>> [tuple(r)[:2] for r in parse_runs(["resnet=a", "resnet=b", "plain=c"])]
    [('resnet/0', 'resnet'), ('resnet/1', 'resnet'), ('plain', 'plain')]
    >>> [tuple(r)[:2] for r in parse_runs({"fixup": ["d"]})]
    [('fixup', 'fixup')]
    """
    if isinstance(runs, (list, tuple)) and runs and all(isinstance(r, RunSpec) for r in runs):
        return list(runs)
    if isinstance(runs, Mapping):
        items = [
            (str(group), Path(path))
            for group, paths in runs.items()
            for path in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)
        ]
    elif isinstance(runs, (str, os.PathLike)):
        items = [split_run_spec(runs)]
    else:
        items = [split_run_spec(item) for item in runs]
    if not items:
        raise ValueError("Expected at least one run to compare, but got none.")
    items = [(os.fspath(path) if group is None else group, path) for group, path in items]
    paths = Counter(os.path.abspath(path) for _, path in items)
    twice = [path for path, n in paths.items() if n > 1]
    if twice:
        raise ValueError(f"Expected every run directory once, but got {twice} more than once.")
    sizes = Counter(group for group, _ in items)
    seen: Counter = Counter()
    specs = []
    for group, path in items:
        name = group if sizes[group] == 1 else f"{group}/{seen[group]}"
        seen[group] += 1
        specs.append(RunSpec(name, group, path))
    return specs


def compare(
    runs,
    *,
    split: str | None = None,
    width_controlled: bool = True,
    regions: bool = False,
    m: int | None = None,
    n_obs: int | None = None,
    n_subsets: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Every measure of every run, as one tidy table with ``run`` and ``group`` columns.

    Parameters
    ----------
    runs : mapping or sequence
        As for :func:`parse_runs`: ``{group: [dirs]}``, or directories / ``"GROUP=DIR"`` strings.
    split : str, optional
        The recorded split; None means the run's only split (see ``Run.resolve_split``).
    width_controlled : bool, default True
        Add the width-controlled measures (:func:`~actpat.analysis.width.width_controlled_table`)
        with one ``m`` and ``n_obs`` for every site of every run.
    regions : bool, default False
        Add the linear-region measures of the probe set (:func:`~actpat.analysis.regions.region_table`).
    m, n_obs : int, optional
        Units and observations per subset; default the narrowest site's width and the fewest
        observations of any site, over all runs (:func:`~actpat.analysis.width.subset_sizes`).
    n_subsets, seed : int
        Subsets per site and the seed of their generator (the same for every run, so every run of
        one architecture uses the same units).
    progress : bool, default True

    Returns
    -------
    pandas.DataFrame
        Columns ``run, group, step, epoch, split, site, site_index, metric, value``; per run the rows
        of :func:`~actpat.analysis.summarize` followed by the width-controlled and region rows.
    """
    specs = parse_runs(runs)
    opened = [open_run(spec.path) if spec.opened is None else spec.opened for spec in specs]
    split = common_split(opened, split)
    if width_controlled and (m is None or n_obs is None):
        default_m, default_n = subset_sizes(opened, split)
        m = default_m if m is None else m
        n_obs = default_n if n_obs is None else n_obs
    tables = []
    for spec, run in zip(specs, opened):
        parts = [summarize(run, split=split, progress=progress)]
        if width_controlled:
            parts.append(width_controlled_table(run, split, m=m, n_obs=n_obs, n_subsets=n_subsets, seed=seed,
                                                progress=progress))
        if regions:
            parts.append(region_table(run, split, progress=progress))
        table = pd.concat(parts, ignore_index=True)
        table.insert(0, "group", spec.group)
        table.insert(0, "run", spec.run)
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def common_split(runs: Sequence[Run], split: str | None = None, *, name: str = "`split`") -> str:
    """The split every run is compared in: ``split``, or the runs' only split, which must be the same in every run.

    ``name`` is what messages call the argument (the command line says ``--split``).

    Raises
    ------
    ValueError
        No run, a run lacks ``split`` or has several splits (``split`` None), or the runs' only splits differ.
    """
    if not runs:
        raise ValueError("Expected at least one run to find the split of, but got none.")
    resolved = {}
    for run in runs:
        try:
            resolved[run.path] = run.resolve_split(split, name=name)
        except ValueError as exc:
            raise ValueError(f"Run {run.path}: {exc}") from None
    if len(set(resolved.values())) > 1:
        listed = ", ".join(f"{path} only {kind!r}" for path, kind in resolved.items())
        raise ValueError(
            f"Expected runs recorded in one split, but their only splits differ ({listed}): a comparison would mix "
            "them, each measure in two splits. Compare runs that hold the same split (probes with probes)."
        )
    return next(iter(resolved.values()))


# ---------------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------------
def _check_compared(df: pd.DataFrame) -> None:
    missing = [c for c in ("run", "group") if c not in df.columns]
    if missing:
        raise ValueError(f"Expected a table from compare() with columns 'run' and 'group', but it lacks {missing}.")


def convergence(
    df: pd.DataFrame, metric: str = "weighted_jaccard_final", *, threshold: float = 0.9, stay: bool = False,
    split: str | None = None,
) -> pd.DataFrame:
    """Convergence step of every site of every run (:func:`~actpat.analysis.convergence.convergence_table`).

    ``metric="weighted_jaccard_wc_final"`` gives the width-controlled step.
    """
    _check_compared(df)
    return convergence_table(df, metric, threshold=threshold, stay=stay, split=split)


def dips(df: pd.DataFrame, metric: str = "normalized_entropy", *, relative_to: str = "ends",
         split: str | None = None) -> pd.DataFrame:
    """Deepest dip of every site of every run (:func:`~actpat.analysis.convergence.dip_table`)."""
    _check_compared(df)
    return dip_table(df, metric, relative_to=relative_to, split=split)


def _spread(values: pd.Series, prefix: str) -> dict:
    v = values.dropna().to_numpy(dtype=float)
    return {
        f"{prefix}_mean": float(v.mean()) if v.size else math.nan,
        f"{prefix}_sd": float(v.std(ddof=1)) if v.size > 1 else math.nan,  # one run: no spread to tell
        f"{prefix}_min": float(v.min()) if v.size else math.nan,
        f"{prefix}_max": float(v.max()) if v.size else math.nan,
    }


def summary(per_site: pd.DataFrame, value: str = "step") -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Spread over the runs of each group, per site and per run.

    Parameters
    ----------
    per_site : pandas.DataFrame
        :func:`convergence` (``value="step"``) or :func:`dips` (``value="depth"``) of a comparison.
    value : str, default "step"

    Returns
    -------
    by_site : pandas.DataFrame
        Per ``group, site``: ``site_index``, ``n_runs``, ``<value>_mean, _sd, _min, _max`` over runs
        (``_sd``: sample standard deviation, NaN for one run) and, for convergence, ``n_censored``.
    by_run : pandas.DataFrame
        Per ``group, run``: for convergence, ``rho`` (Spearman's rank correlation between depth and
        convergence step: 1 = bottom-up; censored sites count at their last record, as ties) and
        ``spread`` (latest minus earliest site's step); for dips, ``depth`` and ``site`` of the
        deepest dip (``site`` None where no site dips: every depth 0 or NaN).
    by_group : pandas.DataFrame
        Per ``group``: ``n_runs`` and the mean, sd, min and max over runs of each ``by_run`` number.
    """
    _check_compared(per_site)
    if value not in per_site.columns:
        raise ValueError(f"Expected column {value!r} in the table, but it has {list(per_site.columns)}.")
    site_rows = []
    for (group, site), rows in per_site.groupby(["group", "site"], sort=False):
        record = {"group": group, "site": site, "site_index": int(rows["site_index"].iloc[0]),
                  "n_runs": int(rows["run"].nunique())}
        record.update(_spread(rows[value], value))
        if "censored" in rows.columns:
            record["n_censored"] = int(rows["censored"].sum())
        site_rows.append(record)
    by_site = pd.DataFrame(site_rows).sort_values(["group", "site_index"], kind="stable").reset_index(drop=True)
    run_rows = []
    for (group, run), rows in per_site.groupby(["group", "run"], sort=False):
        rows = rows.sort_values("site_index", kind="stable")
        if value == "step":
            steps = rows["step"].to_numpy(dtype=float)
            record = {"rho": depth_order(steps), "spread": float(np.nanmax(steps) - np.nanmin(steps))
                      if np.isfinite(steps).any() else math.nan, "n_censored": int(rows["censored"].sum())}
        else:
            depths = rows[value].to_numpy(dtype=float)
            deepest = float(np.nanmax(depths)) if np.isfinite(depths).any() else math.nan
            site = str(rows["site"].iloc[int(np.nanargmax(depths))]) if deepest > 0 else None
            record = {value: deepest, "site": site}
        run_rows.append({"group": group, "run": run, **record})
    by_run = pd.DataFrame(run_rows)
    numbers = [c for c in by_run.columns if c not in ("group", "run", "site") and by_run[c].dtype.kind in "fi"]
    group_rows = []
    for group, rows in by_run.groupby("group", sort=False):
        record = {"group": group, "n_runs": len(rows)}
        for column in numbers:
            record.update(_spread(rows[column], column))
        group_rows.append(record)
    return by_site, by_run, pd.DataFrame(group_rows)


# ---------------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------------
def _label(metric: str) -> str:
    try:
        return registry.label(metric)
    except KeyError:
        return metric


def _runs_by_group(df: pd.DataFrame) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for run, group in df[["run", "group"]].drop_duplicates().itertuples(index=False):
        out.setdefault(group, []).append(run)
    return out


def heatmaps(
    df: pd.DataFrame,
    metric: str,
    *,
    split: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    x: str = "step",
    cmap: str = "viridis",
    mark_ceiling: bool = True,
):
    """Site x time heatmaps of one metric for every run, side by side on one colour scale.

    Parameters
    ----------
    df : pandas.DataFrame
        Table of :func:`compare`.
    metric : str
    split : str, optional
        Required when the metric was recorded in several splits.
    vmin, vmax : float, optional
        Colour limits; default the range of the metric over all runs, so colours compare across runs.
    x : {"step", "epoch"}, default "step"
        Time value printed on the column ticks (one column per record, as in the paper's figures).
    cmap : str, default "viridis"
    mark_ceiling : bool, default True
        For metrics that saturate (registry), mark with a small white ``x`` the cells where the value
        sits at its ceiling (``saturated`` / ``saturated_wc`` = 1: nearly every pattern distinct),
        where it cannot rise and no dip can show.

    Returns
    -------
    matplotlib.figure.Figure
        One row per group, one panel per run (first site on top, as
        :func:`actpat.analysis.plots.heatmap`), and one colour bar for all.
    """
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    from actpat.analysis import plots

    _check_compared(df)
    if x not in ("step", "epoch"):
        raise ValueError(f"Expected `x` to be 'step' or 'epoch', but got {x!r}.")
    rows = df[df["metric"] == metric] if split is None else df[(df["metric"] == metric) & (df["split"] == split)]
    if rows.empty:
        raise ValueError(f"Expected metric {metric!r} in the table, but it has {sorted(df['metric'].unique())}.")
    values = rows["value"].to_numpy(dtype=float)
    norm = Normalize(float(np.nanmin(values)) if vmin is None else vmin, float(np.nanmax(values)) if vmax is None else vmax)
    groups = _runs_by_group(rows)
    n_cols = max(len(r) for r in groups.values())
    n_sites = rows["site"].nunique()
    fig = Figure(figsize=(1.5 + 3.2 * n_cols, (0.9 + 0.25 * n_sites) * len(groups)), layout="constrained")
    axes = fig.subplots(len(groups), n_cols, squeeze=False)
    flag = registry.metric(metric).saturation_flag if mark_ceiling and metric in registry.METRICS else None
    marked, image = False, None
    for row, (group, run_names) in zip(axes, groups.items()):
        for col, (ax, run) in enumerate(zip(row, run_names + [None] * (n_cols - len(run_names)))):
            if run is None:
                ax.set_axis_off()
                continue
            run_df = df[df["run"] == run]
            table = plots.site_time_matrix(run_df, metric, split=split)
            image = ax.imshow(np.ma.masked_invalid(table.to_numpy()), aspect="auto", interpolation="nearest",
                              cmap=cmap, norm=norm)
            ticks = np.unique(np.linspace(0, table.shape[1] - 1, num=min(table.shape[1], 5)).round().astype(int))
            times = table.columns.to_numpy() if x == "step" else run_df[run_df["metric"] == metric].groupby(
                "step")["epoch"].first().reindex(table.columns).to_numpy()
            ax.set_xticks(ticks, labels=[f"{float(times[i]):g}" for i in ticks], fontsize="small")
            ax.set_yticks(np.arange(table.shape[0]), labels=[str(s) for s in table.index] if col == 0 else [],
                          fontsize="small")
            ax.set_title(run, fontsize="medium")
            ax.set_xlabel(x, fontsize="small")
            if flag and flag in set(run_df["metric"]):
                flags = plots.site_time_matrix(run_df, flag, split=split).reindex_like(table).to_numpy()
                ys, xs = np.nonzero(flags == 1)
                if ys.size:
                    ax.scatter(xs, ys, marker="x", s=10, c="white", linewidths=0.7)
                    marked = True
    fig.colorbar(image, ax=axes, label=_label(metric), shrink=0.9)
    title = f"{_label(metric)}: one colour scale [{norm.vmin:.3g}, {norm.vmax:.3g}] for all runs"
    fig.suptitle(title + ("; x: entropy at its ceiling (K >= 0.9 n)" if marked else ""), fontsize="medium")
    return fig


def band(values, kind: str = "minmax", *, confidence: float = 0.95, n_boot: int = 2000,
         seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over runs and a band, at each time point.

    Parameters
    ----------
    values : array_like
        ``(n_runs, n_times)``; NaN where a run has no value.
    kind : {"minmax", "bootstrap"}, default "minmax"
        ``"minmax"``: the lowest and highest run. ``"bootstrap"``: the percentile interval of the
        mean over runs resampled with replacement (``n_boot`` resamples, ``np.random.default_rng(seed)``);
        with few runs it is narrow and says little, which the figure states.
    confidence : float, default 0.95
        Coverage of the bootstrap interval.

    Returns
    -------
    mean, lo, hi : np.ndarray
        Each ``(n_times,)``.

    Examples
    --------
    >>> mean, lo, hi = band([[0.0, 1.0], [2.0, 3.0], [1.0, 5.0]])
    >>> mean.tolist(), lo.tolist(), hi.tolist()
    ([1.0, 3.0], [0.0, 1.0], [2.0, 5.0])
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or v.shape[0] == 0:
        raise ValueError(f"Expected `values` of shape (n_runs, n_times), but got {v.shape}.")
    if kind not in BANDS:
        raise ValueError(f"Expected `kind` to be one of {BANDS}, but got {kind!r}.")
    if not 0 < confidence < 1:
        raise ValueError(f"Expected `confidence` in (0, 1), but got {confidence!r}.")
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: a time point no run has
        mean = np.nanmean(v, axis=0)
        if kind == "minmax":
            return mean, np.nanmin(v, axis=0), np.nanmax(v, axis=0)
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, v.shape[0], (n_boot, v.shape[0]))
        boot = np.nanmean(v[idx], axis=1)
        alpha = (1 - confidence) / 2
        lo, hi = np.nanquantile(boot, [alpha, 1 - alpha], axis=0)
    return mean, lo, hi


def band_curves(
    df: pd.DataFrame,
    metric: str,
    *,
    split: str | None = None,
    kind: str = "minmax",
    confidence: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
    x: str = "step",
    max_cols: int = 4,
):
    """Per-site curves of one metric: per group the mean over its runs, with a band.

    Parameters
    ----------
    df : pandas.DataFrame
        Table of :func:`compare`.
    metric : str
    split : str, optional
    kind : {"minmax", "bootstrap"}, default "minmax"
        Band over the runs of a group (:func:`band`); the figure's title states which.
    confidence, n_boot, seed
        Of the bootstrap interval.
    x : {"step", "epoch"}, default "step"
    max_cols : int, default 4
        Panels per row.

    Returns
    -------
    matplotlib.figure.Figure
        One panel per site (forward order), one line and band per group over the steps that every run of
        the group recorded; at steps that only some of them did (seeds probed on other schedules, a lost
        step), the mean of those runs as a cross (gid :data:`PARTIAL_GID`) and no band, so that a line never
        joins means over different runs. For a metric that saturates (registry), hollow circles (gid
        :data:`actpat.analysis.plots.SATURATED_GID`) on the group's mean at the steps where some run of the
        group is saturated.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    from actpat.analysis import plots

    _check_compared(df)
    if x not in ("step", "epoch"):
        raise ValueError(f"Expected `x` to be 'step' or 'epoch', but got {x!r}.")
    rows = df[df["metric"] == metric] if split is None else df[(df["metric"] == metric) & (df["split"] == split)]
    if rows.empty:
        raise ValueError(f"Expected metric {metric!r} in the table, but it has {sorted(df['metric'].unique())}.")
    if split is None and rows["split"].nunique() > 1:
        raise ValueError(f"Metric {metric!r} is in several splits {sorted(rows['split'].unique())}; pass `split=`.")
    sites = rows.groupby("site")["site_index"].min().sort_values(kind="stable").index.tolist()
    groups = list(_runs_by_group(rows))
    colors = colormaps["tab10"]
    flag = registry.metric(metric).saturation_flag if metric in registry.METRICS else None
    flags = df[(df["metric"] == flag) & (df["value"] > 0)] if flag else df.iloc[:0]
    if split is not None:
        flags = flags[flags["split"] == split]
    marked = partial_marked = False
    n_cols = min(max_cols, len(sites))
    n_rows = math.ceil(len(sites) / n_cols)
    fig = Figure(figsize=(3.6 * n_cols, 2.8 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False, sharex=True).ravel()
    for ax, site in zip(axes, sites):
        for i, group in enumerate(groups):
            sub = rows[(rows["site"] == site) & (rows["group"] == group)]
            if sub.empty:
                continue
            # dropna=False: a site whose values are all NaN (a measure undefined there) is drawn empty, not dropped
            matrix = sub.pivot_table(index="run", columns="step", values="value", aggfunc="first", dropna=False)
            mean, lo, hi = band(matrix.to_numpy(), kind, confidence=confidence, n_boot=n_boot, seed=seed)
            times = matrix.columns.to_numpy() if x == "step" else sub.groupby("step")["epoch"].mean().reindex(
                matrix.columns).to_numpy()
            color = colors(i % 10)
            present = np.isfinite(matrix.to_numpy()).sum(axis=0)
            whole = present == matrix.shape[0]
            ax.plot(times, np.where(whole, mean, np.nan), color=color, label=f"{group} ({matrix.shape[0]})")
            ax.fill_between(times, lo, hi, where=whole, color=color, alpha=0.25, linewidth=0)
            partial = ~whole & (present > 0)
            if partial.any():
                ax.plot(times[partial], mean[partial], linestyle="none", marker="x", color=color, gid=PARTIAL_GID,
                        label=None if partial_marked else "mean of only the runs with a value there")
                partial_marked = True
            # Steps at which some run of the group is saturated there: its estimate is pinned near log2 n.
            pinned = set(flags.loc[(flags["site"] == site) & (flags["group"] == group), "step"].astype(int))
            hit = np.array([int(step) in pinned for step in matrix.columns], dtype=bool)
            if hit.any():
                ax.plot(times[hit], mean[hit], linestyle="none", marker="o", markerfacecolor="none", color=color,
                        markersize=7, gid=plots.SATURATED_GID,
                        label=None if marked else "saturated in some run (K close to n)")
                marked = True
        ax.set_title(str(site), fontsize="medium")
        ax.set_xlabel(x)
    for ax in axes[len(sites):]:
        ax.set_axis_off()
    axes[0].set_ylabel(_label(metric))
    axes[0].legend(fontsize="small", title="group (runs)")
    what = "min-max over runs" if kind == "minmax" else (
        f"{confidence:.0%} bootstrap interval of the mean over runs ({n_boot} resamples)")
    fig.suptitle(f"{_label(metric)}: mean over runs per group; band: {what}", fontsize="medium")
    return fig


# ---------------------------------------------------------------------------------------------------
# report (the `actpat compare` command)
# ---------------------------------------------------------------------------------------------------
def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def report(
    runs,
    out_dir,
    *,
    split: str | None = None,
    metrics: Sequence[str] | None = None,
    threshold: float = 0.9,
    stay: bool = False,
    kind: str = "minmax",
    width_controlled: bool = True,
    regions: bool = False,
    m: int | None = None,
    n_obs: int | None = None,
    n_subsets: int = 10,
    seed: int = 0,
    x: str = "step",
    dpi: int = 100,
    progress: bool = True,
) -> dict[str, Path]:
    """Compare runs and write the table, the convergence and dip summaries and the figures to ``out_dir``.

    Parameters
    ----------
    runs : mapping or sequence
        As for :func:`parse_runs`.
    out_dir : path
        Created if needed; files of the same name are replaced.
    metrics : sequence of str, optional
        Metrics drawn as heatmaps and band curves; default the registry's headline metrics present
        (normalized entropy, distinct fraction, JI(init, t), wJI(final, t) and their width-controlled
        variants).
    threshold, stay
        Of the convergence step (:func:`~actpat.analysis.convergence.convergence_step`).
    kind : {"minmax", "bootstrap"}, default "minmax"
        Band of the curves.
    width_controlled, regions, m, n_obs, n_subsets, seed
        As for :func:`compare`.
    x : {"step", "epoch"}, default "step"
    dpi : int, default 100
    progress : bool, default True

    Returns
    -------
    dict of str to pathlib.Path
        ``runs`` (run, group, path), ``metrics`` (the tidy table), ``convergence`` (per run and site,
        raw and width-controlled), ``convergence_by_site``, ``convergence_by_run``,
        ``convergence_by_group``, ``dips`` (per run and site, raw and width-controlled, relative to
        the ends and to the peaks), ``dips_by_run``, ``dips_by_group`` (CSV), and
        ``heatmap_<metric>`` / ``curves_<metric>`` (PNG).
    """
    if kind not in BANDS:
        raise ValueError(f"Expected `kind` to be one of {BANDS}, but got {kind!r}.")
    specs = parse_runs(runs)
    df = compare(specs, split=split, width_controlled=width_controlled, regions=regions, m=m, n_obs=n_obs,
                 n_subsets=n_subsets, seed=seed, progress=progress)
    present = set(df["metric"])
    wanted = [m for m in registry.metric_names(headline=True) if m in present] if metrics is None else list(metrics)
    absent = [m for m in wanted if m not in present]
    if absent:
        raise ValueError(f"Expected metrics to draw among those of the runs, {sorted(present)}, but got {absent}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)  # only once every run has been read and every argument checked
    written: dict[str, Path] = {}

    def save_csv(name: str, table: pd.DataFrame) -> None:
        written[name] = out / f"{name}.csv"
        table.to_csv(written[name], index=False)

    save_csv("runs", pd.DataFrame([(s.run, s.group, str(s.path)) for s in specs], columns=["run", "group", "path"]))
    save_csv("metrics", df)
    conv = pd.concat([convergence(df, name, threshold=threshold, stay=stay) for name in
                      ("weighted_jaccard_final", "weighted_jaccard_wc_final") if name in present], ignore_index=True)
    dip_rows = pd.concat([dips(df, name, relative_to=r) for name in ("normalized_entropy", "normalized_entropy_wc")
                          if name in present for r in ("ends", "peaks")], ignore_index=True)
    save_csv("convergence", conv)
    for name, part in zip(("by_site", "by_run", "by_group"), _per_metric(conv, "step")):
        save_csv(f"convergence_{name}", part)
    save_csv("dips", dip_rows)
    for name, part in zip(("by_run", "by_group"), _per_metric(dip_rows, "depth", ("metric", "relative_to"))[1:]):
        save_csv(f"dips_{name}", part)
    for name in wanted:
        figures = {"heatmap": heatmaps(df, name, split=split, x=x),
                   "curves": band_curves(df, name, split=split, kind=kind, x=x, seed=seed)}
        for stem, fig in figures.items():
            written[f"{stem}_{name}"] = out / f"{stem}_{_safe(name)}.png"
            fig.savefig(written[f"{stem}_{name}"], dpi=dpi)
    return written


def _per_metric(table: pd.DataFrame, value: str, keys: Sequence[str] = ("metric",)) -> list[pd.DataFrame]:
    """:func:`summary` of each metric (and variant) of a stacked table, stacked with those keys."""
    parts: list[list[pd.DataFrame]] = [[], [], []]
    for key, rows in table.groupby(list(keys), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        for i, part in enumerate(summary(rows, value)):
            for column, v in reversed(list(zip(keys, key))):
                part.insert(0, column, v)
            parts[i].append(part)
    return [pd.concat(p, ignore_index=True) if p else pd.DataFrame() for p in parts]
