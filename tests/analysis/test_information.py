"""information_plane() on real shards: binary patterns against brute-force dict counts per sample, continuous
estimators against the mi functions called on values gathered from the recorded input."""

import logging
import math
from collections import Counter

import numpy as np
import pytest

from actpat.analysis import mi
from actpat.analysis.information import information_plane
from actpat.recorder.reader import open_run
from actpat.recorder.shards import Record, ShardWriter, SiteMeta

CONV = SiteMeta("conv.relu", 0, "ReLU", (10, 2, 2), 10, "channel")
DENSE = SiteMeta("fc.relu", 1, "ReLU", (12,), 12, "flat")
FLAT_CONV = SiteMeta("conv.flat", 2, "ReLU", (3, 2, 2), 12, "flat")
N_SAMPLES = 60
N_POSITIONS = 4
STEPS = [0, 7]


def pack(units01):
    return np.packbits(np.asarray(units01, dtype=np.uint8), axis=1, bitorder="little")


def h_of(items):
    c = Counter(items)
    n = sum(c.values())
    return -sum(v / n * math.log2(v / n) for v in c.values())


def brute(samples, labels):
    """input_information(_mm) and mutual_information(_mm) of per-sample hashable patterns, by dict counting."""
    n = len(samples)
    ln2 = math.log(2)
    h_t = h_of(samples)
    out = {"input_information": h_t, "input_information_mm": h_t + (len(set(samples)) - 1) / (2 * n * ln2)}
    keep = [i for i in range(n) if labels[i] >= 0]
    if keep:
        t = [samples[i] for i in keep]
        y = [int(labels[i]) for i in keep]
        ty = list(zip(t, y))
        m = len(keep)
        mm = [h_of(v) + (len(set(v)) - 1) / (2 * m * ln2) for v in (t, y, ty)]
        out["mutual_information"] = h_of(t) + h_of(y) - h_of(ty)
        out["mutual_information_mm"] = mm[0] + mm[1] - mm[2]
    return out


def write_run(path, *, with_ids=True, labels=None):
    """Two probe batches per step for each site; returns the per-sample unit tuples and labels."""
    rng = np.random.default_rng(0)
    y = np.arange(N_SAMPLES) % 3 if labels is None else labels
    truth = {}
    writer = ShardWriter(path, max_shard_bytes=3000)
    writer.start()
    for meta, n_positions in ((CONV, N_POSITIONS), (DENSE, 1), (FLAT_CONV, 1)):
        proto = rng.integers(0, 2, (5, meta.n_units))
        for step in STEPS:
            # (sample, position) rows in sample-major order, as the recorder writes them.
            units = proto[rng.integers(0, 5, N_SAMPLES * n_positions)]
            units ^= rng.random(units.shape) < 0.05 * (1 + step)
            per_sample = units.reshape(N_SAMPLES, n_positions * meta.n_units)
            truth[meta.site, step] = ([tuple(r) for r in per_sample.tolist()], units)
            for half in (slice(0, 25), slice(25, N_SAMPLES)):
                ids = np.arange(N_SAMPLES)[half]
                rows = units.reshape(N_SAMPLES, n_positions, meta.n_units)[half].reshape(-1, meta.n_units)
                writer.put(Record(meta, step, step // 5, "probe", pack(rows), n_positions, ids.size, 0,
                                  sample_ids=ids + 100 if with_ids else None, labels=y[half]))
    writer.put(Record(DENSE, 0, 0, "train", pack(np.zeros((4, 12))), 1, 4, 0, labels=np.zeros(4, dtype=np.int64)))
    writer.close()
    return truth, y


def values(table, site, step):
    rows = table[(table.site == site) & (table.step == step)]
    return dict(zip(rows.metric, rows.value))


