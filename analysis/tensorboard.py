"""Offline TensorBoard export of the tidy metrics table, without torch or TensorFlow.

:func:`to_tensorboard` writes one TensorBoard run with

- scalars ``actpat/<metric>/<site>`` at ``global_step = step``;
- a custom-scalars layout (the *Custom Scalars* dashboard): one multiline chart per metric with all of
  its sites, grouped into categories by the metric's family in the registry
  (:mod:`actpat.analysis.metrics`); metrics declared constant (``n_units``, ``saturated``, ...) are
  table columns and are not exported;
- histograms ``actpat/firing_rate/<site>`` of the per-unit firing rates, when given;
- the figures of :func:`actpat.analysis.plots.save_all` as images ``actpat/figures/<name>``.

Events are written with TensorBoard's own ``EventFileWriter`` and protocol buffers, so this module
needs neither torch nor TensorFlow.
"""

from __future__ import annotations

import logging
import re
import struct
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalar_metadata
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tqdm.auto import tqdm

from actpat.analysis import plots
from actpat.analysis.metrics import FAMILIES, METRICS, metric

log = logging.getLogger(__name__)

#: Prefix of every tag written by :func:`to_tensorboard`.
TAG_PREFIX = "actpat"
#: Default run directory name under ``logdir``.
DEFAULT_RUN_NAME = "actpat-offline"
#: Default number of equal-width firing-rate histogram buckets over [0, 1].
HISTOGRAM_BINS = 20

_EVENT_GLOB = "events.out.tfevents.*"


def scalar_tag(metric: str, site: str) -> str:
    """Tag of the scalar series of one metric at one site: ``actpat/<metric>/<site>``."""
    return f"{TAG_PREFIX}/{metric}/{site}"


def _layout(df: pd.DataFrame) -> layout_pb2.Layout:
    """One multiline chart per metric (sites in forward order) in categories by registry family."""
    charts: dict[str, list[layout_pb2.Chart]] = defaultdict(list)
    for name in sorted(df["metric"].unique().tolist()):
        rows = df[df["metric"] == name]
        regexes = [f"^{re.escape(scalar_tag(name, site))}$" for site in plots.site_order(rows)]
        chart = layout_pb2.Chart(title=name, multiline=layout_pb2.MultilineChartContent(tag=regexes))
        charts[metric(name).family].append(chart)
    categories = [
        layout_pb2.Category(title=family, chart=charts[family]) for family in FAMILIES if charts[family]
    ]
    return layout_pb2.Layout(category=categories)


def _layout_summary(layout: layout_pb2.Layout) -> summary_pb2.Summary:
    """The summary ``tensorboard.plugins.custom_scalar.summary.pb`` builds, without TensorFlow."""
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(),
        string_val=[layout.SerializeToString()],
    )
    value = summary_pb2.Summary.Value(
        tag=custom_scalar_metadata.CONFIG_SUMMARY_TAG,
        metadata=custom_scalar_metadata.create_summary_metadata(),
        tensor=tensor,
    )
    return summary_pb2.Summary(value=[value])


def _histogram(values: np.ndarray, bins: int = HISTOGRAM_BINS) -> summary_pb2.HistogramProto:
    """TensorBoard histogram: bucket ``i`` counts values in ``(bucket_limit[i-1], bucket_limit[i]]``.

    Edges are ``bins`` equal-width buckets over [0, 1] (widened if values fall outside); the first
    bucket, ``(-inf, lower edge]``, holds exactly the values at the lower edge (dead units).
    """
    lo = min(0.0, float(values.min()))
    hi = max(1.0, float(values.max()))
    edges = np.linspace(lo, hi, bins + 1)
    index = np.searchsorted(edges, values, side="left")
    counts = np.bincount(index, minlength=edges.size)
    return summary_pb2.HistogramProto(
        min=float(values.min()),
        max=float(values.max()),
        num=float(values.size),
        sum=float(values.sum()),
        sum_squares=float(np.square(values).sum()),
        bucket_limit=edges.tolist(),
        bucket=counts.astype(float).tolist(),
    )


