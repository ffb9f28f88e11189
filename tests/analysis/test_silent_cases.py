"""The silent wrong numbers of issue 11, each pinned by a test that fails on the code before it:

- same-observation measures (identical_fraction, hamming) paired row i with row i when sample ids were
  unknown;
- label -1 ("no label") was a class for the mi estimators, an error for entropy; float labels passed in
  some functions;
- the analysis defaulted to split "probe" while the reader defaulted to "train".
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from actpat.analysis import firing_rates, information_plane, mi, summarize
from actpat.analysis.entropy import conditional_entropy, label_information, mutual_information
from actpat.analysis.measures import pattern_measures
from actpat.recorder.shards import Record, ShardWriter, SiteMeta

META = SiteMeta("fc", 0, "ReLU", (6,), 6, "flat")


def write(path, records):
    writer = ShardWriter(path)
    writer.start()
    for record in records:
        writer.put(record)
    writer.close()
    return path


# ---------------------------------------------------------------------------------------------------
# same-observation measures
# ---------------------------------------------------------------------------------------------------
def test_stability_needs_sample_ids(tmp_path, caplog):
    """Before: two shuffled training batches of equal size without sample ids were compared row by row."""
    rng = np.random.default_rng(0)
    rows = [np.packbits(rng.integers(0, 2, (16, 6)), axis=1, bitorder="little") for _ in range(3)]
    write(tmp_path / "no_ids", [Record(META, s, 0, "train", rows[s], 1, 16, 0) for s in range(3)])
    table = summarize(tmp_path / "no_ids", split="train", progress=False)
    assert not table.metric.str.startswith(("identical_fraction", "hamming")).any()
    assert {"jaccard_init", "weighted_jaccard_last"} <= set(table.metric)  # set measures stay
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "not provably the same inputs (no sample ids were recorded)" in warned
    assert "jaccard and weighted_jaccard compare the pattern sets of other inputs" in warned
    # Ids drawn with replacement repeat within a step: the k-th occurrence of an id pairs with its k-th at
    # the other step (the same input either way), whatever order each step lists them in.
    caplog.clear()
    ids = [rng.integers(0, 8, 16) for _ in range(3)]
    write(tmp_path / "repeated", [Record(META, s, 0, "train", rows[s], 1, 16, 0, sample_ids=ids[s]) for s in range(3)])
    got = summarize(tmp_path / "repeated", split="train", progress=False).set_index(["step", "metric"])["value"]
    assert not any("not provably the same inputs" in r.getMessage() for r in caplog.records)
    on = [np.unpackbits(r, axis=1, bitorder="little")[:, :6] for r in rows]
    for step in (1, 2):
        for name, ref in (("init", 0), ("last", step - 1)):
            seen: dict[int, list[int]] = {}
            for row, sample in enumerate(ids[ref]):
                seen.setdefault(int(sample), []).append(row)
            taken = Counter()
            pairs = []
            for row, sample in enumerate(ids[step]):
                k = taken[int(sample)]
                taken[int(sample)] += 1
                if k < len(seen.get(int(sample), [])):
                    pairs.append((row, seen[int(sample)][k]))
            diff = np.array([(on[step][r] != on[ref][q]).sum() for r, q in pairs])
            assert got[step, f"identical_fraction_{name}"] == pytest.approx((diff == 0).mean())
            assert got[step, f"hamming_{name}"] == pytest.approx(diff.sum() / (6 * len(pairs)))
    # With sample ids, the rows that share an id are compared (here all of them, in another order).
    perm = rng.permutation(16)
    write(tmp_path / "ids", [Record(META, 0, 0, "train", rows[0], 1, 16, 0, sample_ids=np.arange(16)),
                             Record(META, 1, 0, "train", rows[0][perm], 1, 16, 0, sample_ids=perm)])
    got = summarize(tmp_path / "ids", split="train", progress=False).set_index(["step", "metric"])["value"]
    assert got[1, "identical_fraction_init"] == 1.0 and got[1, "hamming_init"] == 0.0


# ---------------------------------------------------------------------------------------------------
# labels
# ---------------------------------------------------------------------------------------------------
RNG = np.random.default_rng(1)
T = RNG.standard_normal((60, 2))
BITS = np.packbits(T > 0.3, axis=1, bitorder="little")
Y = (np.arange(60) % 3).astype(np.int64)
Y_PARTIAL = Y.copy()
Y_PARTIAL[::4] = -1
KEEP = Y_PARTIAL >= 0

# Every function that takes labels, as f(bits, t, y) -> its label measure.
LABEL_FUNCTIONS = {
    "label_information": lambda b, t, y: label_information(b, y, 2)["mutual_information"],
    "mutual_information": lambda b, t, y: mutual_information(b, y, 2),
    "conditional_entropy": lambda b, t, y: conditional_entropy(b, y, 2),
    "pattern_measures": lambda b, t, y: pattern_measures(b, 2, y)[1]["mutual_information"],
    # A fixed range: the same bins for all samples and for the labelled ones.
    "binning": lambda b, t, y: mi.binning(t, y, n_bins=4, range=(-4.0, 4.0)).mutual_information,
    "adaptive_binning": lambda b, t, y: mi.adaptive_binning(t, y, n_bins=4).mutual_information,
    "kde_bounds": lambda b, t, y: mi.kde_bounds(t, y, 0.5).mutual_information_upper,
    "ksg_mixed": lambda b, t, y: mi.ksg_mixed(t, y),
}


@pytest.mark.parametrize("name", LABEL_FUNCTIONS)
def test_no_label_is_left_out_everywhere(name):
    """Before: mi.binning(t, [-1, -1, 0, 1]) counted -1 as a class; entropy raised on it."""
    func = LABEL_FUNCTIONS[name]
    if name == "adaptive_binning":
        # Bins are the quantiles of the whole layer; I(T;Y) is the plug-in of the labelled samples' cells.
        edges = np.unique(np.quantile(T, np.linspace(0.0, 1.0, 5)))
        cells = [tuple(r) for r in np.searchsorted(edges[1:-1], T, side="right")[KEEP].tolist()]
        expected = plugin_information(cells, Y[KEEP].tolist())
    else:
        expected = func(BITS[KEEP], T[KEEP], Y[KEEP])
    assert func(BITS, T, Y_PARTIAL) == pytest.approx(expected, abs=1e-9)


def plugin_information(a, b) -> float:
    def h(items):
        p = np.array(list(Counter(items).values())) / len(items)
        return float(-(p * np.log2(p)).sum())

    return h(a) + h(b) - h(list(zip(a, b)))


@pytest.mark.parametrize("name", LABEL_FUNCTIONS)
@pytest.mark.parametrize("bad", [Y.astype(np.float64), Y.astype(bool), np.where(Y == 0, -2, Y)])
def test_float_bool_and_negative_labels_are_errors_everywhere(name, bad):
    """Before: mi accepted bool labels and entropy's messages differed; now one check, one message."""
    with pytest.raises(ValueError, match=r"integer dtype \(class indices, -1 = no label\)|or -1 for an observation"):
        LABEL_FUNCTIONS[name](BITS, T, bad)