@pytest.mark.parametrize("with_ids", [True, False])
def test_flat_information_plane_matches_brute_force(tmp_path, with_ids):
    truth, y = write_run(tmp_path, with_ids=with_ids)
    table = information_plane(tmp_path, split="probe")
    assert list(table.columns) == ["step", "epoch", "split", "site", "site_index", "metric", "value"]
    assert set(table.split) == {"probe"}
    assert table.site.unique().tolist() == [CONV.site, DENSE.site, FLAT_CONV.site]
    for (site, step), (samples, _) in truth.items():
        got = values(table, site, step)
        expected = brute(samples, y)
        assert set(got) == {"input_information", "input_information_mm", "mutual_information",
                            "mutual_information_mm", "saturated"}
        for metric, value in expected.items():
            assert got[metric] == pytest.approx(value, abs=1e-12), (site, step, metric)
        assert got["saturated"] == float(len(set(samples)) >= 0.9 * N_SAMPLES)
    rows = table[(table.site == CONV.site) & (table.step == 7)]
    assert rows.epoch.unique().tolist() == [1] and rows.site_index.unique().tolist() == [0]


def test_rows_in_any_order_are_grouped_by_sample_and_position(tmp_path):
    rng = np.random.default_rng(1)
    units = rng.integers(0, 2, (N_SAMPLES * N_POSITIONS, CONV.n_units))
    y = rng.integers(0, 4, N_SAMPLES)
    perm = rng.permutation(units.shape[0])  # obs_index: row i is observation perm[i]
    writer = ShardWriter(tmp_path)
    writer.start()
    writer.put(Record(CONV, 0, 0, "probe", pack(units[perm]), N_POSITIONS, N_SAMPLES, 0,
                      sample_ids=np.arange(N_SAMPLES), labels=y, obs_index=perm))
    writer.close()
    samples = [tuple(r) for r in units.reshape(N_SAMPLES, -1).tolist()]
    got = values(information_plane(tmp_path, split="probe"), CONV.site, 0)
    for metric, value in brute(samples, y).items():
        assert got[metric] == pytest.approx(value, abs=1e-12)
    # A sample's pattern spans all its positions: per-row counting gives another (larger) n.
    channel = values(information_plane(tmp_path, split="probe", pattern="channel"), CONV.site, 0)
    assert channel["input_information"] > math.log2(N_SAMPLES)


def test_channel_pattern_uses_rows_as_observations(tmp_path):
    truth, y = write_run(tmp_path)
    table = information_plane(open_run(tmp_path), split="probe", pattern="channel", sites=[CONV.site, DENSE.site])
    _, units = truth[CONV.site, 7]
    got = values(table, CONV.site, 7)
    expected = brute([tuple(r) for r in units.tolist()], np.repeat(y, N_POSITIONS))
    for metric, value in expected.items():
        assert got[metric] == pytest.approx(value, abs=1e-12)
    with pytest.raises(ValueError, match="recorded flat with shape"):
        information_plane(tmp_path, split="probe", pattern="channel", sites=[FLAT_CONV.site])


def test_partial_and_missing_labels(tmp_path, caplog):
    labels = np.arange(N_SAMPLES) % 2
    labels[:10] = -1
    truth, y = write_run(tmp_path, labels=labels)
    with caplog.at_level(logging.WARNING, logger="actpat.analysis.information"):
        table = information_plane(tmp_path, split="probe", sites=[DENSE.site])
    assert "10 of 60 samples have no label" in caplog.text
    samples, _ = truth[DENSE.site, 0]
    got = values(table, DENSE.site, 0)
    for metric, value in brute(samples, labels).items():
        assert got[metric] == pytest.approx(value, abs=1e-12)

    none_path = tmp_path / "none"
    write_run(none_path, labels=np.full(N_SAMPLES, -1))
    metrics = set(information_plane(none_path, split="probe").metric)
    assert metrics == {"input_information", "input_information_mm", "saturated"}


