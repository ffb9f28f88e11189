"""compare() on small synthetic runs written with the ShardWriter: tables, spreads and figures against
per-run computations and brute force."""

import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection
from scipy.stats import spearmanr

from actpat.analysis.compare import (
    RunSpec,
    band,
    band_curves,
    compare,
    convergence,
    dips,
    heatmaps,
    parse_runs,
    report,
    summary,
)
from actpat.analysis.summarize import summarize
from actpat.analysis.width import width_controlled_table
from actpat.recorder.shards import Record, ShardWriter, SiteMeta

N = 40
STEPS = (0, 10, 20, 30, 40, 50)


def write_run(path, seed, widths):
    """Probe records of sites that drift towards their final patterns, the deeper the later."""
    rng = np.random.default_rng(seed)
    writer = ShardWriter(path)
    writer.start()
    for index, (width, n_positions) in enumerate(widths):
        meta = SiteMeta(f"layer{index}", index, "ReLU", (width, n_positions), width, "channel")
        final = rng.integers(0, 2, (N * n_positions, width)).astype(bool)
        for i, step in enumerate(STEPS):
            noise = max(0.0, 0.3 - 0.3 * i / (2 + index + rng.random())) if i < len(STEPS) - 1 else 0.0
            cur = final ^ (rng.random(final.shape) < noise)
            writer.put(Record(meta, step, i, "probe", np.packbits(cur, axis=1, bitorder="little"), n_positions, N,
                              0, sample_ids=np.arange(N), labels=np.arange(N) % 3))
    writer.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    paths = {}
    for name, seed, widths in (("a0", 0, [(6, 1), (12, 2), (12, 1)]), ("a1", 1, [(6, 1), (12, 2), (12, 1)]),
                               ("b0", 2, [(8, 1), (16, 2), (16, 1)])):
        paths[name] = base / name
        write_run(paths[name], seed, widths)
    return paths


@pytest.fixture(scope="module")
def table(runs):
    return compare({"a": [runs["a0"], runs["a1"]], "b": runs["b0"]}, n_subsets=3, progress=False)


def test_parse_runs():
    specs = parse_runs(["x=r/1", "x=r/2", "r/3", ("y", "r/4")])
    assert [(s.run, s.group, str(s.path)) for s in specs] == [
        ("x/0", "x", "r/1"), ("x/1", "x", "r/2"), ("r/3", "r/3", "r/3"), ("y", "y", "r/4")]
    assert parse_runs(specs) == specs and isinstance(specs[0], RunSpec)
    with pytest.raises(ValueError, match="more than once"):
        parse_runs(["x=r/1", "y=r/1"])
    with pytest.raises(ValueError, match="GROUP=DIR"):
        parse_runs(["=r/1"])
    with pytest.raises(ValueError, match="at least one run"):
        parse_runs([])


def test_table_is_each_runs_own_tables_with_common_subset_sizes(runs, table):
    assert list(table.columns[:2]) == ["run", "group"]
    assert table.groupby("run")["group"].first().to_dict() == {"a/0": "a", "a/1": "a", "b": "b"}
    # m is the narrowest site of all runs (6), n_obs the fewest observations of any site (40).
    for run, path in (("a/0", runs["a0"]), ("b", runs["b0"])):
        own = pd.concat([summarize(path, progress=False),
                         width_controlled_table(path, m=6, n_obs=40, n_subsets=3, progress=False)], ignore_index=True)
        got = table[table["run"] == run].drop(columns=["run", "group"]).reset_index(drop=True)
        pd.testing.assert_frame_equal(got, own)
    assert set(table.loc[table["metric"] == "wc_units", "value"]) == {6.0}
    assert set(table.loc[table["metric"] == "wc_observations", "value"]) == {40.0}


def brute_steps(table, run, metric, threshold):
    rows = table[(table["run"] == run) & (table["metric"] == metric)]
    out = {}
    for site, site_rows in rows.groupby("site"):
        site_rows = site_rows.sort_values("step")
        above = site_rows[site_rows["value"] > threshold]["step"]
        out[site] = float(above.iloc[0]) if len(above) else math.nan
    return out


