"""information_plane() on real shards written by ShardWriter, against brute-force dict counts per sample."""

import logging
import math
from collections import Counter

import numpy as np
import pytest

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
    """I_XT, I_XT_mm, I_TY, I_TY_mm of per-sample hashable patterns, by dict counting."""
    n = len(samples)
    ln2 = math.log(2)
    h_t = h_of(samples)
    out = {"I_XT": h_t, "I_XT_mm": h_t + (len(set(samples)) - 1) / (2 * n * ln2)}
    keep = [i for i in range(n) if labels[i] >= 0]
    if keep:
        t = [samples[i] for i in keep]
        y = [int(labels[i]) for i in keep]
        ty = list(zip(t, y))
        m = len(keep)
        mm = [h_of(v) + (len(set(v)) - 1) / (2 * m * ln2) for v in (t, y, ty)]
        out["I_TY"] = h_of(t) + h_of(y) - h_of(ty)
        out["I_TY_mm"] = mm[0] + mm[1] - mm[2]
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
    table = information_plane(tmp_path)
    assert list(table.columns) == ["step", "epoch", "split", "site", "site_index", "metric", "value"]
    assert set(table.split) == {"probe"}
    assert table.site.unique().tolist() == [CONV.site, DENSE.site, FLAT_CONV.site]
    for (site, step), (samples, _) in truth.items():
        got = values(table, site, step)
        expected = brute(samples, y)
        assert set(got) == {"I_XT", "I_XT_mm", "I_TY", "I_TY_mm", "saturated"}
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
    got = values(information_plane(tmp_path), CONV.site, 0)
    for metric, value in brute(samples, y).items():
        assert got[metric] == pytest.approx(value, abs=1e-12)
    # A sample's pattern spans all its positions: per-row counting gives another (larger) n.
    assert values(information_plane(tmp_path, pattern="channel"), CONV.site, 0)["I_XT"] > math.log2(N_SAMPLES)


def test_channel_pattern_uses_rows_as_observations(tmp_path):
    truth, y = write_run(tmp_path)
    table = information_plane(open_run(tmp_path), pattern="channel", sites=[CONV.site, DENSE.site])
    _, units = truth[CONV.site, 7]
    got = values(table, CONV.site, 7)
    expected = brute([tuple(r) for r in units.tolist()], np.repeat(y, N_POSITIONS))
    for metric, value in expected.items():
        assert got[metric] == pytest.approx(value, abs=1e-12)
    with pytest.raises(ValueError, match="recorded flat with shape"):
        information_plane(tmp_path, pattern="channel", sites=[FLAT_CONV.site])


def test_partial_and_missing_labels(tmp_path, caplog):
    labels = np.arange(N_SAMPLES) % 2
    labels[:10] = -1
    truth, y = write_run(tmp_path, labels=labels)
    with caplog.at_level(logging.WARNING, logger="actpat.analysis.information"):
        table = information_plane(tmp_path, sites=[DENSE.site])
    assert "10 of 60 samples have no label" in caplog.text
    samples, _ = truth[DENSE.site, 0]
    got = values(table, DENSE.site, 0)
    for metric, value in brute(samples, labels).items():
        assert got[metric] == pytest.approx(value, abs=1e-12)

    none_path = tmp_path / "none"
    write_run(none_path, labels=np.full(N_SAMPLES, -1))
    assert set(information_plane(none_path).metric) == {"I_XT", "I_XT_mm", "saturated"}


def test_saturation_flag_when_every_sample_is_distinct(tmp_path):
    writer = ShardWriter(tmp_path)
    writer.start()
    units = ((np.arange(16)[:, None] >> np.arange(DENSE.n_units)) & 1).astype(np.uint8)
    writer.put(Record(DENSE, 3, 0, "probe", pack(units), 1, 16, 0, labels=np.arange(16) % 2))
    writer.close()
    got = values(information_plane(tmp_path), DENSE.site, 3)
    assert got["saturated"] == 1.0 and got["I_XT"] == pytest.approx(4.0) and got["I_TY"] == pytest.approx(1.0)
    assert values(information_plane(tmp_path, saturation=1.0), DENSE.site, 3)["saturated"] == 1.0


def test_incomplete_samples_are_an_error(tmp_path):
    writer = ShardWriter(tmp_path)
    writer.start()
    rows = np.zeros((5, 10), dtype=np.uint8)
    # 2 samples of 4 positions, but only 5 of the 8 observations kept.
    writer.put(Record(CONV, 0, 0, "probe", pack(rows), N_POSITIONS, 2, 0, sample_ids=np.arange(2),
                      labels=np.zeros(2, dtype=np.int64), obs_index=np.array([0, 1, 2, 3, 5])))
    writer.close()
    with pytest.raises(ValueError, match="each of its 4 positions exactly once"):
        information_plane(tmp_path)
    assert len(information_plane(tmp_path, pattern="channel")) == 5


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
        information_plane(tmp_path, **kwargs)
