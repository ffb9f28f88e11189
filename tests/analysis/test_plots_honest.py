"""Figures that cannot mislead (issue 11): no constants drawn, all-NaN series said so, saturated points
marked, fractional epochs, readable legends with 50 sites, round heatmap ticks, site labels, file formats.

Each test inspects the matplotlib artists. Tests named in their docstring fail on the code before issue 11.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from actpat.analysis import plots
from actpat.recorder.reader import open_run
from actpat.recorder.shards import Record, ShardWriter, SiteMeta

COLUMNS = list(plots.METRIC_COLUMNS)


def table(values: dict, *, steps, epochs=None, split="probe") -> pd.DataFrame:
    """Tidy rows from ``{(site, metric): [value per step]}``; site index = order of first appearance."""
    epochs = [0] * len(steps) if epochs is None else epochs
    index = {}
    rows = []
    for (site, name), series in values.items():
        index.setdefault(site, len(index))
        for step, epoch, value in zip(steps, epochs, series):
            rows.append((step, epoch, split, site, index[site], name, value))
    return pd.DataFrame(rows, columns=COLUMNS)


def saturated_markers(ax):
    return [line for line in ax.lines if line.get_gid() == plots.SATURATED_GID]


def test_no_figure_of_a_constant(tmp_path):
    """Fails before issue 11: save_all drew curves of n_units, n_observations, entropy_max, nan_count."""
    steps = [0, 5, 10]
    df = table({("a", "entropy"): [1.0, 2.0, 3.0], ("a", "n_units"): [8.0] * 3, ("a", "n_observations"): [40.0] * 3,
                ("a", "entropy_max"): [3.0] * 3, ("a", "nan_count"): [0.0] * 3, ("a", "saturated"): [0.0] * 3},
               steps=steps)
    names = [p.name for p in plots.save_all(df, tmp_path)]
    assert names == ["curves_entropy.png"]
    assert not [p for p in plots.save_all(df, tmp_path / "explicit", metrics=["n_units", "saturated"])]
    for name in ("n_units", "saturated"):
        with pytest.raises(ValueError, match="declared constant"):
            plots.curves(df, name)
        with pytest.raises(ValueError, match="declared constant"):
            plots.heatmap(df, name)


def test_saturated_points_are_marked_in_curves_and_heatmaps():
    """Fails before issue 11: nothing marked the points whose estimate is pinned at log2 n."""
    steps = [0, 10, 20, 30]
    df = table({
        ("a", "entropy"): [1.0, 2.0, 3.0, 3.1], ("b", "entropy"): [0.5, 1.0, 1.5, 2.0],
        ("a", "saturated"): [0.0, 0.0, 1.0, 1.0], ("b", "saturated"): [0.0, 0.0, 0.0, 1.0],
        ("a", "jaccard_init"): [1.0, 0.5, 0.4, 0.3], ("b", "jaccard_init"): [1.0, 0.6, 0.5, 0.4],
    }, steps=steps)
    ax = plots.curves(df, "entropy").axes[0]
    (marks,) = saturated_markers(ax)
    assert sorted(map(tuple, marks.get_xydata().tolist())) == [(20.0, 3.0), (30.0, 2.0), (30.0, 3.1)]
    assert marks.get_label() in [t.get_text() for t in ax.get_legend().get_texts()]
    ax = plots.heatmap(df, "entropy").axes[0]
    (marks,) = saturated_markers(ax)
    # (column, row): site a is row 0, site b row 1.
    assert sorted(map(tuple, marks.get_xydata().tolist())) == [(2.0, 0.0), (3.0, 0.0), (3.0, 1.0)]
    # A similarity does not saturate with K: nothing is marked on it.
    assert not saturated_markers(plots.curves(df, "jaccard_init").axes[0])
    assert not saturated_markers(plots.heatmap(df, "jaccard_init").axes[0])


def test_width_controlled_entropies_are_marked_by_their_own_flag():
    """entropy_wc is pinned where the m-unit subsets are (saturated_wc), not where the full layer is."""
    steps = [0, 10, 20]
    df = table({
        ("a", "entropy_wc"): [1.0, 2.0, 2.5], ("a", "saturated_wc"): [0.0, 1.0, 1.0],
        ("a", "entropy"): [1.0, 3.0, 4.0], ("a", "saturated"): [0.0, 0.0, 1.0],
    }, steps=steps)
    (marks,) = saturated_markers(plots.curves(df, "entropy_wc").axes[0])
    assert sorted(map(tuple, marks.get_xydata().tolist())) == [(10.0, 2.0), (20.0, 2.5)]
    (marks,) = saturated_markers(plots.heatmap(df, "entropy_wc").axes[0])
    assert sorted(map(tuple, marks.get_xydata().tolist())) == [(1.0, 0.0), (2.0, 0.0)]
    (marks,) = saturated_markers(plots.curves(df, "entropy").axes[0])
    assert marks.get_xydata().tolist() == [[20.0, 4.0]]


def test_saturated_points_are_marked_in_the_information_plane():
    """Fails before issue 11: the information plane drew saturated points like any other."""
    steps = [0, 10, 20]
    df = table({
        ("fc", "input_information"): [2.0, 4.0, 5.9], ("fc", "mutual_information"): [0.2, 0.6, 0.99],
        ("fc", "saturated"): [0.0, 0.0, 1.0],
    }, steps=steps)
    ax = plots.plot_information_plane(df).axes[0]
    (marks,) = saturated_markers(ax)
    assert marks.get_xydata().tolist() == [[5.9, 0.99]]
    # ... and in the figure of I(A;L) over time.
    (marks,) = saturated_markers(plots.curves(df, "mutual_information").axes[0])
    assert marks.get_xydata().tolist() == [[20.0, 0.99]]


def test_all_nan_series_are_labelled_with_the_reason():
    """Fails before issue 11: an all-NaN series was an empty line with the site's plain name."""
    steps = [0, 10, 20]
    nan = [math.nan] * 3
    df = table({("a", "jaccard_t_init"): [1.0, 0.5, 0.2], ("b", "jaccard_t_init"): nan}, steps=steps)
    ax = plots.curves(df, "jaccard_t_init").axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["a", "b (all NaN: no pattern seen more than T times at either step)"]
    heat = plots.heatmap(df, "jaccard_t_init").axes[0]
    assert [t.get_text() for t in heat.get_yticklabels()] == ["a", "b (all NaN)"]
    assert "no pattern seen more than T times" in heat.get_title()
    everything = table({("a", "jaccard_t_init"): nan, ("b", "jaccard_t_init"): nan}, steps=steps)
    ax = plots.curves(everything, "jaccard_t_init").axes[0]
    assert "all NaN (no pattern seen more than T times at either step)" in ax.get_title()
    assert any("all NaN" in t.get_text() for t in ax.texts)
    assert "all NaN" in plots.heatmap(everything, "jaccard_t_init").axes[0].get_title()


