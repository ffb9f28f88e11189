"""Figures of the tidy metrics table: site x time heatmaps, per-site curves, information planes.

Every function takes the tidy metrics DataFrame (one row per measured number, columns ``step``,
``epoch``, ``split``, ``site``, ``site_index``, ``metric``, ``value``) and returns a
:class:`matplotlib.figure.Figure`. Figures are built with the object-oriented API
(:class:`~matplotlib.figure.Figure`, never ``pyplot``), so nothing here selects a backend, opens a
window or keeps figures alive in pyplot's registry: the functions are safe in scripts, on headless
machines and in notebooks (where a returned Figure is displayed as usual). Pass ``ax=`` to draw into
an existing axes instead (e.g. one panel of a ``plt.subplots`` grid).

Names, units, axis labels and which metrics are headline heatmaps come from the metric registry
(:mod:`actpat.analysis.metrics`). Figures cannot mislead in three declared ways:

- a metric declared ``constant`` (``n_units``, ``n_observations``, ``entropy_max``, ``nan_count``,
  ``saturated``) is a table column, never a figure;
- a series that is all NaN is labelled so, with the registry's reason (e.g. ``jaccard_t_init`` when no
  pattern was seen more than T times);
- where the table holds ``saturated`` rows (``summarize`` and ``information_plane`` emit them), points
  whose estimate is saturated (K close to n) are marked in every figure of an entropy, information or
  pattern count (registry ``saturates``), the information plane included.

Sites are always ordered by ``site_index`` (forward order): in a heatmap the first layer is the top
row, as in the figures of Hartmann et al. (2021); in curves the colour darkens with depth.

References
----------
.. [1] Hartmann, D., Franzen, D. & Brodehl, S. (2021). Studying the evolution of neural activation
   patterns during training of feed-forward ReLU networks. Frontiers in Artificial Intelligence 4.
.. [2] Shwartz-Ziv, R. & Tishby, N. (2017). Opening the black box of deep neural networks via
   information. arXiv:1703.00810.
"""

from __future__ import annotations

import io
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from actpat.analysis.metrics import METRICS, label, metric, metric_names
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

#: Columns of the tidy metrics table.
METRIC_COLUMNS = ("step", "epoch", "split", "site", "site_index", "metric", "value")

#: File formats of :func:`save_all`.
FORMATS = ("png", "pdf", "svg")

#: ``gid`` of the markers of saturated points (to find them among a figure's artists).
SATURATED_GID = "saturated"

_TIME_AXES = ("step", "epoch")
_PLANE_AXES = ("input_information", "mutual_information")
# Legend entries per column when the legend sits beside the axes.
_LEGEND_ROWS = 20


def metric_label(name: str) -> str:
    """Axis or colorbar label of a registered metric, with its unit (:func:`actpat.analysis.metrics.label`).

    Examples
    --------
    >>> metric_label("entropy"), metric_label("weighted_jaccard_final")
    ('H(A) [bits]', 'wJI(final, t)')
    """
    return label(name)


def check_columns(df: pd.DataFrame, required: Sequence[str] = METRIC_COLUMNS) -> None:
    """Raise a ValueError naming the missing columns unless ``df`` is a DataFrame with ``required``."""
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"Expected `df` to be a pandas DataFrame, but got {type(df).__name__}.")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(
            f"Expected the metrics DataFrame to have columns {list(required)}, "
            f"but it is missing {missing} (it has {list(df.columns)})."
        )


def _check_time_axis(x: str) -> None:
    if x not in _TIME_AXES:
        raise ValueError(f"Expected `x` to be one of {list(_TIME_AXES)}, but got {x!r}.")


def _check_drawable(name: str) -> None:
    spec = metric(name)
    if spec.constant:
        raise ValueError(
            f"Expected a metric that changes with training, but {name!r} is declared constant (a property of "
            "the site or the record): it is a table column, not a figure."
        )


def _select(df: pd.DataFrame, name: str, split: str | None) -> pd.DataFrame:
    """Rows of one metric in one split; errors name what is available."""
    check_columns(df)
    available = sorted(df["metric"].unique().tolist())
    if name not in available:
        raise ValueError(f"Expected `metric` to be one of {available}, but got {name!r}.")
    rows = df[df["metric"] == name]
    splits = sorted(rows["split"].unique().tolist())
    if split is None:
        if len(splits) > 1:
            raise ValueError(
                f"Metric {name!r} is present in several splits {splits}; pass `split=` to choose one."
            )
        return rows
    if split not in splits:
        raise ValueError(f"Expected `split` to be one of {splits} for {name!r}, but got {split!r}.")
    return rows[rows["split"] == split]


