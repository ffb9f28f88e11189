"""Tests of actpat.analysis.plots on a synthetic tidy metrics table."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from actpat.analysis import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Deliberately not in alphabetical order: rows must follow site_index.
SITES = [("stem.relu", 0), ("block2.relu", 2), ("block1.relu", 1), ("head.relu", 3)]
STEPS = [0, 10, 20, 30, 40]
METRICS = ["normalized_entropy", "jaccard_init", "weighted_jaccard_final", "distinct_fraction", "entropy"]


def make_df(splits=("probe",), metrics=METRICS, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for split in splits:
        for step in STEPS:
            for site, index in SITES:
                for metric in metrics:
                    rows.append((step, step // 20, split, site, index, metric, float(rng.random())))
    df = pd.DataFrame(rows, columns=list(plots.METRIC_COLUMNS))
    return df.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # order must not matter


def make_plane_df() -> pd.DataFrame:
    rows = []
    for step in STEPS:
        for site, index in SITES:
            rows.append((step, step // 20, "probe", site, index, "input_information", 1.0 + index + step / 100))
            rows.append((step, step // 20, "probe", site, index, "mutual_information", 0.1 * index + step / 200))
    return pd.DataFrame(rows, columns=list(plots.METRIC_COLUMNS))


def expected_pivot(df, metric, split="probe"):
    rows = df[(df.metric == metric) & (df.split == split)]
    order = [s for s, _ in sorted(SITES, key=lambda t: t[1])]
    return rows.pivot(index="site", columns="step", values="value").reindex(index=order, columns=STEPS)


def test_heatmap_image_is_pivot_in_site_index_order():
    df = make_df()
    fig = plots.heatmap(df, "normalized_entropy")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    (image,) = ax.images
    data = np.asarray(image.get_array())
    assert data.shape == (len(SITES), len(STEPS))
    truth = expected_pivot(df, "normalized_entropy")
    np.testing.assert_array_equal(data, truth.to_numpy())
    assert [t.get_text() for t in ax.get_yticklabels()] == list(truth.index)
    assert ax.get_yticklabels()[0].get_text() == "stem.relu"  # first layer on top
    assert ax.yaxis_inverted()  # origin="upper": row 0 drawn at the top
    colorbar_axes = fig.axes[1]
    assert colorbar_axes.get_ylabel() == "H(A) / H_max"  # the registry's symbol


def test_heatmap_entropy_colorbar_in_bits_and_epoch_ticks():
    df = make_df()
    fig = plots.heatmap(df, "entropy", x="epoch")
    assert fig.axes[1].get_ylabel() == "H(A) [bits]"
    ax = fig.axes[0]
    assert ax.get_xlabel() == "epoch"
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[0] == "0" and labels[-1] == "2"
    # Steps 0..40 at 20 steps per epoch: fractional epoch e sits at column 2 e.
    ticks = {t.get_text(): pos for t, pos in zip(ax.get_xticklabels(), ax.get_xticks())}
    assert ticks["1"] == pytest.approx(2.0) and ticks["2"] == pytest.approx(4.0)


def test_heatmap_missing_cells_are_masked():
    df = make_df()
    df = df[~((df.site == "head.relu") & (df.step == 20))]
    data = plots.heatmap(df, "jaccard_init").axes[0].images[0].get_array()
    assert data.mask[3, 2] and data.mask.sum() == 1


def test_heatmap_into_given_axes():
    df = make_df()
    fig = Figure()
    ax = fig.add_subplot()
    assert plots.heatmap(df, "entropy", ax=ax) is fig


def test_heatmap_split_selection():
    df = make_df(splits=("probe", "train"))
    with pytest.raises(ValueError, match="several splits"):
        plots.heatmap(df, "entropy")
    fig = plots.heatmap(df, "entropy", split="train")
    np.testing.assert_array_equal(
        fig.axes[0].images[0].get_array(), expected_pivot(df, "entropy", "train").to_numpy()
    )
    with pytest.raises(ValueError, match="`split`"):
        plots.heatmap(df, "entropy", split="val")


def test_heatmap_duplicates_rejected():
    df = make_df()
    with pytest.raises(ValueError, match="duplicated"):
        plots.heatmap(pd.concat([df, df.iloc[:1]]), df.iloc[0]["metric"])


def test_curves_one_line_per_site_in_depth_order():
    df = make_df()
    fig = plots.curves(df, "jaccard_init")
    ax = fig.axes[0]
    ordered = [s for s, _ in sorted(SITES, key=lambda t: t[1])]
    assert [line.get_label() for line in ax.lines] == ordered
    truth = expected_pivot(df, "jaccard_init")
    for line, site in zip(ax.lines, ordered):
        np.testing.assert_array_equal(line.get_xdata(), STEPS)
        np.testing.assert_array_equal(line.get_ydata(), truth.loc[site].to_numpy())
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ordered
    colors = [line.get_color() for line in ax.lines]
    assert len(set(map(tuple, colors))) == len(SITES)
    fig = plots.curves(df, "jaccard_init", x="epoch")  # fractional epochs: 20 steps per epoch
    np.testing.assert_allclose(fig.axes[0].lines[0].get_xdata(), np.array(STEPS) / 20.0)


def test_information_plane_trajectories():
    df = make_plane_df()
    fig = plots.plot_information_plane(df)
    ax = fig.axes[0]
    assert len(ax.lines) == len(SITES) and len(ax.collections) == len(SITES)
    first = ax.lines[0]
    assert first.get_label() == "stem.relu"
    np.testing.assert_allclose(first.get_xdata(), [1.0 + s / 100 for s in STEPS])
    np.testing.assert_allclose(first.get_ydata(), [s / 200 for s in STEPS])
    np.testing.assert_array_equal(ax.collections[0].get_array(), STEPS)  # coloured by time
    assert "bits" in ax.get_xlabel() and "bits" in ax.get_ylabel()
    assert fig.axes[1].get_ylabel() == "step"  # colorbar
    with pytest.raises(ValueError, match="mutual_information"):
        plots.plot_information_plane(df[df.metric == "input_information"])


def test_missing_columns_and_metric():
    df = make_df()
    for function in (lambda d: plots.heatmap(d, "entropy"), lambda d: plots.curves(d, "entropy")):
        with pytest.raises(ValueError, match=r"missing \['site_index'\]"):
            function(df.drop(columns="site_index"))
    with pytest.raises(ValueError, match="'nope'"):
        plots.heatmap(df, "nope")
    with pytest.raises(ValueError, match="`x`"):
        plots.curves(df, "entropy", x="time")


def test_save_all_writes_pngs(tmp_path, caplog):
    df = make_df(metrics=["normalized_entropy", "jaccard_init", "entropy"])
    with caplog.at_level(logging.INFO, logger=plots.__name__):
        paths = plots.save_all(df, tmp_path / "figs", info_plane_df=make_plane_df())
    names = [p.name for p in paths]
    assert names == [
        "heatmap_normalized_entropy.png",
        "heatmap_jaccard_init.png",
        "curves_entropy.png",
        "curves_jaccard_init.png",
        "curves_normalized_entropy.png",
        "information_plane.png",
    ]
    for path in paths:
        data = path.read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_MAGIC
    skipped = " ".join(r.getMessage() for r in caplog.records)
    assert "weighted_jaccard_final" in skipped and "distinct_fraction" in skipped


def test_save_all_metric_selection_and_splits(tmp_path, caplog):
    df = make_df(splits=("probe", "train"), metrics=["entropy", "jaccard_init"])
    with caplog.at_level(logging.WARNING, logger=plots.__name__):
        paths = plots.save_all(df, tmp_path, metrics=["entropy", "missing_metric"])
    assert sorted(p.name for p in paths) == sorted(
        [
            "heatmap_jaccard_init_probe.png",
            "heatmap_jaccard_init_train.png",
            "curves_entropy_probe.png",
            "curves_entropy_train.png",
        ]
    )
    assert any("missing_metric" in r.getMessage() for r in caplog.records)


def test_save_all_rejects_missing_columns(tmp_path):
    df = make_df().drop(columns=["epoch", "split"])
    with pytest.raises(ValueError, match=r"missing \['epoch', 'split'\]"):
        plots.save_all(df, tmp_path)
    with pytest.raises(ValueError, match=r"missing \['value'\]"):
        plots.save_all(make_df(), tmp_path, info_plane_df=make_plane_df().drop(columns="value"))
    assert not list(tmp_path.iterdir())


def test_labels_come_from_the_registry():
    assert plots.metric_label("entropy") == "H(A) [bits]"
    assert plots.metric_label("input_information") == "I(X;T) [bits]"
    assert plots.metric_label("mutual_information") == "I(A;L) [bits]"
    for name in ("normalized_entropy", "jaccard_init", "distinct_fraction"):
        assert "[" not in plots.metric_label(name)  # dimensionless
    with pytest.raises(KeyError, match="registered metric name"):
        plots.metric_label("firing_rate")
