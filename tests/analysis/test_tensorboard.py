"""Tests of actpat.analysis.tensorboard, read back with TensorBoard's own event reader."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalar_metadata

from actpat.analysis import plots
from actpat.analysis import tensorboard as tb

SITES = [("features.0.relu", 0), ("features.3.relu", 1), ("classifier/relu", 2)]
STEPS = [0, 7, 14, 21]
METRICS = [
    "entropy",
    "normalized_entropy",
    "jaccard_init",
    "weighted_jaccard_last",
    "weighted_jaccard_final",
    "mutual_information",
    "dead_units",
    "input_information",
]
CONSTANT = "n_units"  # declared constant: a table column, not exported


def make_df(splits=("probe",), seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for split in splits:
        for step in STEPS:
            for site, index in SITES:
                for metric in METRICS:
                    value = np.nan if (metric.endswith("_last") and step == 0) else rng.random() * 3
                    rows.append((step, step // 10, split, site, index, metric, value))
                rows.append((step, step // 10, split, site, index, CONSTANT, 16.0))
    df = pd.DataFrame(rows, columns=list(plots.METRIC_COLUMNS))
    return df.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def make_rates(seed=1) -> dict:
    rng = np.random.default_rng(seed)
    sizes = {"features.0.relu": 8, "features.3.relu": 16, "classifier/relu": 5}
    rates = {}
    for site, n_units in sizes.items():
        rates[site] = {}
        for step in STEPS:
            r = rng.random(n_units)
            r[0] = 0.0  # a dead unit
            r[-1] = 1.0  # an always-on unit
            rates[site][step] = r
    return rates


def load(run_dir):
    acc = event_accumulator.EventAccumulator(
        str(run_dir),
        size_guidance={
            event_accumulator.SCALARS: 0,
            event_accumulator.HISTOGRAMS: 0,
            event_accumulator.IMAGES: 0,
            event_accumulator.TENSORS: 0,
        },
    )
    acc.Reload()
    return acc


def event_files(root):
    return sorted(root.rglob("events.out.tfevents.*"))


def test_scalars_round_trip(tmp_path):
    df = make_df()
    run_dir = tb.to_tensorboard(df, tmp_path, run_name="r1", figures=False)
    assert run_dir == tmp_path / "r1"
    assert len(event_files(tmp_path)) == 1
    acc = load(run_dir)
    finite = df.dropna(subset=["value"])
    finite = finite[finite.metric != CONSTANT]  # constants are table columns, not exported
    expected_tags = {f"actpat/{m}/{s}" for m, s in zip(finite.metric, finite.site)}
    assert set(acc.Tags()["scalars"]) == expected_tags
    for (metric, site), rows in finite.groupby(["metric", "site"]):
        rows = rows.sort_values("step")
        events = acc.Scalars(f"actpat/{metric}/{site}")
        assert [e.step for e in events] == rows.step.tolist()
        np.testing.assert_array_equal(
            np.array([e.value for e in events], dtype=np.float32), rows.value.to_numpy(np.float32)
        )
    # NaN (similarity to `last` at the first record) is skipped, not written.
    assert [e.step for e in acc.Scalars("actpat/weighted_jaccard_last/features.0.relu")] == STEPS[1:]
    assert acc.Tags()["histograms"] == [] and acc.Tags()["images"] == []


def test_custom_scalars_layout(tmp_path):
    df = make_df()
    run_dir = tb.to_tensorboard(df, tmp_path, figures=False)
    assert run_dir.name == tb.DEFAULT_RUN_NAME
    acc = load(run_dir)
    assert custom_scalar_metadata.CONFIG_SUMMARY_TAG in acc.Tags()["tensors"]
    assert custom_scalar_metadata.CONFIG_SUMMARY_TAG in acc.PluginTagToContent(
        custom_scalar_metadata.PLUGIN_NAME
    )
    (event,) = acc.Tensors(custom_scalar_metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    categories = {c.title: c for c in layout.category}
    # Registry families, in the registry's order; I(X;T) is not "label information".
    assert list(categories) == [
        "entropy",
        "label information",
        "similarity to init",
        "similarity to last",
        "similarity to final",
        "units",
        "information plane",
    ]
    charts = {chart.title: (title, chart) for title, c in categories.items() for chart in c.chart}
    assert set(charts) == set(METRICS)
    assert charts["input_information"][0] == "information plane"
    assert not any(t.startswith(f"actpat/{CONSTANT}/") for t in acc.Tags()["scalars"])
    assert charts["entropy"][0] == "entropy" and charts["normalized_entropy"][0] == "entropy"
    assert charts["jaccard_init"][0] == "similarity to init"
    assert charts["weighted_jaccard_last"][0] == "similarity to last"
    assert charts["weighted_jaccard_final"][0] == "similarity to final"
    assert charts["mutual_information"][0] == "label information"
    assert charts["dead_units"][0] == "units"
    scalar_tags = acc.Tags()["scalars"]
    for metric, (_, chart) in charts.items():
        regexes = list(chart.multiline.tag)
        assert len(regexes) == len(SITES)
        for (site, _), regex in zip(SITES, regexes):  # forward order
            matched = [t for t in scalar_tags if re.match(regex, t)]
            assert matched == [f"actpat/{metric}/{site}"]


def test_histograms_from_mapping_and_dataframe(tmp_path):
    df = make_df()
    rates = make_rates()
    run_dir = tb.to_tensorboard(df, tmp_path, run_name="map", figures=False, unit_rates=rates)
    acc = load(run_dir)
    assert set(acc.Tags()["histograms"]) == {f"actpat/firing_rate/{s}" for s in rates}
    for site, per_step in rates.items():
        events = acc.Histograms(f"actpat/firing_rate/{site}")
        assert [e.step for e in events] == STEPS
        for event, step in zip(events, STEPS):
            h, r = event.histogram_value, per_step[step]
            assert h.num == r.size and h.min == r.min() and h.max == r.max()
            assert h.sum == pytest.approx(r.sum()) and h.sum_squares == pytest.approx((r**2).sum())
            assert len(h.bucket) == len(h.bucket_limit) == tb.HISTOGRAM_BINS + 1
            assert sum(h.bucket) == r.size
            assert h.bucket[0] == np.sum(r <= 0.0)  # dead units in the first bucket
            limits = np.asarray(h.bucket_limit)
            brute = [np.sum((r > lo) & (r <= hi)) for lo, hi in zip(limits[:-1], limits[1:])]
            assert h.bucket[1:] == brute

    long = pd.DataFrame(
        [
            (site, step, unit, rate)
            for site, per_step in rates.items()
            for step, r in per_step.items()
            for unit, rate in enumerate(r)
        ],
        columns=["site", "step", "unit", "rate"],
    ).sample(frac=1.0, random_state=0)
    acc2 = load(tb.to_tensorboard(df, tmp_path, run_name="long", figures=False, unit_rates=long))
    for site in rates:
        a = acc.Histograms(f"actpat/firing_rate/{site}")
        b = acc2.Histograms(f"actpat/firing_rate/{site}")
        assert [e.histogram_value for e in a] == [e.histogram_value for e in b]


def test_bad_unit_rates(tmp_path):
    df = make_df()
    with pytest.raises(ValueError, match="n_units"):
        tb.to_tensorboard(df, tmp_path, run_name="a", figures=False, unit_rates={"s": {0: np.ones((2, 2))}})
    with pytest.raises(ValueError, match="missing \\['rate'\\]"):
        no_rate = pd.DataFrame({"site": [], "step": []})
        tb.to_tensorboard(df, tmp_path, run_name="b", figures=False, unit_rates=no_rate)
    with pytest.raises(TypeError, match="unit_rates"):
        tb.to_tensorboard(df, tmp_path, run_name="c", figures=False, unit_rates=[1, 2])
    assert event_files(tmp_path) == []


def test_images(tmp_path):
    df = make_df()
    plane = df[df.metric == "entropy"].assign(metric="input_information")
    plane = pd.concat([plane, plane.assign(metric="mutual_information", value=plane.value / 2)])
    run_dir = tb.to_tensorboard(df, tmp_path, info_plane_df=plane)
    acc = load(run_dir)
    tags = set(acc.Tags()["images"])
    headline = ("normalized_entropy", "jaccard_init", "weighted_jaccard_final")  # no distinct_fraction
    expected = {f"actpat/figures/heatmap_{m}" for m in headline}
    expected |= {f"actpat/figures/curves_{m}" for m in METRICS}
    expected |= {"actpat/figures/information_plane"}
    assert tags == expected
    for tag in tags:
        (image,) = acc.Images(tag)
        assert image.step == max(STEPS)
        assert image.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
        assert image.width > 100 and image.height > 100


def test_rerun_refuses_and_overwrite_replaces(tmp_path):
    df = make_df()
    run_dir = tb.to_tensorboard(df, tmp_path, run_name="same", figures=False)
    before = event_files(tmp_path)
    with pytest.raises(FileExistsError, match="run_name.*overwrite=True"):
        tb.to_tensorboard(df, tmp_path, run_name="same", figures=False)
    assert event_files(tmp_path) == before
    tb.to_tensorboard(df, tmp_path, run_name="same", figures=False, overwrite=True)
    after = event_files(tmp_path)
    assert len(after) == 1
    acc = load(run_dir)
    assert len(acc.Scalars("actpat/entropy/features.0.relu")) == len(STEPS)  # not duplicated


def test_several_splits_are_separate_runs(tmp_path):
    df = make_df(splits=("probe", "train"))
    run_dir = tb.to_tensorboard(df, tmp_path, figures=False)
    for split in ("probe", "train"):
        acc = load(run_dir / split)
        rows = df[(df.split == split) & (df.metric == "entropy") & (df.site == "features.3.relu")]
        rows = rows.sort_values("step")
        events = acc.Scalars("actpat/entropy/features.3.relu")
        np.testing.assert_array_equal([e.value for e in events], rows.value.to_numpy(np.float32))


def test_input_errors(tmp_path):
    df = make_df()
    with pytest.raises(ValueError, match=r"missing \['site'\]"):
        tb.to_tensorboard(df.drop(columns="site"), tmp_path)
    with pytest.raises(ValueError, match="duplicated"):
        tb.to_tensorboard(pd.concat([df, df.iloc[:3]]), tmp_path, figures=False)
    with pytest.raises(ValueError, match="run_name"):
        tb.to_tensorboard(df, tmp_path, run_name="../x", figures=False)
    with pytest.raises(ValueError, match=r"registered metrics .*\['mutual_information_label'\]"):
        tb.to_tensorboard(df.replace({"metric": {"mutual_information": "mutual_information_label"}}), tmp_path)
    assert event_files(tmp_path) == []


def test_does_not_import_torch():
    code = (
        "import sys; import actpat.analysis.tensorboard, actpat.analysis.plots; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
