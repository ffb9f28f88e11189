"""The 12-bit task: every input once, labels from the documented construction and its symmetries."""

import itertools
import math

import numpy as np

from actpat.analysis.datasets import tishby_12bit

PHI = (1 + math.sqrt(5)) / 2
# The docstring's vertex order, written out by hand.
VERTICES = [
    (0, -1, -PHI), (-1, -PHI, 0), (-PHI, 0, -1),
    (0, -1, PHI), (-1, PHI, 0), (PHI, 0, -1),
    (0, 1, -PHI), (1, -PHI, 0), (-PHI, 0, 1),
    (0, 1, PHI), (1, PHI, 0), (PHI, 0, 1),
]  # fmt: skip


def label(bits) -> int:
    norm = math.sqrt(1 + PHI**2)
    dipole = [sum((2 * b - 1) * v[c] / norm for b, v in zip(bits, VERTICES)) for c in range(3)]
    return int(sum(c * c for c in dipole) > 9)


def test_inputs_are_all_12_bit_patterns_in_little_bit_order():
    x, y = tishby_12bit()
    assert x.shape == (4096, 12) and x.dtype == np.float64
    assert y.shape == (4096,) and y.dtype == np.int64
    assert set(np.unique(x)) == {0.0, 1.0}
    assert [int(sum(int(b) << j for j, b in enumerate(row))) for row in x] == list(range(4096))


def test_labels_follow_the_construction_and_are_balanced():
    x, y = tishby_12bit()
    expected = {bits: label(bits) for bits in itertools.product((0, 1), repeat=12)}
    assert [expected[tuple(int(b) for b in row)] for row in x] == y.tolist()
    assert int(y.sum()) == 2036
    assert abs(y.mean() - 0.5) < 0.01


def test_labels_are_invariant_under_the_symmetries():
    x, y = tishby_12bit()
    lookup = {tuple(row): lab for row, lab in zip(x.astype(int).tolist(), y.tolist())}
    v = np.array(VERTICES)

    def permutation(transform):
        image = v @ transform.T
        return [int(np.argmin(np.abs(v - p).sum(axis=1))) for p in image]

    cyclic = np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]])  # (a, b, c) -> (b, c, a) maps the icosahedron to itself
    for transform in (cyclic, -np.eye(3), np.diag([1, -1, 1])):
        perm = permutation(transform)
        assert sorted(perm) == list(range(12))
        for row, lab in lookup.items():
            moved = [0] * 12
            for j, b in enumerate(row):
                moved[perm[j]] = b
            assert lookup[tuple(moved)] == lab
    # Flipping every bit flips every spin: the squared dipole is unchanged.
    assert np.array_equal(y, y[::-1])


def test_deterministic():
    x1, y1 = tishby_12bit()
    x2, y2 = tishby_12bit()
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
