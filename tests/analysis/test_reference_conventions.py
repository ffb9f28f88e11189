"""The conventions of the reference implementation of Hartmann et al. (2021), against hand computations of
its published formulas (re-derived here, not its code):

- H(A|L) = -sum_{a,l} p(a,l) log2(p(a,l) / (1 / C)) = H(A,L) - log2 C, with C the dataset's class count and
  p(a,l) = c(a,l) / n (the joint stays empirical); I(A;L) = H(A) - H(A|L);
- normalizers: H(A|L) / min(n_units, log2(n / C)), I(A;L) / (min(n_units, log2 n) - min(n_units, log2(n / C)));
- "% patterns changed" to a reference r: (|S_t minus S_r| - |S_r minus S_t|) / K_t = (K_t - K_r) / K_t;
- the count of the most frequent pattern.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from actpat.analysis import summarize
from actpat.analysis.entropy import label_information, mutual_information
from actpat.analysis.measures import pattern_measures
from actpat.recorder.shards import Record, ShardWriter, SiteMeta


def pack(units):
    return np.packbits(np.asarray(units, dtype=np.uint8), axis=1, bitorder="little")


def reference_formulas(patterns, labels, n_units, n_classes):
    """The reference's H(A), H(A|L), I(A;L) and their normalized values, term by term."""
    n = len(patterns)
    c_a = Counter(patterns)
    c_al = Counter(zip(patterns, labels))
    h_a = -sum(c / n * math.log2(c / n) for c in c_a.values())
    h_a_given_l = -sum(c / n * math.log2((c / n) / (1 / n_classes)) for c in c_al.values())
    i_al = h_a - h_a_given_l
    max_h_a = min(n_units, math.log2(n))
    max_h_a_given_l = min(n_units, math.log2(n / n_classes))
    return {
        "entropy": h_a,
        "conditional_entropy": h_a_given_l,
        "mutual_information": i_al,
        "conditional_entropy_normalized": h_a_given_l / max_h_a_given_l,
        "mutual_information_normalized": i_al / (max_h_a - max_h_a_given_l),
    }


def test_hand_computed_example():
    # 8 observations of 2 units, classes 0 (5 obs) and 1 (3 obs) of a 4-class dataset.
    patterns = [0, 0, 0, 1, 1, 2, 2, 3]
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    bits = np.array(patterns, dtype=np.uint8)[:, None]
    # Cells: (0,0) 3, (1,0) 2, (2,1) 2, (3,1) 1 -> H(A,L) = H(3/8, 2/8, 2/8, 1/8) = H(A).
    h_al = -(3 / 8 * math.log2(3 / 8) + 2 * (2 / 8) * math.log2(2 / 8) + 1 / 8 * math.log2(1 / 8))
    nominal = label_information(bits, labels, 2, prior="nominal", n_classes=4)
    assert nominal["joint_entropy"] == pytest.approx(h_al, abs=1e-12)
    assert nominal["conditional_entropy"] == pytest.approx(h_al - 2.0, abs=1e-12)
    assert nominal["mutual_information"] == pytest.approx(2.0, abs=1e-12)  # H(A) = H(A,L) here
    assert nominal["label_entropy"] == 2.0  # the nominal prior's entropy, log2 4
    empirical = label_information(bits, labels, 2)
    h_l = -(5 / 8 * math.log2(5 / 8) + 3 / 8 * math.log2(3 / 8))
    assert empirical["mutual_information"] == pytest.approx(h_l, abs=1e-12)
    # The two conventions differ by log2 C - H(L).
    gap = nominal["mutual_information"] - empirical["mutual_information"]
    assert gap == pytest.approx(2.0 - h_l, abs=1e-12)