def test_saturation_flag_when_every_sample_is_distinct(tmp_path):
    writer = ShardWriter(tmp_path)
    writer.start()
    units = ((np.arange(16)[:, None] >> np.arange(DENSE.n_units)) & 1).astype(np.uint8)
    writer.put(Record(DENSE, 3, 0, "probe", pack(units), 1, 16, 0, labels=np.arange(16) % 2))
    writer.close()
    got = values(information_plane(tmp_path, split="probe"), DENSE.site, 3)
    assert got["saturated"] == 1.0 and got["input_information"] == pytest.approx(4.0)
    assert got["mutual_information"] == pytest.approx(1.0)
    assert values(information_plane(tmp_path, split="probe", saturation=1.0), DENSE.site, 3)["saturated"] == 1.0


def test_incomplete_samples_are_an_error(tmp_path):
    writer = ShardWriter(tmp_path)
    writer.start()
    rows = np.zeros((5, 10), dtype=np.uint8)
    # 2 samples of 4 positions, but only 5 of the 8 observations kept.
    writer.put(Record(CONV, 0, 0, "probe", pack(rows), N_POSITIONS, 2, 0, sample_ids=np.arange(2),
                      labels=np.zeros(2, dtype=np.int64), obs_index=np.array([0, 1, 2, 3, 5])))
    writer.close()
    with pytest.raises(ValueError, match="each of its 4 positions exactly once.*subsampled"):
        information_plane(tmp_path, split="probe")
    assert len(information_plane(tmp_path, split="probe", pattern="channel")) == 5


def test_sequences_of_different_lengths_in_one_step_are_named_as_such(tmp_path):
    from actpat.analysis.regions import sample_patterns

    # A probe of token patterns in two batches, each padded to its own longest: 3 samples of 4 tokens, 2 of 6.
    tokens = SiteMeta("enc:relu#0", 0, "ReLU", (4, 10), 10, "channel_last")
    writer = ShardWriter(tmp_path)
    writer.start()
    for part, (ids, length) in enumerate(((np.arange(3), 4), (np.arange(3, 5), 6))):
        writer.put(Record(tokens, 0, 0, "probe", pack(np.zeros((len(ids) * length, 10), dtype=np.uint8)), length,
                          len(ids), 0, sample_ids=ids, labels=ids % 2, part=part, ends_step=part == 1))
    writer.close()
    with pytest.raises(ValueError, match=r"samples have 4 to 6 of the 6 positions: sequences of different lengths.*pad every "
                                         r"batch to one fixed length.*pattern='channel'"):
        information_plane(tmp_path, split="probe")
    assert len(information_plane(tmp_path, split="probe", pattern="channel"))  # per token: measured
    p = open_run(tmp_path).read("enc:relu#0", 0, "probe")
    with pytest.raises(ValueError, match="4 to 6 of the 6 positions"):
        sample_patterns(p.bits, 10, p.sample_ids, p.positions)
    with pytest.raises(ValueError, match="one per token of a site recorded with 'channel_last'"):
        information_plane(tmp_path, split="probe", pattern="channel_last")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "val"}, "Expected `split` to be one of the recorded splits"),
        ({"pattern": "rows"}, "Expected `pattern` to be one of"),
        ({"saturation": 0.0}, "Expected `saturation` to be in \\(0, 1\\], but got 0.0"),
        ({"sites": ["nope"]}, "Expected `sites` to be recorded sites"),
    ],
)
def test_validation(tmp_path, kwargs, match):
    write_run(tmp_path)
    with pytest.raises(ValueError, match=match):
        information_plane(tmp_path, **{"split": "probe", **kwargs})


# ---------------------------------------------------------------------------------------------------
# continuous estimators on stored values
# ---------------------------------------------------------------------------------------------------
CONTINUOUS = [
    ("binning", {}, mi.binning),
    ("binning", {"n_bins": 7, "range": (-1.0, 1.0)}, mi.binning),
    ("adaptive", {"n_bins": 10}, mi.adaptive_binning),
    ("kde", {"noise_var": 0.1}, mi.kde_bounds),
]


def direct(func, t, y, options):
    """The mi function called on the gathered values, as the metric names of the table."""
    result = func(t, y, **options)
    if func is mi.kde_bounds:
        return {"input_information": result.input_information_upper,
                "input_information_lower": result.input_information_lower,
                "mutual_information": result.mutual_information_upper,
                "mutual_information_lower": result.mutual_information_lower}
    return {"input_information": result.input_information, "mutual_information": result.mutual_information}