def site_order(rows: pd.DataFrame) -> list[str]:
    """Sites of a tidy table in forward order (ascending ``site_index``, ties by name)."""
    order = rows.groupby("site", sort=False)["site_index"].min().reset_index()
    order = order.sort_values(["site_index", "site"], kind="stable")
    return order["site"].tolist()


def site_time_matrix(df: pd.DataFrame, metric: str, *, split: str | None = None) -> pd.DataFrame:
    """Pivot one metric into a ``(sites, steps)`` table, sites in forward order.

    Parameters
    ----------
    df : pandas.DataFrame
        Tidy metrics table (columns ``step, epoch, split, site, site_index, metric, value``).
    metric : str
        Metric to pivot.
    split : str, optional
        Split to use; required when the metric was recorded in more than one split.

    Returns
    -------
    pandas.DataFrame
        Index: site names ordered by ``site_index``; columns: sorted distinct steps; missing cells
        are NaN.

    Raises
    ------
    ValueError
        If columns are missing, the metric or split is absent, or a (site, step) cell has more than
        one value.

    Examples
    --------
    >>> df = pd.DataFrame({"step": [0, 0, 5, 5], "epoch": 0, "split": "probe",
    ...                    "site": ["b", "a", "b", "a"], "site_index": [1, 0, 1, 0],
    ...                    "metric": "entropy", "value": [1.0, 2.0, 3.0, 4.0]})
    >>> site_time_matrix(df, "entropy").to_numpy().tolist()
    [[2.0, 4.0], [1.0, 3.0]]
    """
    rows = _select(df, metric, split)
    dup = rows.duplicated(["site", "step"], keep=False)
    if dup.any():
        first = rows[dup].iloc[0]
        raise ValueError(
            f"Expected one value per (site, step) of {metric!r}, but site {first['site']!r} has "
            f"{int(dup.sum())} duplicated rows (e.g. at step {int(first['step'])})."
        )
    table = rows.pivot(index="site", columns="step", values="value")
    table = table.reindex(index=site_order(rows), columns=sorted(table.columns))
    return table.astype(float)


def fractional_epochs(steps, epochs, *, steps_per_epoch: float | None = None) -> np.ndarray:
    """Fractional epoch of each record: ``epoch + (step - start of that epoch) / steps_per_epoch``.

    The epoch recorded with a step is an integer, so the probes within one epoch would stack on one x
    value; this spreads them in proportion to their steps. An epoch's start lies between the last record of
    the epoch before and its own first record: the probe at an epoch's end is the next epoch's start but
    carries the epoch that ended, and the next epoch's first record then comes a probe interval later.
    Within that range it is the previous epoch's start plus ``steps_per_epoch`` (epoch 0, or an epoch after
    one without records: its first record).

    Parameters
    ----------
    steps, epochs : array_like
        ``(n,)`` the step and the (integer) epoch of each record; ``-1`` epochs (unknown) are an error.
    steps_per_epoch : float, optional
        Optimizer steps per epoch. Default: estimated as the median distance, in steps per epoch,
        between the first recorded steps of the recorded epochs; with a single epoch, the span of its
        steps plus the median gap between its records. Pass it for exact values: where each epoch's
        first record is a probe interval after its start (probes at every end of an epoch, labelled with
        the epoch that ended), the estimate can be up to that interval too long (with few epochs).

    Returns
    -------
    np.ndarray
        ``(n,)`` float fractional epochs; equal steps give equal values, larger steps of one epoch
        larger values.

    Examples
    --------
    >>> fractional_epochs([0, 2, 4, 6, 8, 10, 12], [0, 0, 0, 0, 0, 1, 1]).tolist()
    [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2]
    """
    steps = np.asarray(steps, dtype=np.float64)
    epochs = np.asarray(epochs, dtype=np.int64)
    if steps.shape != epochs.shape or steps.ndim != 1:
        raise ValueError(f"Expected `steps` and `epochs` of one shape (n,), but got {steps.shape} and {epochs.shape}.")
    if (epochs < 0).any():
        raise ValueError(
            "Expected every record to know its epoch for x='epoch', but some have epoch -1 (recorded without "
            "one); use x='step'."
        )
    if steps.size == 0:
        return steps
    table = pd.DataFrame({"step": steps, "epoch": epochs}).drop_duplicates()
    first = table.groupby("epoch")["step"].min()
    if steps_per_epoch is None:
        if first.size > 1:
            steps_per_epoch = float(np.median(np.diff(first.to_numpy()) / np.diff(first.index.to_numpy())))
        else:
            gaps = np.diff(np.unique(steps))
            steps_per_epoch = float(steps.max() - steps.min()) + (float(np.median(gaps)) if gaps.size else 1.0)
    elif not (isinstance(steps_per_epoch, (int, float, np.integer, np.floating)) and steps_per_epoch > 0):
        raise ValueError(f"Expected `steps_per_epoch` to be a positive number, but got {steps_per_epoch!r}.")
    steps_per_epoch = float(steps_per_epoch)
    last = table.groupby("epoch")["step"].max()
    starts: dict[int, float] = {}
    for epoch, first_step in first.items():
        if epoch - 1 in starts:
            starts[epoch] = min(max(starts[epoch - 1] + steps_per_epoch, last[epoch - 1]), first_step)
        else:
            starts[epoch] = first_step
    return epochs + (steps - pd.Series(starts).reindex(epochs).to_numpy()) / steps_per_epoch