@pytest.mark.parametrize("metric", ["weighted_jaccard_final", "weighted_jaccard_wc_final"])
def test_convergence_and_its_spread_per_group(table, metric):
    conv = convergence(table, metric, threshold=0.8)
    truth = {run: brute_steps(table, run, metric, 0.8) for run in ("a/0", "a/1", "b")}
    for r in conv.itertuples():
        assert r.step == truth[r.run][r.site]
        assert r.censored == (r.step == STEPS[-1])
    by_site, by_run, by_group = summary(conv)
    for r in by_site.itertuples():
        runs_of_group = ["a/0", "a/1"] if r.group == "a" else ["b"]
        steps = np.array([truth[run][r.site] for run in runs_of_group])
        assert r.n_runs == len(runs_of_group)
        assert r.step_mean == pytest.approx(steps.mean())
        assert r.step_sd == pytest.approx(steps.std(ddof=1) if len(steps) > 1 else math.nan, nan_ok=True)
        assert (r.step_min, r.step_max) == (steps.min(), steps.max())
    for r in by_run.itertuples():
        steps = [truth[r.run][f"layer{i}"] for i in range(3)]
        rho = spearmanr(range(3), steps).statistic if len(set(steps)) > 1 else math.nan
        assert r.rho == pytest.approx(rho, nan_ok=True)
        assert r.spread == max(steps) - min(steps)
    a = by_run[by_run["group"] == "a"]["spread"]
    row = by_group.set_index("group").loc["a"]
    assert row["n_runs"] == 2 and row["spread_mean"] == pytest.approx(a.mean())
    assert row["spread_sd"] == pytest.approx(a.std(ddof=1))


def test_dips_per_run(table):
    d = dips(table, "normalized_entropy_wc", relative_to="peaks")
    assert set(d["run"]) == {"a/0", "a/1", "b"} and (d["depth"] >= 0).all()
    _, by_run, by_group = summary(d, "depth")
    for r in by_run.itertuples():
        assert r.depth == d[d["run"] == r.run]["depth"].max()
    # No site dips: no deepest site is named (the first site was).
    _, flat, _ = summary(d.assign(depth=0.0), "depth")
    assert flat["site"].isna().all() and (flat["depth"] == 0.0).all()
    assert set(by_group.columns) >= {"group", "n_runs", "depth_mean", "depth_sd", "depth_min", "depth_max"}


def test_band_minmax_and_bootstrap():
    v = np.array([[0.0, 1.0, np.nan], [2.0, 3.0, 4.0], [1.0, 5.0, 6.0]])
    mean, lo, hi = band(v)
    assert mean.tolist() == [1.0, 3.0, 5.0] and lo.tolist() == [0.0, 1.0, 4.0] and hi.tolist() == [2.0, 5.0, 6.0]
    # With many runs, the bootstrap interval of the mean is the normal one, mean -+ 1.96 sd / sqrt(n).
    rng = np.random.default_rng(0)
    many = rng.normal(size=(400, 2))
    mean, lo, hi = band(many, "bootstrap", n_boot=4000)
    half = 1.96 * many.std(axis=0, ddof=1) / math.sqrt(400)
    np.testing.assert_allclose(hi - mean, half, rtol=0.15)
    np.testing.assert_allclose(mean - lo, half, rtol=0.15)
    one = band(v[:1, :2], "bootstrap")
    assert one[1].tolist() == one[2].tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="kind"):
        band(v, "sd")


def test_heatmaps_share_one_colour_scale_and_mark_the_ceiling(table):
    fig = heatmaps(table, "weighted_jaccard_wc_final")
    images = [im for ax in fig.axes for im in ax.images]
    assert len(images) == 3
    rows = table[table["metric"] == "weighted_jaccard_wc_final"]["value"]
    assert {im.get_clim() for im in images} == {(rows.min(), rows.max())}
    fig = heatmaps(table, "normalized_entropy")
    flags = table[table["metric"] == "saturated"]
    marks = sum(len(c.get_offsets()) for ax in fig.axes for c in ax.collections if isinstance(c, PathCollection))
    assert marks == int(flags["value"].sum()) > 0
    with pytest.raises(ValueError, match="Expected metric 'nope'"):
        heatmaps(table, "nope")


def test_band_curves_one_line_and_band_per_group_and_site(table):
    fig = band_curves(table, "weighted_jaccard_final", kind="bootstrap", n_boot=200)
    panels = [ax for ax in fig.axes if ax.lines]
    assert len(panels) == 3
    for ax in panels:
        assert [line.get_label() for line in ax.lines] == ["a (2)", "b (1)"]
    assert "bootstrap interval of the mean over runs" in fig._suptitle.get_text()
    # The mean line of group a at site layer0 is the mean of its two runs.
    rows = table[(table["metric"] == "weighted_jaccard_final") & (table["group"] == "a") & (table["site"] == "layer0")]
    expected = rows.groupby("step")["value"].mean().to_numpy()
    np.testing.assert_allclose(panels[0].lines[0].get_ydata(), expected)