def _normalize_unit_rates(unit_rates) -> dict[int, dict[str, np.ndarray]]:
    """``{step: {site: rates}}`` from either accepted form, validated."""
    out: dict[int, dict[str, np.ndarray]] = defaultdict(dict)
    if isinstance(unit_rates, pd.DataFrame):
        missing = [c for c in ("site", "step", "rate") if c not in unit_rates.columns]
        if missing:
            raise ValueError(
                "Expected `unit_rates` DataFrame to have columns ['site', 'step', 'rate'] "
                f"(one row per unit), but it is missing {missing}."
            )
        if "unit" in unit_rates.columns:
            unit_rates = unit_rates.sort_values(["site", "step", "unit"], kind="stable")
        for (site, step), rows in unit_rates.groupby(["site", "step"], sort=False):
            out[int(step)][str(site)] = rows["rate"].to_numpy(dtype=np.float64)
    elif isinstance(unit_rates, Mapping):
        for site, per_step in unit_rates.items():
            if not isinstance(per_step, Mapping):
                raise TypeError(
                    "Expected `unit_rates[site]` to be a mapping step -> 1-D array of firing rates, "
                    f"but got {type(per_step).__name__} for site {site!r}."
                )
            for step, rates in per_step.items():
                array = np.asarray(rates, dtype=np.float64)
                if array.ndim != 1 or array.size == 0:
                    raise ValueError(
                        "Expected `unit_rates[site][step]` to be a non-empty 1-D array of shape "
                        f"(n_units,), but got shape {array.shape} for site {site!r} at step {step}."
                    )
                out[int(step)][str(site)] = array
    else:
        raise TypeError(
            "Expected `unit_rates` to be a mapping site -> {step: rates} or a DataFrame with columns "
            f"site, step, rate, but got {type(unit_rates).__name__}."
        )
    for step, per_site in out.items():
        for site, array in per_site.items():
            if not np.all(np.isfinite(array)):
                raise ValueError(
                    f"Expected finite firing rates, but site {site!r} at step {step} has "
                    f"{int((~np.isfinite(array)).sum())} non-finite values."
                )
    return out


def _png_size(png: bytes) -> tuple[int, int]:
    """``(width, height)`` from the IHDR chunk of a PNG."""
    return struct.unpack(">II", png[16:24])


def _existing_events(run_dir: Path) -> list[Path]:
    return sorted(run_dir.rglob(_EVENT_GLOB)) if run_dir.is_dir() else []


def _write_run(
    run_dir: Path,
    df: pd.DataFrame,
    rates: dict[int, dict[str, np.ndarray]],
    images: list[tuple[str, bytes]],
    image_step: int,
    progress: bool = False,
) -> None:
    """Write one run: layout, then per step (ascending) scalars + histograms, then the images."""
    scalars = df.dropna(subset=["value"])
    by_step = {int(step): rows for step, rows in scalars.groupby("step", sort=True)}
    steps = sorted(set(by_step) | set(rates))
    writer = EventFileWriter(str(run_dir), max_queue_size=100, flush_secs=120)
    try:
        start = min(steps) if steps else 0
        writer.add_event(
            event_pb2.Event(wall_time=time.time(), step=start, summary=_layout_summary(_layout(df)))
        )
        for step in tqdm(steps, desc=f"actpat events {run_dir.name}", unit="step", disable=not progress):
            values = []
            if step in by_step:
                rows = by_step[step]
                for metric, site, value in zip(rows["metric"], rows["site"], rows["value"]):
                    values.append(
                        summary_pb2.Summary.Value(tag=scalar_tag(metric, site), simple_value=float(value))
                    )
            for site, array in rates.get(step, {}).items():
                values.append(
                    summary_pb2.Summary.Value(
                        tag=f"{TAG_PREFIX}/firing_rate/{site}", histo=_histogram(array)
                    )
                )
            writer.add_event(
                event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=values))
            )
        for name, png in images:
            width, height = _png_size(png)
            image = summary_pb2.Summary.Image(
                height=height, width=width, colorspace=4, encoded_image_string=png
            )
            value = summary_pb2.Summary.Value(tag=f"{TAG_PREFIX}/figures/{name}", image=image)
            writer.add_event(
                event_pb2.Event(
                    wall_time=time.time(), step=image_step, summary=summary_pb2.Summary(value=[value])
                )
            )
        writer.flush()
    finally:
        writer.close()