def _time_values(rows: pd.DataFrame, steps: Sequence, x: str, steps_per_epoch: float | None) -> np.ndarray:
    """Value of the time axis ``x`` at each of ``steps`` (fractional epochs for ``x="epoch"``)."""
    if x == "step":
        return np.asarray(steps, dtype=float)
    per_step = rows.groupby("step")["epoch"].min().reindex(steps)
    return fractional_epochs(per_step.index.to_numpy(), per_step.to_numpy(), steps_per_epoch=steps_per_epoch)


def _round_ticks(times: np.ndarray, integer: bool) -> tuple[np.ndarray, np.ndarray]:
    """Positions (in column units) and values of round ticks across evenly drawn columns.

    Round values of the time axis are placed where they fall between the columns around them; where
    uneven records crowd several into a few columns, only those at least one eighth of the width (and one
    column) apart are kept, so that no two labels overlap.
    """
    if times.size == 1:
        return np.array([0.0]), times
    values = MaxNLocator(nbins=8, steps=[1, 2, 2.5, 5, 10], integer=integer).tick_values(times[0], times[-1])
    values = values[(values >= times[0]) & (values <= times[-1])]
    positions = np.interp(values, times, np.arange(times.size))
    keep, last = [], -np.inf
    for i, position in enumerate(positions):
        if position - last >= max(1.0, times.size / 8):
            keep.append(i)
            last = position
    return positions[keep], values[keep]


def _new_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _nan_reason(name: str) -> str:
    return metric(name).nan_reason or "no value recorded"


def _saturated_cells(df: pd.DataFrame | None, name: str, split: str | None) -> set[tuple[str, int]]:
    """``(site, step)`` of saturated points where ``name`` saturates and the table says so (its flag:
    ``saturated``, or ``saturated_wc`` for a width-controlled measure)."""
    flag = metric(name).saturation_flag if df is not None else None
    if flag is None or flag not in set(df["metric"]):
        return set()
    rows = df[(df["metric"] == flag) & (df["value"] > 0)]
    if split is not None:
        rows = rows[rows["split"] == split]
    return set(zip(rows["site"], rows["step"].astype(int)))


def _labels_for(sites: Sequence[str], site_labels: Mapping[str, str] | None) -> list[str]:
    return [str(site_labels.get(s, s)) if site_labels else str(s) for s in sites]