def test_binning_minus_one_is_not_a_class():
    """The example of the issue: two unlabelled samples must not form a class of their own."""
    t = np.array([0.0, 1.0, 0.0, 1.0])
    i_xt, i_ty = mi.binning(t, np.array([-1, -1, 0, 1]), n_bins=2)  # (input_information, mutual_information)
    assert i_xt == 1.0  # all four samples
    assert i_ty == 1.0  # the two labelled samples: one bit (with -1 as a class it was 0.5)
    assert np.isnan(mi.binning(t, np.full(4, -1), n_bins=2)[1])


# ---------------------------------------------------------------------------------------------------
# split
# ---------------------------------------------------------------------------------------------------
def test_split_none_is_the_only_split(tmp_path):
    """Before: the analysis defaulted to "probe", so a run of training batches needed split="train"."""
    bits = np.packbits(np.eye(6, dtype=np.uint8)[[0, 1, 2, 2]], axis=1, bitorder="little")
    run = write(tmp_path / "train_only", [Record(META, s, 0, "train", bits, 1, 4, 0, labels=np.array([0, 1, 0, 1]))
                                          for s in (0, 1)])
    assert set(summarize(run, progress=False).split) == {"train"}
    assert set(information_plane(run).split) == {"train"}
    assert list(firing_rates(run)["fc"]) == [0, 1]


def test_several_splits_must_be_named(tmp_path):
    bits = np.zeros((4, 1), dtype=np.uint8)
    run = write(tmp_path / "two", [Record(META, 0, 0, split, bits, 1, 4, 0) for split in ("probe", "train")])
    for call in (lambda **kw: summarize(run, progress=False, **kw), lambda **kw: information_plane(run, **kw),
                 lambda **kw: firing_rates(run, **kw)):
        with pytest.raises(ValueError, match=r"recorded splits \['probe', 'train'\], but got None"):
            call()
        with pytest.raises(ValueError, match=r"recorded splits \['probe', 'train'\], but got 'val'"):
            call(split="val")
        assert len(call(split="train")) > 0


def test_float_bits_are_one_error_everywhere_bits_are_taken():
    """Packed patterns are uint8; a float matrix of 0/1 (unpacked by mistake) gets the same message everywhere."""
    from actpat.analysis.counts import pattern_counts
    from actpat.analysis.regions import sample_patterns
    from actpat.analysis.units import unit_stats

    wrong = BITS.astype(np.float64)
    calls = [
        lambda: pattern_counts(wrong, 2),
        lambda: unit_stats(wrong, 2),
        lambda: pattern_measures(wrong, 2, Y),
        lambda: sample_patterns(wrong, 2, np.arange(60), np.zeros(60, dtype=np.int64)),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"Expected `bits` to have dtype uint8 \(packed bits\), but got float64"):
            call()