def test_epoch_axis_is_fractional():
    """Fails before issue 11: probes of one epoch stacked on the integer epoch."""
    steps = [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    epochs = [s // 10 for s in steps]
    epochs[-1] = 1  # the end-of-epoch probe is recorded with the epoch that just ended
    df = table({("a", "entropy"): np.linspace(0, 1, len(steps))}, steps=steps, epochs=epochs)
    xs = plots.curves(df, "entropy", x="epoch").axes[0].lines[0].get_xdata()
    np.testing.assert_allclose(xs, np.array(steps) / 10)
    assert len(set(xs)) == len(steps)
    np.testing.assert_allclose(plots.fractional_epochs(steps, epochs, steps_per_epoch=10), np.array(steps) / 10)
    # A steps_per_epoch that does not fit the records keeps each record inside its own epoch.
    np.testing.assert_allclose(plots.fractional_epochs(steps, epochs, steps_per_epoch=20), [
        0, 0.1, 0.2, 0.3, 0.4, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5])
    # One epoch only: its span plus one gap is the estimate.
    np.testing.assert_allclose(plots.fractional_epochs([0, 5, 10, 15], [0, 0, 0, 0]), [0, 0.25, 0.5, 0.75])
    with pytest.raises(ValueError, match="epoch -1"):
        plots.fractional_epochs([0, 5], [-1, -1])


def test_epoch_axis_places_the_callbacks_probes_at_their_steps():
    # The callback's probes, 10 steps per epoch, every 0.5 epoch: the probe at an epoch's end (steps 10, 20) carries
    # the epoch that ended, so epoch 1's first record (step 15) is not its start (step 10).
    steps, epochs = [0, 5, 10, 15, 20], [0, 0, 0, 1, 1]
    np.testing.assert_allclose(plots.fractional_epochs(steps, epochs, steps_per_epoch=10), [0, 0.5, 1.0, 1.5, 2.0])
    # Gradient accumulation, 8 optimizer steps per epoch, probes every 0.5 epoch.
    steps, epochs = [0, 4, 8, 12, 16], [0, 0, 0, 1, 1]
    np.testing.assert_allclose(plots.fractional_epochs(steps, epochs, steps_per_epoch=8), [0, 0.5, 1.0, 1.5, 2.0])
    # Probes every 3 steps of 10-step epochs: no record at epoch 1's or 2's start.
    steps = [0, 3, 6, 9, 12, 15, 18, 21]
    np.testing.assert_allclose(plots.fractional_epochs(steps, [s // 10 for s in steps], steps_per_epoch=10),
                               np.array(steps) / 10)
    # Epochs of different lengths (gradient accumulation changed during the run): each stays in its epoch.
    np.testing.assert_allclose(plots.fractional_epochs([0, 5, 10, 15, 20, 25], [0, 0, 1, 1, 2, 3]),
                               [0, 0.5, 1, 1.5, 2, 3])
    with pytest.raises(ValueError, match="steps_per_epoch"):
        plots.fractional_epochs([0, 5], [0, 0], steps_per_epoch=0)


def test_fifty_sites_get_a_legend_beside_the_axes():
    """Fails before issue 11: 50 legend entries were drawn over the curves, inside the axes."""
    steps = [0, 10, 20]
    df = table({(f"stage{i // 10}.block{i % 10}.relu", "entropy"): [i, i + 1.0, i + 2.0] for i in range(50)},
               steps=steps)
    fig = plots.curves(df, "entropy")
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert len(legend.get_texts()) == 50
    FigureCanvasAgg(fig).draw()
    legend_box, axes_box = legend.get_window_extent(), ax.get_window_extent()
    assert legend_box.x0 >= axes_box.x1  # beside, not over, the data
    assert legend_box.y0 >= 0 and legend_box.x1 <= fig.bbox.x1 + 1  # and inside the figure
    texts = sorted((t.get_window_extent() for t in legend.get_texts()), key=lambda b: (b.x0, b.y0))
    assert not any(a.overlaps(b) for a, b in zip(texts, texts[1:]))


def test_heatmap_ticks_at_round_steps():
    """Fails before issue 11: ticks printed the raw steps of evenly spaced columns (37, 113, ...)."""
    steps = [0, 37, 113, 260, 511, 999, 1234]
    df = table({("a", "entropy"): np.arange(7.0), ("b", "entropy"): np.arange(7.0)}, steps=steps)
    ax = plots.heatmap(df, "entropy").axes[0]
    values = [float(t.get_text()) for t in ax.get_xticklabels()]
    assert len(values) >= 3
    # Round values: multiples of one step of 1, 2, 2.5 or 5 times a power of ten.
    unit = min(np.diff(values))
    exponent = 10 ** math.floor(math.log10(unit))
    assert any(all(v % (m * exponent) == 0 for v in values) for m in (1, 2, 2.5, 5))
    # Each tick sits where its step falls between the columns around it, and no two labels crowd.
    np.testing.assert_allclose(ax.get_xticks(), np.interp(values, steps, np.arange(len(steps))))
    assert np.all(np.diff(ax.get_xticks()) >= 1.0)


def test_site_labels_show_module_type_and_width(tmp_path):
    writer = ShardWriter(tmp_path)
    writer.start()
    conv = SiteMeta("features.0", 0, "ReLU", (16, 4, 4), 16, "channel")
    dense = SiteMeta("fc", 1, "LeakyReLU", (10,), 10, "flat")
    for meta, n_positions in ((conv, 16), (dense, 1)):
        bits = np.zeros((2 * n_positions, (meta.n_units + 7) // 8), np.uint8)
        writer.put(Record(meta, 0, 0, "probe", bits, n_positions, 2, 0))
    writer.close()
    labels = plots.describe_sites(open_run(tmp_path))
    assert labels == {"features.0": "features.0 (ReLU, 16)", "fc": "fc (LeakyReLU, 10)"}
    df = table({("features.0", "entropy"): [1.0, 2.0], ("fc", "entropy"): [0.5, 1.0]}, steps=[0, 1])
    ax = plots.heatmap(df, "entropy", site_labels=labels).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(labels.values())
    ax = plots.curves(df, "entropy", site_labels=labels).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(labels.values())


@pytest.mark.parametrize("fmt, magic", [("pdf", b"%PDF"), ("svg", b"<?xml"), ("png", b"\x89PNG")])
def test_save_all_formats_dpi_and_site_selection(tmp_path, fmt, magic):
    steps = [0, 10]
    df = table({(s, "entropy"): [1.0, 2.0] for s in ("a", "b", "c")}, steps=steps)
    paths = plots.save_all(df, tmp_path, metrics=["entropy"], heatmap_metrics=[], sites=["a", "c"], format=fmt, dpi=50)
    assert [p.name for p in paths] == [f"curves_entropy.{fmt}"]
    assert paths[0].read_bytes().startswith(magic)
    if fmt == "svg":
        text = paths[0].read_text()
        assert ">a<" in text or "a</" in text or "\n" in text  # the file is SVG text
    figures = dict(plots.iter_figures(df, metrics=["entropy"], heatmap_metrics=[], sites=["a", "c"]))
    assert [line.get_label() for line in figures["curves_entropy"].axes[0].lines] == ["a", "c"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"format": "jpg"}, r"`format` to be one of \('png', 'pdf', 'svg'\), but got 'jpg'"),
        ({"dpi": 0}, "`dpi` to be a positive int, but got 0"),
        ({"sites": ["nope"]}, r"`sites` among the table's sites \['a'\], but got \['nope'\]"),
    ],
)
def test_save_all_validation(tmp_path, kwargs, match):
    df = table({("a", "entropy"): [1.0, 2.0]}, steps=[0, 1])
    with pytest.raises(ValueError, match=match):
        plots.save_all(df, tmp_path, **kwargs)
    assert not list(tmp_path.iterdir())