def _legend_outside(ax: Axes, title: str, handles=None, labels=None) -> None:
    """Legend beside the axes, in columns of at most 20 entries, so that 50 sites stay readable."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    ncols = math.ceil(len(handles) / _LEGEND_ROWS)
    ax.legend(
        handles, labels, title=title, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
        fontsize="small" if len(handles) <= _LEGEND_ROWS else "x-small", ncols=ncols, frameon=False,
    )


def heatmap(
    df: pd.DataFrame,
    metric: str,
    *,
    split: str | None = None,
    ax: Axes | None = None,
    x: str = "step",
    steps_per_epoch: float | None = None,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    site_labels: Mapping[str, str] | None = None,
) -> Figure:
    """Site x time heatmap of one metric, first layer on top.

    One column per recorded time point (equal widths, as in the paper's figures even when records
    are unevenly spaced); ticks sit at round values of ``x``, placed between the columns that
    surround them.

    Parameters
    ----------
    df : pandas.DataFrame
        Tidy metrics table (columns ``step, epoch, split, site, site_index, metric, value``).
    metric : str
        Registered metric to draw, e.g. ``"normalized_entropy"`` or ``"weighted_jaccard_final"``.
    split : str, optional
        Split to draw; required when the metric was recorded in more than one split.
    ax : matplotlib.axes.Axes, optional
        Axes to draw into; a new Figure is created when omitted.
    x : {"step", "epoch"}, default "step"
        Time value printed on the ticks (fractional epochs, see :func:`fractional_epochs`).
    steps_per_epoch : float, optional
        For ``x="epoch"``; estimated from the table when omitted.
    cmap : str, default "viridis"
        Colormap name.
    vmin, vmax : float, optional
        Colour limits; default to the data range.
    site_labels : mapping, optional
        Row label of each site (e.g. :func:`describe_sites`); default the site name.

    Returns
    -------
    matplotlib.figure.Figure
        Figure with one image of shape ``(n_sites, n_time_points)`` (rows in ``site_index`` order,
        missing cells masked), a colorbar labelled with the metric and its unit, ``x`` markers (gid
        :data:`SATURATED_GID`) on saturated cells, and ``(all NaN: reason)`` on rows without a value.

    Raises
    ------
    ValueError
        Bad columns, absent metric or split, a constant metric, duplicated cells.

    Examples
    --------
    >>> df = pd.DataFrame({"step": [0, 0, 5, 5], "epoch": 0, "split": "probe",
    ...                    "site": ["b", "a", "b", "a"], "site_index": [1, 0, 1, 0],
    ...                    "metric": "entropy", "value": [1.0, 2.0, 3.0, 4.0]})
    >>> fig = heatmap(df, "entropy")
    >>> fig.axes[0].images[0].get_array().shape
    (2, 2)
    """
    _check_time_axis(x)
    table = site_time_matrix(df, metric, split=split)
    _check_drawable(metric)
    rows = _select(df, metric, split)
    steps = list(table.columns)
    n_sites, n_times = table.shape
    values = table.to_numpy()

    fig, ax = _new_axes(ax, (max(4.0, min(12.0, 2.5 + 0.15 * n_times)), max(2.5, 1.5 + 0.3 * n_sites)))
    image = ax.imshow(
        np.ma.masked_invalid(values), aspect="auto", interpolation="nearest", origin="upper", cmap=cmap,
        vmin=vmin, vmax=vmax,
    )
    names = _labels_for(table.index, site_labels)
    empty = np.isnan(values).all(axis=1)
    names = [f"{n} (all NaN)" if e else n for n, e in zip(names, empty)]
    ax.set_yticks(np.arange(n_sites), labels=names)
    positions, ticks = _round_ticks(_time_values(rows, steps, x, steps_per_epoch), integer=x == "step")
    ax.set_xticks(positions, labels=[f"{v:g}" for v in ticks])
    ax.set_xlabel(x)
    ax.set_ylabel("site")
    saturated = _saturated_cells(df, metric, split)
    cells = [(j, i) for i, site in enumerate(table.index) for j, step in enumerate(steps) if (site, step) in saturated]
    if cells:
        cols, rws = zip(*cells)
        ax.plot(cols, rws, linestyle="none", marker="x", color="red", markersize=6, markeredgewidth=1.5,
                gid=SATURATED_GID, label="saturated (K close to n)")
        ax.legend(loc="upper left", bbox_to_anchor=(0.0, -0.12), fontsize="x-small", frameon=False)
    title = label(metric) if split is None else f"{label(metric)} ({split})"
    if empty.all():
        title = f"{title}: all NaN ({_nan_reason(metric)})"
    elif empty.any():
        title = f"{title}; all-NaN rows: {_nan_reason(metric)}"
    ax.set_title(title, fontsize="medium")
    fig.colorbar(image, ax=ax).set_label(label(metric))
    return fig


def _depth_colors(n: int, cmap: str) -> list:
    """``n`` colours of a sequential colormap, light (shallow) to dark (deep)."""
    colormap = colormaps[cmap]
    return [colormap(v) for v in np.linspace(0.3, 1.0, n)] if n > 1 else [colormap(0.8)]


def curves(
    df: pd.DataFrame,
    metric: str,
    *,
    x: str = "step",
    split: str | None = None,
    ax: Axes | None = None,
    steps_per_epoch: float | None = None,
    cmap: str = "viridis_r",
    legend: bool = True,
    site_labels: Mapping[str, str] | None = None,
) -> Figure:
    """Per-site curves of one metric over time, coloured by depth.

    Parameters
    ----------
    df : pandas.DataFrame
        Tidy metrics table (columns ``step, epoch, split, site, site_index, metric, value``).
    metric : str
        Registered metric to draw.
    x : {"step", "epoch"}, default "step"
        Time axis; ``"epoch"`` is the fractional epoch of each record (:func:`fractional_epochs`), so
        the probes within one epoch do not stack.
    split : str, optional
        Split to draw; required when the metric was recorded in more than one split.
    ax : matplotlib.axes.Axes, optional
        Axes to draw into; a new Figure is created when omitted.
    steps_per_epoch : float, optional
        For ``x="epoch"``; estimated from the table when omitted.
    cmap : str, default "viridis_r"
        Sequential colormap; sites get evenly spaced colours in ``site_index`` order.
    legend : bool, default True
        Legend beside the axes (columns of 20 entries: readable with 50 sites).
    site_labels : mapping, optional
        Legend label of each site (e.g. :func:`describe_sites`); default the site name.

    Returns
    -------
    matplotlib.figure.Figure
        One line per site in ``site_index`` order (label = site label, ``"(all NaN: reason)"`` appended
        when it has no value), and hollow circles (gid :data:`SATURATED_GID`) on saturated points.

    Examples
    --------
    >>> df = pd.DataFrame({"step": [0, 0, 5, 5], "epoch": 0, "split": "probe",
    ...                    "site": ["b", "a", "b", "a"], "site_index": [1, 0, 1, 0],
    ...                    "metric": "entropy", "value": [1.0, 2.0, 3.0, 4.0]})
    >>> [line.get_label() for line in curves(df, "entropy").axes[0].lines]
    ['a', 'b']
    """
    _check_time_axis(x)
    rows = _select(df, metric, split)
    _check_drawable(metric)
    sites = site_order(rows)
    names = _labels_for(sites, site_labels)
    width = 6.0 + (1.8 * math.ceil(len(sites) / _LEGEND_ROWS) if legend else 0.0)
    fig, ax = _new_axes(ax, (width, 4.0))
    steps = sorted(rows["step"].unique())
    times = dict(zip(steps, _time_values(rows, steps, x, steps_per_epoch)))
    saturated = _saturated_cells(df, metric, split)
    marked_x, marked_y = [], []
    all_nan = True
    for site, name, color in zip(sites, names, _depth_colors(len(sites), cmap)):
        site_rows = rows[rows["site"] == site].sort_values("step", kind="stable")
        xs = np.array([times[s] for s in site_rows["step"]])
        ys = site_rows["value"].to_numpy(dtype=float)
        if np.isnan(ys).all():
            name = f"{name} (all NaN: {_nan_reason(metric)})"
        else:
            all_nan = False
        ax.plot(xs, ys, color=color, label=name, marker="." if len(site_rows) < 50 else None)
        hit = np.array([(site, int(s)) in saturated for s in site_rows["step"]], dtype=bool)
        marked_x.extend(xs[hit])
        marked_y.extend(ys[hit])
    if marked_x:
        ax.plot(marked_x, marked_y, linestyle="none", marker="o", markerfacecolor="none", markeredgecolor="red",
                markersize=7, gid=SATURATED_GID, label="saturated (K close to n)")
    ax.set_xlabel(x)
    ax.set_ylabel(label(metric))
    title = metric if split is None else f"{metric} ({split})"
    if all_nan:
        title = f"{title}: all NaN ({_nan_reason(metric)})"
        ax.text(0.5, 0.5, f"all NaN: {_nan_reason(metric)}", transform=ax.transAxes, ha="center", va="center")
    ax.set_title(title, fontsize="medium")
    if legend:
        _legend_outside(ax, "site")
    return fig


def plot_information_plane(
    df: pd.DataFrame,
    *,
    split: str | None = None,
    x: str = "step",
    ax: Axes | None = None,
    x_metric: str = "input_information",
    y_metric: str = "mutual_information",
    steps_per_epoch: float | None = None,
    cmap: str = "viridis",
    site_labels: Mapping[str, str] | None = None,
) -> Figure:
    """Information plane: I(X;T) against I(T;Y) over training, one trajectory per site.

    Parameters
    ----------
    df : pandas.DataFrame
        Tidy table with the metrics ``x_metric`` and ``y_metric`` (the information-plane table of
        :func:`actpat.analysis.information_plane`), and ``saturated`` where the estimator flags it.
    split : str, optional
        Split to draw; required when the table holds more than one split.
    x : {"step", "epoch"}, default "step"
        Time that colours the points (fractional epochs for ``"epoch"``).
    ax : matplotlib.axes.Axes, optional
        Axes to draw into; a new Figure is created when omitted.
    x_metric, y_metric : str, default "input_information", "mutual_information"
        Metrics on the horizontal and vertical axes (e.g. the Miller-Madow corrected variants).
    steps_per_epoch : float, optional
        For ``x="epoch"``.
    cmap : str, default "viridis"
        Colormap of the time colouring.
    site_labels : mapping, optional
        Legend label of each site.

    Returns
    -------
    matplotlib.figure.Figure
        One line per site (label = site label, in ``site_index`` order), points coloured by time with
        a colorbar, both axes in bits, and red circles (gid :data:`SATURATED_GID`) on saturated points.

    Notes
    -----
    Plug-in estimates saturate at ``log2 n`` bits for n probe samples; a trajectory pressed against
    that bound says little about compression [2]_: those points are the marked ones.

    Examples
    --------
    >>> df = pd.DataFrame({"step": [0, 0, 5, 5], "epoch": 0, "split": "probe",
    ...                    "site": "a", "site_index": 0,
    ...                    "metric": ["input_information", "mutual_information"] * 2,
    ...                    "value": [1.0, 0.5, 2.0, 0.9]})
    >>> plot_information_plane(df).axes[0].lines[0].get_xydata().tolist()
    [[1.0, 0.5], [2.0, 0.9]]
    """
    _check_time_axis(x)
    tables = {name: site_time_matrix(df, name, split=split) for name in (x_metric, y_metric)}
    rows = _select(df, x_metric, split)
    sites = [s for s in tables[x_metric].index if s in tables[y_metric].index]
    steps = sorted(set(tables[x_metric].columns) & set(tables[y_metric].columns))
    times = _time_values(rows, steps, x, steps_per_epoch).astype(float)
    norm = Normalize(vmin=np.nanmin(times), vmax=np.nanmax(times)) if len(times) else Normalize()
    saturated = _saturated_cells(df, x_metric, split) | _saturated_cells(df, y_metric, split)

    fig, ax = _new_axes(ax, (6.0 + 1.8 * math.ceil(len(sites) / _LEGEND_ROWS), 4.5))
    scatter = None
    marked = []
    for site, name, color in zip(sites, _labels_for(sites, site_labels), _depth_colors(len(sites), "Greys")):
        xs = tables[x_metric].loc[site, steps].to_numpy(dtype=float)
        ys = tables[y_metric].loc[site, steps].to_numpy(dtype=float)
        keep = np.isfinite(xs) & np.isfinite(ys)
        ax.plot(xs[keep], ys[keep], color=color, linewidth=1.0, label=name, zorder=1)
        scatter = ax.scatter(xs[keep], ys[keep], c=times[keep], cmap=cmap, norm=norm, s=16, zorder=2)
        marked.extend((a, b) for a, b, s, k in zip(xs, ys, steps, keep) if k and (site, int(s)) in saturated)
    if marked:
        mx, my = zip(*marked)
        ax.plot(mx, my, linestyle="none", marker="o", markerfacecolor="none", markeredgecolor="red", markersize=8,
                gid=SATURATED_GID, label="saturated (K close to n)", zorder=3)
    ax.set_xlabel(label(x_metric))
    ax.set_ylabel(label(y_metric))
    ax.set_title("information plane" if split is None else f"information plane ({split})", fontsize="medium")
    if scatter is not None:
        fig.colorbar(scatter, ax=ax, location="left").set_label(x)
    _legend_outside(ax, "site")
    return fig


def describe_sites(run, *, module_type: bool = True, width: bool = True) -> dict[str, str]:
    """Site labels with module type and width, e.g. ``"layer1.0.relu (ReLU, 16)"``, for ``site_labels=``.

    Parameters
    ----------
    run : Run
        An opened run (:func:`actpat.recorder.reader.open_run`); its ``site_info`` gives both.
    module_type, width : bool, default True
        Which to show.

    Returns
    -------
    dict
        ``{site: label}`` in forward order.
    """
    out = {}
    for site in run.sites:
        info = run.site_info(site)
        parts = ([info["module_type"]] if module_type else []) + ([str(info["n_units"])] if width else [])
        out[site] = f"{site} ({', '.join(parts)})" if parts else site
    return out


def safe_name(name: str) -> str:
    """A file-name-safe version of a metric, site or split name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "unnamed"