@pytest.mark.parametrize("n_units, n_classes, balanced", [(8, 3, False), (12, 10, True), (70, 4, False)])
def test_nominal_convention_and_normalizers_match_the_reference_formulas(n_units, n_classes, balanced):
    rng = np.random.default_rng(n_units)
    n = 600
    prior = np.linspace(1, 2, n_classes) / np.linspace(1, 2, n_classes).sum()
    labels = np.arange(n) % n_classes if balanced else rng.choice(n_classes, n, p=prior)
    units = (rng.random((n, n_units)) < 0.2 + 0.5 * (labels[:, None] % 2)).astype(np.uint8)
    units[:, n_units // 2 :] = 0  # fewer distinct patterns
    patterns = [tuple(r) for r in units.tolist()]
    truth = reference_formulas(patterns, labels.tolist(), n_units, n_classes)
    bits = pack(units)
    nominal = label_information(bits, labels, n_units, prior="nominal", n_classes=n_classes)
    for key in ("entropy", "conditional_entropy", "mutual_information",
                "conditional_entropy_normalized", "mutual_information_normalized"):
        assert nominal[key] == pytest.approx(truth[key], abs=1e-10), key
    _, measures = pattern_measures(bits, n_units, labels, n_classes=n_classes)
    assert measures["conditional_entropy_nominal"] == pytest.approx(truth["conditional_entropy"], abs=1e-10)
    assert measures["mutual_information_nominal"] == pytest.approx(truth["mutual_information"], abs=1e-10)
    empirical = label_information(bits, labels, n_units, n_classes=n_classes)
    if balanced:  # then H(L) = log2 C and both conventions agree
        assert empirical["mutual_information"] == pytest.approx(truth["mutual_information"], abs=1e-10)
    else:
        h_l = empirical["label_entropy"]
        assert h_l < math.log2(n_classes)
        assert nominal["mutual_information"] - empirical["mutual_information"] == pytest.approx(
            math.log2(n_classes) - h_l, abs=1e-10)


def test_normalizer_zero_is_nan():
    # n_units = 5 <= log2(600 / 3): both maxima are 5, the information normalizer is 0.
    rng = np.random.default_rng(1)
    info = label_information(pack(rng.integers(0, 2, (600, 5))), np.arange(600) % 3, 5)
    assert math.isnan(info["mutual_information_normalized"])
    assert info["conditional_entropy_normalized"] == pytest.approx(info["conditional_entropy"] / 5)


def test_nominal_needs_the_class_count():
    bits = np.zeros((4, 1), dtype=np.uint8)
    with pytest.raises(ValueError, match="`n_classes`.*prior='nominal'"):
        mutual_information(bits, np.array([0, 1, 0, 1]), 3, prior="nominal")
    with pytest.raises(ValueError, match="at least the 2 classes present"):
        mutual_information(bits, np.array([0, 1, 0, 1]), 3, prior="nominal", n_classes=1)


def test_relative_change_and_top_count_in_summarize(tmp_path):
    meta = SiteMeta("fc", 0, "ReLU", (4,), 4, "flat")
    steps = {0: [1, 1, 1, 2, 3, 4], 5: [1, 1, 2, 2, 2, 2], 9: [5, 6, 7, 8, 9, 1]}
    writer = ShardWriter(tmp_path)
    writer.start()
    for step, rows in steps.items():
        writer.put(Record(meta, step, 0, "probe", np.array(rows, dtype=np.uint8)[:, None], 1, 6, 0,
                          sample_ids=np.arange(6)))
    writer.close()
    table = summarize(tmp_path, progress=False).set_index(["step", "metric"])["value"]
    sets = {s: set(r) for s, r in steps.items()}
    for step, rows in steps.items():
        assert table[step, "top_count"] == max(Counter(rows).values())
        for name, ref in (("init", 0), ("final", 9)):
            added, removed = len(sets[step] - sets[ref]), len(sets[ref] - sets[step])
            assert table[step, f"distinct_change_relative_{name}"] == pytest.approx((added - removed) / len(sets[step]))
    assert table[5, "distinct_change_relative_last"] == pytest.approx((2 - 4) / 2)