def to_tensorboard(
    df: pd.DataFrame,
    logdir: str | Path,
    *,
    run_name: str | None = None,
    figures: bool | Sequence[str | Path] = True,
    unit_rates=None,
    info_plane_df: pd.DataFrame | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write a metrics table to TensorBoard event files, for offline runs or re-analysis.

    Parameters
    ----------
    df : pandas.DataFrame
        Tidy metrics table (columns ``step, epoch, split, site, site_index, metric, value``). Each
        row becomes the scalar ``actpat/<metric>/<site>`` at ``global_step = step``; NaN values
        (e.g. similarity to ``last`` at the first record) are skipped.
    logdir : str or pathlib.Path
        TensorBoard log directory (what ``tensorboard --logdir`` is pointed at).
    run_name : str, optional
        Name of the run subdirectory ``logdir/<run_name>``; default ``"actpat-offline"``.
    figures : bool or sequence of paths, default True
        Also embed the figures of :func:`actpat.analysis.plots.save_all` as PNG images
        ``actpat/figures/<name>`` at the last step of ``df``. A sequence of PNG files (what ``save_all``
        returned) is embedded as it is, named by file stem, without drawing the figures again; with
        several splits these go with the first split's run.
    unit_rates : mapping or pandas.DataFrame, optional
        Per-unit firing rates (fraction of observations in which the unit is on, in [0, 1]) written
        as histograms ``actpat/firing_rate/<site>``. Either a mapping
        ``{site: {step: rates}}`` where ``rates`` is a 1-D array of shape ``(n_units,)`` of that
        site, or a DataFrame with one row per unit and columns ``site``, ``step``, ``rate``
        (optionally ``unit`` to fix the order). Buckets are :data:`HISTOGRAM_BINS` equal-width bins
        over [0, 1]; the first bucket holds exactly the dead units (rate 0). With several splits
        the histograms go into the run of the first split (in sorted order).
    info_plane_df : pandas.DataFrame, optional
        Information-plane table (metrics ``input_information``, ``mutual_information``) for its figure.
    overwrite : bool, default False
        Delete the event files already in the run directory instead of raising.
    progress : bool, default False
        Show ``tqdm`` progress of the figures drawn and the steps written.

    Returns
    -------
    pathlib.Path
        The run directory. When ``df`` holds several splits, each split is written as its own run
        ``<run dir>/<split>`` (TensorBoard overlays runs in one chart), each with the same tags.

    Raises
    ------
    FileExistsError
        If the run directory already holds event files and ``overwrite`` is False: appending would
        duplicate every point, so pass a new ``run_name``, delete the directory, or
        ``overwrite=True``.
    ValueError
        If columns are missing, a metric is not registered in :mod:`actpat.analysis.metrics` (its
        family is unknown: declare it with ``register``), or a (split, metric, site, step) has more
        than one value.

    Notes
    -----
    Only TensorBoard's own event writer and protocol buffers are used (no torch, no TensorFlow).
    The custom-scalars layout has one multiline chart per metric listing the anchored tag of every
    site, in categories by the metric's registered family (:data:`actpat.analysis.metrics.FAMILIES`
    order). Metrics declared constant are not exported (they are columns of the table, not curves).

    Examples
    --------
    >>> import tempfile
    >>> df = pd.DataFrame({"step": [0, 5], "epoch": 0, "split": "probe", "site": "fc1",
    ...                    "site_index": 0, "metric": "entropy", "value": [1.5, 2.0]})
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     to_tensorboard(df, tmp, run_name="demo", figures=False).name
    'demo'
    """
    plots.check_columns(df)
    if info_plane_df is not None:
        plots.check_columns(info_plane_df)
    if df.empty:
        raise ValueError("Expected a non-empty metrics DataFrame, but got 0 rows.")
    unregistered = sorted(set(df["metric"]) - set(METRICS))
    if unregistered:
        raise ValueError(
            f"Expected registered metrics (their TensorBoard family comes from the registry), but got {unregistered}; "
            "declare them with actpat.analysis.metrics.register(MetricSpec(...))."
        )
    dup = df.duplicated(["split", "metric", "site", "step"], keep=False)
    if dup.any():
        first = df[dup].iloc[0]
        raise ValueError(
            "Expected one value per (split, metric, site, step), but got "
            f"{int(dup.sum())} duplicated rows, e.g. {first['metric']!r} at site {first['site']!r}, "
            f"step {int(first['step'])}."
        )
    name = DEFAULT_RUN_NAME if run_name is None else str(run_name)
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"Expected `run_name` to be a plain directory name, but got {run_name!r}.")
    run_dir = Path(logdir) / name
    existing = _existing_events(run_dir)
    if existing:
        if not overwrite:
            raise FileExistsError(
                f"Run directory {str(run_dir)!r} already contains {len(existing)} TensorBoard event "
                "file(s); writing again would duplicate every point. Pass a new `run_name`, delete "
                "the directory, or use `overwrite=True` to replace them."
            )
        for path in existing:
            path.unlink()
        log.info("Removed %d old event file(s) from %s.", len(existing), run_dir)
    rates = _normalize_unit_rates(unit_rates) if unit_rates is not None else {}
    splits = sorted(df["split"].unique().tolist())
    for split in splits:
        part = df[df["split"] == split]
        target = run_dir if len(splits) == 1 else run_dir / plots.safe_name(split)
        images: list[tuple[str, bytes]] = []
        if not isinstance(figures, bool):
            if split == splits[0]:
                images = [(Path(path).stem, Path(path).read_bytes()) for path in figures]
        elif figures:
            plane = None
            if info_plane_df is not None:
                plane = info_plane_df
                if len(splits) > 1 and split in set(info_plane_df["split"]):
                    plane = info_plane_df[info_plane_df["split"] == split]
            drawn = plots.iter_figures(part, info_plane_df=plane)
            for stem, fig in tqdm(drawn, desc="actpat figures", unit="figure", disable=not progress):
                images.append((stem, plots.figure_to_png(fig)))
        target.mkdir(parents=True, exist_ok=True)
        # Firing-rate histograms are not split-specific; they go with the first split's run.
        scalars = part[~part["metric"].map(lambda name: metric(name).constant)]
        _write_run(target, scalars, rates if split == splits[0] else {}, images, int(part["step"].max()), progress)
    return run_dir