def test_band_curves_mark_where_some_run_of_a_group_is_saturated(table):
    from actpat.analysis.plots import SATURATED_GID

    flags = table["metric"] == "saturated"
    steps = sorted(table.loc[table["run"] == "a/0", "step"].unique())
    marked = table.copy()
    marked.loc[flags, "value"] = 0.0
    # Run a/0 saturated at site layer0 at its last two steps; group b never.
    chosen = flags & (marked["run"] == "a/0") & (marked["site"] == "layer0") & marked["step"].isin(steps[-2:])
    marked.loc[chosen, "value"] = 1.0
    fig = band_curves(marked, "entropy")
    panels = [ax for ax in fig.axes if ax.lines]
    marks = [line for ax in panels for line in ax.lines if line.get_gid() == SATURATED_GID]
    assert len(marks) == 1 and marks[0] in panels[0].lines  # site layer0, group a only
    mean = panels[0].lines[0]
    assert marks[0].get_xdata().tolist() == [float(s) for s in steps[-2:]]
    np.testing.assert_allclose(marks[0].get_ydata(), mean.get_ydata()[-2:])
    assert not [line for ax in fig.axes for line in ax.lines if line.get_gid() == SATURATED_GID and line is not marks[0]]
    jaccard = band_curves(marked, "jaccard_init")  # a similarity does not saturate with K
    assert not [line for ax in jaccard.axes for line in ax.lines if line.get_gid() == SATURATED_GID]


def test_band_curves_join_only_means_over_every_run_of_a_group(table):
    """Seeds recorded at other steps: the line joined means over whichever runs had a value at each step (one
    run here, two there) and the min-max band shrank to nothing where one run was left, saying nothing."""
    from actpat.analysis.compare import PARTIAL_GID

    steps = sorted(table.loc[table["run"] == "a/1", "step"].unique())
    dropped = steps[1::2]
    sparse = table[~((table["run"] == "a/1") & table["step"].isin(dropped))]
    fig = band_curves(sparse, "weighted_jaccard_final")
    panel = [ax for ax in fig.axes if ax.lines][0]
    line = next(line for line in panel.lines if line.get_label() == "a (2)")
    marks = [line for line in panel.lines if line.get_gid() == PARTIAL_GID]
    assert len(marks) == 1
    rows = sparse[(sparse["metric"] == "weighted_jaccard_final") & (sparse["group"] == "a") & (sparse["site"] == "layer0")]
    by_step = rows.groupby("step")["value"]
    x, y = line.get_xdata(), line.get_ydata()
    for step, mean, n in zip(by_step.mean().index, by_step.mean(), by_step.count()):
        at = list(x).index(step)
        if n == 2:
            assert y[at] == pytest.approx(mean)
        else:
            assert np.isnan(y[at]) and step in dropped
    assert marks[0].get_xdata().tolist() == [float(step) for step in dropped]
    only = rows[rows["step"].isin(dropped)].set_index("step")["value"]  # a/0 alone
    np.testing.assert_allclose(marks[0].get_ydata(), only.loc[dropped].to_numpy())


def test_report_writes_tables_and_figures(runs, tmp_path):
    written = report([f"a={runs['a0']}", f"a={runs['a1']}", f"b={runs['b0']}"], tmp_path / "out", n_subsets=2,
                     regions=True, progress=False, metrics=["weighted_jaccard_wc_final"], dpi=30)
    for key in ("runs", "metrics", "convergence", "convergence_by_site", "convergence_by_run",
                "convergence_by_group", "dips", "dips_by_run", "dips_by_group",
                "heatmap_weighted_jaccard_wc_final", "curves_weighted_jaccard_wc_final"):
        assert written[key].stat().st_size > 0, key
    assert not any(key.startswith("heatmap_") and key != "heatmap_weighted_jaccard_wc_final" for key in written)
    conv = pd.read_csv(written["convergence"])
    assert set(conv["metric"]) == {"weighted_jaccard_final", "weighted_jaccard_wc_final"}
    assert len(conv) == 2 * 3 * 3
    by_group = pd.read_csv(written["convergence_by_group"])
    assert set(zip(by_group["metric"], by_group["group"])) == {
        (m, g) for m in ("weighted_jaccard_final", "weighted_jaccard_wc_final") for g in ("a", "b")}
    metrics = pd.read_csv(written["metrics"])
    assert "region_distinct" in set(metrics["metric"])
    assert pd.read_csv(written["runs"])["run"].tolist() == ["a/0", "a/1", "b"]


def test_report_writes_nothing_on_bad_input(runs, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        report([f"a={runs['a0']}", f"b={tmp_path / 'missing'}"], tmp_path / "out1", progress=False)
    with pytest.raises(ValueError, match=r"Expected metrics to draw among those of the runs.*\['nope'\]"):
        report([runs["a0"]], tmp_path / "out2", metrics=["nope"], width_controlled=False, progress=False)
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def test_band_curves_draw_a_site_whose_values_are_all_nan_empty(table):
    # A measure undefined at a site (normalized entropy of 1-observation steps: 0/0) is NaN at every step.
    undefined = table.copy()
    rows = (undefined["metric"] == "entropy") & (undefined["site"] == "layer0")
    undefined.loc[rows, "value"] = np.nan
    fig = band_curves(undefined, "entropy")
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert all(np.isnan(line.get_ydata()).all() for line in panels["layer0"].lines)
    assert any(np.isfinite(line.get_ydata()).any() for line in panels["layer1"].lines)