@pytest.mark.parametrize("estimator, options, func", CONTINUOUS)
def test_continuous_estimators_on_recorded_values(tmp_path, estimator, options, func):
    torch = pytest.importorskip("torch")
    from actpat.recorder import ActivationRecorder

    gen = torch.Generator().manual_seed(0)
    x_dense = 1.5 * torch.randn(40, 6, generator=gen)
    x_conv = torch.randn(40, 3, 2, 2, generator=gen)
    y = torch.arange(40) % 3
    dense = torch.nn.Sequential(torch.nn.Tanh())
    conv = torch.nn.Sequential(torch.nn.ReLU())
    with ActivationRecorder(dense, tmp_path / "dense", pattern="flat", store_values="all",
                            module_types=[torch.nn.Tanh]) as rec:
        with rec.capture(0, labels=y, split="probe"):
            dense(x_dense)
    # Channel rows, the probe in two batches: a sample's values are its positions' values concatenated.
    with ActivationRecorder(conv, tmp_path / "conv", pattern="channel", store_values="all") as rec:
        for half in (slice(0, 15), slice(15, 40)):
            with rec.capture(0, labels=y[half], sample_ids=torch.arange(40)[half], split="probe"):
                conv(x_conv[half])
    # The stored float16 values, gathered here from the recorded input tensors.
    t_dense = x_dense.half().double().numpy()
    t_conv = x_conv.half().double().permute(0, 2, 3, 1).reshape(40, -1).numpy()
    cases = [
        ("dense", np.tanh(t_dense), True),
        ("dense", t_dense, False),
        ("conv", np.maximum(t_conv, 0.0), True),
        ("conv", t_conv, False),
    ]
    for name, t, apply_activation in cases:
        table = information_plane(tmp_path / name, split="probe", estimator=estimator, estimator_options=options,
                                  apply_activation=apply_activation)
        assert list(table.columns) == ["step", "epoch", "split", "site", "site_index", "metric", "value"]
        got = values(table, table.site.iloc[0], 0)
        expected = direct(func, t, y.numpy(), options)
        assert list(got) == list(expected)
        for metric, value in expected.items():
            assert got[metric] == pytest.approx(value, abs=1e-9), (name, apply_activation, metric)


def write_value_run(path, labels, module_type="ReLU"):
    """One channel site with values, its rows stored in a random order; returns per-sample values."""
    rng = np.random.default_rng(2)
    meta = SiteMeta("conv", 0, module_type, (3, 2, 2), 3, "channel", value_units=(0, 1, 2))
    z = rng.standard_normal((N_SAMPLES * N_POSITIONS, 3)).astype(np.float16)
    perm = rng.permutation(z.shape[0])  # obs_index: row i is observation perm[i]
    writer = ShardWriter(path)
    writer.start()
    writer.put(Record(meta, 4, 0, "probe", pack(z[perm] > 0), N_POSITIONS, N_SAMPLES, 0,
                      sample_ids=np.arange(N_SAMPLES), labels=labels, obs_index=perm, values=z[perm]))
    writer.close()
    return z.astype(np.float64).reshape(N_SAMPLES, N_POSITIONS * 3)