def iter_figures(
    df: pd.DataFrame,
    *,
    metrics: Sequence[str] | None = None,
    heatmap_metrics: Sequence[str] | None = None,
    info_plane_df: pd.DataFrame | None = None,
    sites: Sequence[str] | None = None,
    x: str = "step",
    steps_per_epoch: float | None = None,
    site_labels: Mapping[str, str] | None = None,
) -> Iterator[tuple[str, Figure]]:
    """Yield ``(file stem, Figure)`` for everything :func:`save_all` draws (parameters as there).

    Shared with :mod:`actpat.analysis.tensorboard`, which embeds the same figures as images.
    """
    check_columns(df)
    _check_time_axis(x)
    if info_plane_df is not None:
        check_columns(info_plane_df)
    if sites is not None:
        recorded = set(df["site"]) | (set(info_plane_df["site"]) if info_plane_df is not None else set())
        unknown = [s for s in sites if s not in recorded]
        if unknown:
            raise ValueError(f"Expected `sites` among the table's sites {sorted(recorded)}, but got {unknown}.")
        df = df[df["site"].isin(list(sites))]
        if info_plane_df is not None:
            info_plane_df = info_plane_df[info_plane_df["site"].isin(list(sites))]
    present = set(df["metric"])
    unregistered = sorted(present - set(METRICS))
    if unregistered:
        log.warning(
            "Skipping metrics that are not registered (no unit or meaning is known): %s; declare them with "
            "actpat.analysis.metrics.register.", unregistered,
        )

    def wanted(requested, default, kind):
        explicit = requested is not None
        names = list(default if requested is None else requested)
        chosen = []
        for name in names:
            if name not in present:
                (log.warning if explicit else log.info)(
                    "Skipping the %s of metric %r: it is not in the table.", kind, name
                )
            elif name in METRICS and metric(name).constant:
                (log.warning if explicit else log.debug)(
                    "Skipping the %s of %r: it is declared constant, a table column rather than a figure.", kind, name
                )
            elif name in METRICS:
                chosen.append(name)
        return chosen

    heat = wanted(heatmap_metrics, metric_names(headline=True), "heatmap")
    line = wanted(metrics, sorted(present), "curves")
    options = {"x": x, "steps_per_epoch": steps_per_epoch, "site_labels": site_labels}
    splits = sorted(df["split"].unique().tolist())
    for split in splits:
        suffix = "" if len(splits) == 1 else f"_{safe_name(split)}"
        part = df[df["split"] == split]
        in_split = set(part["metric"])
        for name in heat:
            if name in in_split:
                yield f"heatmap_{safe_name(name)}{suffix}", heatmap(part, name, split=split, **options)
        for name in line:
            if name in in_split:
                yield f"curves_{safe_name(name)}{suffix}", curves(part, name, split=split, **options)

    plane = info_plane_df
    if plane is None and set(_PLANE_AXES) <= present:
        plane = df
    if plane is not None:
        plane_metrics = set(plane["metric"])
        if not set(_PLANE_AXES) <= plane_metrics:
            log.warning(
                "Skipping the information plane: expected metrics %s, but the table has %s.",
                list(_PLANE_AXES), sorted(plane_metrics),
            )
            return
        plane_splits = sorted(plane.loc[plane["metric"].isin(_PLANE_AXES), "split"].unique())
        for split in plane_splits:
            suffix = "" if len(plane_splits) == 1 else f"_{safe_name(split)}"
            part = plane[plane["split"] == split]
            yield f"information_plane{suffix}", plot_information_plane(part, split=split, **options)


