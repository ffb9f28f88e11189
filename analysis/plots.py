"""Figures of the tidy metrics table: site x time heatmaps, per-site curves, information planes.

Every function takes the tidy metrics DataFrame (one row per measured number, columns ``step``,
``epoch``, ``split``, ``site``, ``site_index``, ``metric``, ``value``) and returns a
:class:`matplotlib.figure.Figure`. Figures are built with the object-oriented API
(:class:`~matplotlib.figure.Figure`, never ``pyplot``), so nothing here selects a backend, opens a
window or keeps figures alive in pyplot's registry: the functions are safe in scripts, on headless
machines and in notebooks (where a returned Figure is displayed as usual). Pass ``ax=`` to draw into
an existing axes instead (e.g. one panel of a ``plt.subplots`` grid).

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
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

#: Columns of the tidy metrics table.
METRIC_COLUMNS = ("step", "epoch", "split", "site", "site_index", "metric", "value")

#: Metrics that :func:`save_all` draws as site x time heatmaps (the figures of the paper).
HEADLINE_METRICS = (
    "normalized_entropy",
    "jaccard_init",
    "weighted_jaccard_final",
    "distinct_fraction",
)

_TIME_AXES = ("step", "epoch")

# Readable names of the headline metrics; any other metric is labelled by its own name.
_PRETTY = {
    "normalized_entropy": "normalized entropy H / H_max",
    "jaccard_init": "JI(init, t)",
    "jaccard_last": "JI(last, t)",
    "jaccard_final": "JI(final, t)",
    "weighted_jaccard_init": "wJI(init, t)",
    "weighted_jaccard_last": "wJI(last, t)",
    "weighted_jaccard_final": "wJI(final, t)",
    "distinct_fraction": "distinct patterns K / n",
    "I_XT": "I(X;T)",
    "I_TY": "I(T;Y)",
}

# Metrics in bits: entropies and informations, except the normalized (dimensionless) ones.
_BITS_RE = re.compile(r"(^|_)(entropy|information|mi|bits)($|_)|^(H|I)(_|\(|$)", re.IGNORECASE)
_DIMENSIONLESS_RE = re.compile(r"normali[sz]ed|fraction|ratio|rate", re.IGNORECASE)


def metric_unit(metric: str) -> str:
    """Unit of a metric: ``"bits"`` for entropies and informations, else ``""``.

    Parameters
    ----------
    metric : str
        Metric name as in the ``metric`` column.

    Returns
    -------
    str
        ``"bits"`` or the empty string (counts, fractions and similarities).

    Examples
    --------
    >>> metric_unit("entropy"), metric_unit("I_TY"), metric_unit("normalized_entropy")
    ('bits', 'bits', '')
    """
    if _DIMENSIONLESS_RE.search(metric):
        return ""
    return "bits" if _BITS_RE.search(metric) else ""


def metric_label(metric: str) -> str:
    """Axis or colorbar label of a metric, with its unit in brackets where it has one.

    Examples
    --------
    >>> metric_label("entropy")
    'entropy [bits]'
    >>> metric_label("weighted_jaccard_final")
    'wJI(final, t)'
    """
    unit = metric_unit(metric)
    name = _PRETTY.get(metric, metric)
    return f"{name} [{unit}]" if unit else name


def _check_columns(df: pd.DataFrame, required: Sequence[str] = METRIC_COLUMNS) -> None:
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


def _select(df: pd.DataFrame, metric: str, split: str | None) -> pd.DataFrame:
    """Rows of one metric in one split; errors name what is available."""
    _check_columns(df)
    available = sorted(df["metric"].unique().tolist())
    if metric not in available:
        raise ValueError(f"Expected `metric` to be one of {available}, but got {metric!r}.")
    rows = df[df["metric"] == metric]
    splits = sorted(rows["split"].unique().tolist())
    if split is None:
        if len(splits) > 1:
            raise ValueError(
                f"Metric {metric!r} is present in several splits {splits}; pass `split=` to choose one."
            )
        return rows
    if split not in splits:
        raise ValueError(f"Expected `split` to be one of {splits} for {metric!r}, but got {split!r}.")
    return rows[rows["split"] == split]


def _site_order(rows: pd.DataFrame) -> list[str]:
    """Sites in forward order (ascending ``site_index``, ties by name)."""
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
    table = table.reindex(index=_site_order(rows), columns=sorted(table.columns))
    return table.astype(float)


def _new_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _time_values(rows: pd.DataFrame, steps: Sequence, x: str) -> np.ndarray:
    """Value of the time axis ``x`` at each step (the first recorded epoch of that step)."""
    if x == "step":
        return np.asarray(steps)
    per_step = rows.groupby("step")["epoch"].first()
    return per_step.reindex(steps).to_numpy()


def _format_tick(value) -> str:
    value = float(value)
    return f"{value:g}" if value == int(value) else f"{value:.2f}"


def heatmap(
    df: pd.DataFrame,
    metric: str,
    *,
    split: str | None = None,
    ax: Axes | None = None,
    x: str = "step",
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
) -> Figure:
    """Site x time heatmap of one metric, first layer on top.

    One column per recorded time point (equal widths, as in the paper's figures even when records
    are unevenly spaced); ticks show the ``x`` value of the columns.

    Parameters
    ----------
    df : pandas.DataFrame
        Tidy metrics table (columns ``step, epoch, split, site, site_index, metric, value``).
    metric : str
        Metric to draw, e.g. ``"normalized_entropy"`` or ``"weighted_jaccard_final"``.
    split : str, optional
        Split to draw; required when the metric was recorded in more than one split.
    ax : matplotlib.axes.Axes, optional
        Axes to draw into; a new Figure is created when omitted.
    x : {"step", "epoch"}, default "step"
        Time value printed on the column ticks.
    cmap : str, default "viridis"
        Colormap name.
    vmin, vmax : float, optional
        Colour limits; default to the data range.

    Returns
    -------
    matplotlib.figure.Figure
        Figure with one image of shape ``(n_sites, n_time_points)`` (rows in ``site_index`` order,
        missing cells masked) and a colorbar labelled with the metric and its unit (bits for
        entropies and informations).

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
    rows = _select(df, metric, split)
    steps = list(table.columns)
    n_sites, n_times = table.shape

    fig, ax = _new_axes(ax, (max(4.0, min(12.0, 2.5 + 0.15 * n_times)), max(2.5, 1.5 + 0.3 * n_sites)))
    image = ax.imshow(
        np.ma.masked_invalid(table.to_numpy()),
        aspect="auto",
        interpolation="nearest",
        origin="upper",
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
    )
    ax.set_yticks(np.arange(n_sites), labels=[str(s) for s in table.index])
    times = _time_values(rows, steps, x)
    ticks = np.unique(np.linspace(0, n_times - 1, num=min(n_times, 8)).round().astype(int))
    ax.set_xticks(ticks, labels=[_format_tick(times[i]) for i in ticks])
    ax.set_xlabel(x)
    ax.set_ylabel("site")
    title = metric_label(metric)
    ax.set_title(title if split is None else f"{title} ({split})")
    colorbar = fig.colorbar(image, ax=ax)
    colorbar.set_label(metric_label(metric))
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
    cmap: str = "viridis_r",
    legend: bool = True,
) -> Figure:
    """Per-site curves of one metric over time, coloured by depth.

    Parameters
    ----------
    df : pandas.DataFrame
        Tidy metrics table (columns ``step, epoch, split, site, site_index, metric, value``).
    metric : str
        Metric to draw.
    x : {"step", "epoch"}, default "step"
        Column used as the time axis. ``"epoch"`` plots the recorded epoch values as they are, so
        fractional epochs give a smooth axis and integer epochs stack the records of one epoch.
    split : str, optional
        Split to draw; required when the metric was recorded in more than one split.
    ax : matplotlib.axes.Axes, optional
        Axes to draw into; a new Figure is created when omitted.
    cmap : str, default "viridis_r"
        Sequential colormap; sites get evenly spaced colours in ``site_index`` order.
    legend : bool, default True
        Draw a legend with one entry per site.

    Returns
    -------
    matplotlib.figure.Figure
        Figure with one line per site (label = site name) in ``site_index`` order.

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
    sites = _site_order(rows)
    fig, ax = _new_axes(ax, (6.0, 4.0))
    for site, color in zip(sites, _depth_colors(len(sites), cmap)):
        site_rows = rows[rows["site"] == site].sort_values(["step", "epoch"], kind="stable")
        ax.plot(
            site_rows[x].to_numpy(),
            site_rows["value"].to_numpy(dtype=float),
            color=color,
            label=str(site),
            marker="." if len(site_rows) < 50 else None,
        )
    ax.set_xlabel(x)
    ax.set_ylabel(metric_label(metric))
    ax.set_title(metric if split is None else f"{metric} ({split})")
    if legend and sites:
        ax.legend(fontsize="small", title="site", ncols=1 if len(sites) <= 12 else 2)
    return fig


def plot_information_plane(
    df: pd.DataFrame,
    *,
    split: str | None = None,
    x: str = "step",
    ax: Axes | None = None,
    x_metric: str = "I_XT",
    y_metric: str = "I_TY",
    cmap: str = "viridis",
) -> Figure:
    """Information plane: I(X;T) against I(T;Y) over training, one trajectory per site.

    Parameters
    ----------
    df : pandas.DataFrame
        Tidy table with the metrics ``x_metric`` and ``y_metric`` (the information-plane table).
    split : str, optional
        Split to draw; required when the table holds more than one split.
    x : {"step", "epoch"}, default "step"
        Time column that colours the points.
    ax : matplotlib.axes.Axes, optional
        Axes to draw into; a new Figure is created when omitted.
    x_metric, y_metric : str, default "I_XT", "I_TY"
        Metrics on the horizontal and vertical axes (e.g. Miller-Madow corrected variants).
    cmap : str, default "viridis"
        Colormap of the time colouring.

    Returns
    -------
    matplotlib.figure.Figure
        Figure with one line per site (label = site name, in ``site_index`` order), points coloured
        by time with a colorbar, both axes in bits.

    Notes
    -----
    Plug-in estimates saturate at ``log2 n`` bits for n probe samples; a trajectory pressed against
    that bound says little about compression [2]_.

    Examples
    --------
    >>> df = pd.DataFrame({"step": [0, 0, 5, 5], "epoch": 0, "split": "probe",
    ...                    "site": "a", "site_index": 0, "metric": ["I_XT", "I_TY"] * 2,
    ...                    "value": [1.0, 0.5, 2.0, 0.9]})
    >>> plot_information_plane(df).axes[0].lines[0].get_xydata().tolist()
    [[1.0, 0.5], [2.0, 0.9]]
    """
    _check_time_axis(x)
    tables = {}
    for metric in (x_metric, y_metric):
        tables[metric] = site_time_matrix(df, metric, split=split)
    rows = _select(df, x_metric, split)
    sites = [s for s in tables[x_metric].index if s in tables[y_metric].index]
    steps = sorted(set(tables[x_metric].columns) & set(tables[y_metric].columns))
    times = _time_values(rows, steps, x).astype(float)
    norm = Normalize(vmin=np.nanmin(times), vmax=np.nanmax(times)) if len(times) else Normalize()

    fig, ax = _new_axes(ax, (6.0, 4.5))
    scatter = None
    for site, color in zip(sites, _depth_colors(len(sites), "Greys")):
        xs = tables[x_metric].loc[site, steps].to_numpy(dtype=float)
        ys = tables[y_metric].loc[site, steps].to_numpy(dtype=float)
        keep = np.isfinite(xs) & np.isfinite(ys)
        ax.plot(xs[keep], ys[keep], color=color, linewidth=1.0, label=str(site), zorder=1)
        scatter = ax.scatter(xs[keep], ys[keep], c=times[keep], cmap=cmap, norm=norm, s=16, zorder=2)
    ax.set_xlabel(metric_label(x_metric) if metric_unit(x_metric) else f"{metric_label(x_metric)} [bits]")
    ax.set_ylabel(metric_label(y_metric) if metric_unit(y_metric) else f"{metric_label(y_metric)} [bits]")
    ax.set_title("information plane" if split is None else f"information plane ({split})")
    if scatter is not None:
        fig.colorbar(scatter, ax=ax).set_label(x)
    if sites:
        ax.legend(fontsize="small", title="site")
    return fig


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "unnamed"


def _iter_figures(
    df: pd.DataFrame,
    *,
    metrics: Sequence[str] | None = None,
    heatmap_metrics: Sequence[str] | None = None,
    info_plane_df: pd.DataFrame | None = None,
    x: str = "step",
) -> Iterator[tuple[str, Figure]]:
    """Yield ``(file stem, Figure)`` for everything :func:`save_all` draws.

    Shared with :mod:`actpat.analysis.tensorboard`, which embeds the same figures as images.
    """
    _check_columns(df)
    _check_time_axis(x)
    if info_plane_df is not None:
        _check_columns(info_plane_df)
    present = sorted(df["metric"].unique().tolist())
    splits = sorted(df["split"].unique().tolist())

    def wanted(requested, default, kind):
        explicit = requested is not None
        names = list(default if requested is None else requested)
        for name in names:
            if name not in present:
                (log.warning if explicit else log.info)(
                    "Skipping the %s of metric %r: it is not in the metrics table.", kind, name
                )
        return [name for name in names if name in present]

    heat = wanted(heatmap_metrics, HEADLINE_METRICS, "heatmap")
    line = wanted(metrics, present, "curves")
    for split in splits:
        suffix = "" if len(splits) == 1 else f"_{_safe_name(split)}"
        in_split = set(df.loc[df["split"] == split, "metric"])
        for metric in heat:
            if metric in in_split:
                yield f"heatmap_{_safe_name(metric)}{suffix}", heatmap(df, metric, split=split, x=x)
        for metric in line:
            if metric in in_split:
                yield f"curves_{_safe_name(metric)}{suffix}", curves(df, metric, split=split, x=x)

    plane = info_plane_df
    if plane is None and {"I_XT", "I_TY"} <= set(present):
        plane = df
    if plane is not None:
        plane_metrics = set(plane["metric"])
        if not {"I_XT", "I_TY"} <= plane_metrics:
            log.warning(
                "Skipping the information plane: expected metrics ['I_XT', 'I_TY'], but the table has %s.",
                sorted(plane_metrics),
            )
            return
        plane_splits = sorted(plane.loc[plane["metric"].isin(["I_XT", "I_TY"]), "split"].unique())
        for split in plane_splits:
            suffix = "" if len(plane_splits) == 1 else f"_{_safe_name(split)}"
            yield f"information_plane{suffix}", plot_information_plane(plane, split=split, x=x)


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
    info_plane_df: pd.DataFrame | None = None,
    heatmap_metrics: Sequence[str] | None = None,
    x: str = "step",
    dpi: int = 100,
    progress: bool = False,
) -> list[Path]:
    """Write the standard figures of a metrics table as PNG files.

    Writes ``heatmap_<metric>.png`` for the headline metrics (:data:`HEADLINE_METRICS`:
    normalized entropy, JI to init, wJI to final, distinct fraction), ``curves_<metric>.png`` for
    every metric, and ``information_plane.png`` when an information-plane table is given (or when
    ``df`` itself holds ``I_XT`` and ``I_TY``). When the table holds several splits, every name gets
    a ``_<split>`` suffix.

    Parameters
    ----------
    df : pandas.DataFrame
        Tidy metrics table (columns ``step, epoch, split, site, site_index, metric, value``).
    out_dir : str or pathlib.Path
        Directory for the PNG files; created if needed. Existing files of the same name are replaced.
    metrics : sequence of str, optional
        Metrics to draw as curves; default every metric in ``df`` (alphabetical order). Names not in
        ``df`` are skipped with a logged warning.
    info_plane_df : pandas.DataFrame, optional
        Tidy table with metrics ``I_XT`` and ``I_TY``.
    heatmap_metrics : sequence of str, optional
        Metrics to draw as heatmaps; default :data:`HEADLINE_METRICS` (absent ones are skipped with
        an info message).
    x : {"step", "epoch"}, default "step"
        Time axis of all figures.
    dpi : int, default 100
        Resolution of the PNG files.
    progress : bool, default False
        Show a ``tqdm`` counter of the figures written.

    Returns
    -------
    list of pathlib.Path
        The files written, in drawing order.

    Raises
    ------
    ValueError
        If ``df`` (or ``info_plane_df``) lacks any of the tidy columns; the message names them.

    Examples
    --------
    >>> import tempfile
    >>> df = pd.DataFrame({"step": [0, 5], "epoch": 0, "split": "probe", "site": "a",
    ...                    "site_index": 0, "metric": "normalized_entropy", "value": [0.2, 0.4]})
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     [p.name for p in save_all(df, tmp)]
    ['heatmap_normalized_entropy.png', 'curves_normalized_entropy.png']
    """
    out = Path(out_dir)
    written: list[Path] = []
    figures = _iter_figures(df, metrics=metrics, heatmap_metrics=heatmap_metrics, info_plane_df=info_plane_df, x=x)
    for stem, fig in tqdm(figures, desc="actpat figures", unit="figure", disable=not progress):
        if not written:
            out.mkdir(parents=True, exist_ok=True)
        path = out / f"{stem}.png"
        fig.savefig(path, format="png", dpi=dpi)
        written.append(path)
    if not written:
        log.warning("save_all wrote no figure: none of the requested metrics is in the table.")
    return written