def test_rows_in_any_order_and_partial_labels(tmp_path, caplog):
    labels = np.arange(N_SAMPLES) % 2
    labels[:12] = -1
    z = write_value_run(tmp_path, labels)
    t = np.maximum(z, 0.0)
    with caplog.at_level(logging.WARNING, logger="actpat.analysis.information"):
        table = information_plane(tmp_path, split="probe", estimator="kde", estimator_options={"noise_var": 0.05})
        got = values(table, "conv", 4)
    assert "12 of 60 samples have no label" in caplog.text
    everyone = mi.kde_bounds(t, np.zeros(N_SAMPLES, dtype=np.int64), 0.05)
    labelled = mi.kde_bounds(t[12:], labels[12:], 0.05)
    expected = {"input_information": everyone.input_information_upper,
                "input_information_lower": everyone.input_information_lower,
                "mutual_information": labelled.mutual_information_upper,
                "mutual_information_lower": labelled.mutual_information_lower}
    assert got == pytest.approx(expected, abs=1e-9)

    none_path = tmp_path / "none"
    write_value_run(none_path, np.full(N_SAMPLES, -1))
    got = values(information_plane(none_path, split="probe", estimator="adaptive"), "conv", 4)
    unlabelled = mi.adaptive_binning(t, np.zeros(N_SAMPLES, dtype=np.int64)).input_information
    assert got == pytest.approx({"input_information": unlabelled}, abs=1e-12)
    # channel: every (sample, position) row is one observation.
    rows = values(information_plane(none_path, "probe", "channel", estimator="binning"), "conv", 4)
    one = np.zeros(N_SAMPLES * N_POSITIONS, dtype=np.int64)
    assert rows == pytest.approx({"input_information": mi.binning(t.reshape(-1, 3), one).input_information}, abs=1e-12)


def test_missing_values_are_an_error(tmp_path):
    write_run(tmp_path)
    for estimator, options in (("binning", None), ("adaptive", None), ("kde", {"noise_var": 1.0})):
        with pytest.raises(ValueError, match="recorded without them.*probe_values='all'"):
            information_plane(tmp_path, split="probe", estimator=estimator, estimator_options=options)
    assert len(information_plane(tmp_path, split="probe")) > 0


def test_activation_without_a_known_function(tmp_path):
    z = write_value_run(tmp_path, np.arange(N_SAMPLES) % 2, module_type="LeakyReLU")
    with pytest.raises(ValueError, match="module type is 'LeakyReLU'; pass apply_activation=False"):
        information_plane(tmp_path, split="probe", estimator="binning")
    got = values(information_plane(tmp_path, split="probe", estimator="binning", apply_activation=False), "conv", 4)
    expected = mi.binning(z, np.arange(N_SAMPLES) % 2)
    assert got == pytest.approx(expected._asdict(), abs=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"estimator": "ksg"}, "Expected `estimator` to be one of \\('binary', 'binning', 'adaptive', 'kde'\\)"),
        ({"estimator": "kde"}, "state the noise variance for estimator='kde'"),
        ({"estimator": "adaptive", "estimator_options": {"range": (0, 1)}}, "to be among \\('n_bins',\\), but got \\['range'\\]"),
        ({"estimator_options": {"n_bins": 3}}, "estimator='binary' to be among \\(\\), but got \\['n_bins'\\]"),
    ],
)
def test_estimator_validation(tmp_path, kwargs, match):
    write_value_run(tmp_path, np.arange(N_SAMPLES) % 2)
    with pytest.raises(ValueError, match=match):
        information_plane(tmp_path, **kwargs)


@pytest.mark.parametrize("estimator, options", [("binning", None), ("adaptive", None), ("kde", {"noise_var": 0.1})])
def test_a_step_with_nan_values_is_named_by_the_continuous_estimators(tmp_path, estimator, options):
    """The error said only "Expected `t` to be finite", naming neither the site nor the step."""
    import torch
    from torch import nn

    from actpat.recorder import ActivationRecorder

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    x, y = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1] * 4)
    with ActivationRecorder(model, tmp_path, store_values="all") as rec:
        for step in range(3):
            batch = x.clone()
            if step == 1:
                batch[0, 0] = float("nan")  # one sample's pre-activations all NaN
            with torch.no_grad(), rec.capture(step, labels=y, split="probe"):
                model(batch)
    with pytest.raises(ValueError, match=r"site '1' holds 4 NaN or inf values at step 1 \(of split 'probe'.*"
                                         r"estimator='binary'"):
        information_plane(tmp_path, estimator=estimator, estimator_options=options)
    assert len(information_plane(tmp_path)) > 0  # the binary plane counts NaN as off