def figure_to_png(fig: Figure, *, dpi: int = 100) -> bytes:
    """Encode a Figure as PNG bytes (Agg renderer, no backend switch).

    Examples
    --------
    >>> figure_to_png(Figure(figsize=(1, 1)))[:8]
    b'\\x89PNG\\r\\n\\x1a\\n'
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def save_all(
    df: pd.DataFrame,
    out_dir: str | Path,
    *,
    metrics: Sequence[str] | None = None,
    sites: Sequence[str] | None = None,
    info_plane_df: pd.DataFrame | None = None,
    heatmap_metrics: Sequence[str] | None = None,
    x: str = "step",
    steps_per_epoch: float | None = None,
    site_labels: Mapping[str, str] | None = None,
    format: str = "png",
    dpi: int = 100,
    progress: bool = False,
) -> list[Path]:
    """Write the standard figures of a metrics table as files.

    Writes ``heatmap_<metric>.<format>`` for the headline metrics of the registry (normalized entropy,
    distinct fraction, JI to init, wJI to final), ``curves_<metric>.<format>`` for every registered
    metric that is not constant, and ``information_plane.<format>`` when an information-plane table is
    given (or when ``df`` itself holds ``input_information`` and ``mutual_information``). When the
    table holds several splits, every name gets a ``_<split>`` suffix.

    Parameters
    ----------
    df : pandas.DataFrame
        Tidy metrics table (columns ``step, epoch, split, site, site_index, metric, value``).
    out_dir : str or pathlib.Path
        Directory for the files; created if needed. Existing files of the same name are replaced.
    metrics : sequence of str, optional
        Metrics to draw as curves; default every registered, non-constant metric in ``df``
        (alphabetical order). Names not in ``df`` and constant metrics are skipped with a warning.
    sites : sequence of str, optional
        Sites to draw (default all); an unknown name is an error.
    info_plane_df : pandas.DataFrame, optional
        Tidy table with metrics ``input_information`` and ``mutual_information``.
    heatmap_metrics : sequence of str, optional
        Metrics to draw as heatmaps; default the registry's headline metrics (absent ones are skipped
        with an info message).
    x : {"step", "epoch"}, default "step"
        Time axis of all figures (fractional epochs for ``"epoch"``).
    steps_per_epoch : float, optional
        For ``x="epoch"``; estimated from the table when omitted (see :func:`fractional_epochs`).
    site_labels : mapping, optional
        Label of each site (e.g. :func:`describe_sites` for module type and width).
    format : {"png", "pdf", "svg"}, default "png"
    dpi : int, default 100
        Resolution of raster output.
    progress : bool, default False
        Show a ``tqdm`` counter of the figures written.

    Returns
    -------
    list of pathlib.Path
        The files written, in drawing order.

    Raises
    ------
    ValueError
        If ``df`` (or ``info_plane_df``) lacks any of the tidy columns, or ``format``, ``dpi`` or
        ``sites`` is invalid; the message names the problem.

    Examples
    --------
    >>> import tempfile
    >>> df = pd.DataFrame({"step": [0, 5], "epoch": 0, "split": "probe", "site": "a",
    ...                    "site_index": 0, "metric": "normalized_entropy", "value": [0.2, 0.4]})
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     [p.name for p in save_all(df, tmp, format="svg")]
    ['heatmap_normalized_entropy.svg', 'curves_normalized_entropy.svg']
    """
    if format not in FORMATS:
        raise ValueError(f"Expected `format` to be one of {FORMATS}, but got {format!r}.")
    if isinstance(dpi, bool) or not isinstance(dpi, (int, np.integer)) or dpi < 1:
        raise ValueError(f"Expected `dpi` to be a positive int, but got {dpi!r}.")
    out = Path(out_dir)
    written: list[Path] = []
    figures = iter_figures(
        df, metrics=metrics, heatmap_metrics=heatmap_metrics, info_plane_df=info_plane_df, sites=sites, x=x,
        steps_per_epoch=steps_per_epoch, site_labels=site_labels,
    )
    for stem, fig in tqdm(figures, desc="actpat figures", unit="figure", disable=not progress):
        if not written:
            out.mkdir(parents=True, exist_ok=True)
        path = out / f"{stem}.{format}"
        fig.savefig(path, format=format, dpi=dpi)
        written.append(path)
    if not written:
        log.warning("save_all wrote no figure: none of the requested metrics is in the table.")
    return written
