"""Mutual-information estimators against closed forms, brute force and numerical integration."""

import math
from collections import Counter

import numpy as np
import pytest
from scipy import integrate, stats
from scipy.spatial.distance import cdist
from scipy.special import digamma, logsumexp

from actpat.analysis.mi import (
    InformationEstimate,
    KDEBounds,
    adaptive_binning,
    binning,
    kde_bounds,
    ksg,
    ksg_mixed,
)


# ---------------------------------------------------------------------------------------------------
# independent truth
# ---------------------------------------------------------------------------------------------------
def plugin_entropy(items) -> float:
    counts = Counter(items)
    n = sum(counts.values())
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def plugin_informations(cells, labels) -> tuple[float, float]:
    """H(T) and H(T) - H(T|Y) of hashable per-sample cells, by dict counting."""
    cells = [tuple(c) for c in cells]
    labels = [int(v) for v in labels]
    h_t = plugin_entropy(cells)
    h_ty = plugin_entropy(list(zip(cells, labels)))
    return h_t, h_t - (h_ty - plugin_entropy(labels))


def correlated_gaussians(n, rhos, seed):
    rng = np.random.default_rng(seed)
    rhos = np.asarray(rhos, dtype=float)
    x = rng.standard_normal((n, rhos.size))
    y = rhos * x + np.sqrt(1.0 - rhos**2) * rng.standard_normal((n, rhos.size))
    return x, y, float(-0.5 * np.sum(np.log2(1.0 - rhos**2)))


def scaled(a):
    a = np.asarray(a, dtype=float).reshape(len(a), -1)
    return a / a.std(axis=0)


def brute_force_ksg(x, y, k, metric="chebyshev"):
    """Kraskov algorithm 1 with full distance matrices (max over the two marginal norms), in bits."""
    n = len(x)
    dx, dy = cdist(x, x, metric), cdist(y, y, metric)
    dxy = np.maximum(dx, dy)
    total = 0.0
    for i in range(n):
        eps = np.sort(np.delete(dxy[i], i))[k - 1]
        nx = sum(1 for j in range(n) if j != i and dx[i, j] < eps)
        ny = sum(1 for j in range(n) if j != i and dy[i, j] < eps)
        total += digamma(nx + 1) + digamma(ny + 1)
    return (digamma(k) + digamma(n) - total / n) / math.log(2)


def brute_force_ksg_mixed(t, y, k):
    """Ross (2014) with a full max-norm distance matrix, in bits (every class has > k samples)."""
    n = len(t)
    d = cdist(t, t, "chebyshev")
    sizes = Counter(y.tolist())
    total = 0.0
    for i in range(n):
        same = [d[i, j] for j in range(n) if j != i and y[j] == y[i]]
        radius = sorted(same)[k - 1]
        m = sum(1 for j in range(n) if d[i, j] < radius)  # itself included
        total += digamma(sizes[y[i]]) + digamma(m)
    return (digamma(n) + digamma(k) - total / n) / math.log(2)


def mixture_information(mu) -> float:
    """I(T;Y) for y uniform on {0, 1} and t | y ~ N(+-mu, 1), by numerical integration, in bits."""

    def integrand(t):
        f = 0.5 * stats.norm.pdf(t, -mu) + 0.5 * stats.norm.pdf(t, mu)
        return -f * math.log2(f) if f > 0 else 0.0

    h_t = integrate.quad(integrand, -mu - 40, mu + 40, limit=200)[0]
    return h_t - 0.5 * math.log2(2 * math.pi * math.e)


# ---------------------------------------------------------------------------------------------------
# binning
# ---------------------------------------------------------------------------------------------------
def test_binning_values_at_bin_centres_exact():
    rng = np.random.default_rng(0)
    centres = np.array([0.5, 1.5, 2.5, 3.5])  # bins of width 1 over range (0, 4)
    idx = rng.choice(4, size=(500, 2), p=[0.1, 0.2, 0.3, 0.4])
    t = centres[idx]
    y = (idx[:, 0] + idx[:, 1]) % 3  # a deterministic function of the cell
    est = binning(t, y, n_bins=4, range=(0, 4))
    h_t, i_ty = plugin_informations(idx, y)
    assert isinstance(est, InformationEstimate)
    assert est.input_information == pytest.approx(h_t, abs=1e-12)
    assert est.mutual_information == pytest.approx(i_ty, abs=1e-12)
    assert est.mutual_information == pytest.approx(plugin_entropy(y.tolist()), abs=1e-12)  # I(T;Y) = H(Y)


def test_binning_observed_range_matches_brute_force():
    rng = np.random.default_rng(1)
    t = rng.standard_normal((300, 3))
    y = rng.integers(0, 4, 300)
    lo, hi = t.min(), t.max()
    width = (hi - lo) / 5
    cells = [tuple(min(4, math.floor((v - lo) / width)) for v in row) for row in t]
    h_t, i_ty = plugin_informations(cells, y)
    est = binning(t, y, n_bins=5)
    assert est.input_information == pytest.approx(h_t, abs=1e-12)
    assert est.mutual_information == pytest.approx(i_ty, abs=1e-12)


def test_binning_puts_a_value_on_an_edge_into_the_bin_above_it():
    """Values recorded as float16 lie on a grid that meets the edges `lo + i w` exactly, and
    `floor((v - lo) / w)` rounded some of them into the bin below (a trial's layer: 4.618 bits, not 4.622)."""
    lo, hi, n_bins = 0.07269287109375, 0.298095703125, 30
    width = (hi - lo) / n_bins
    grid = lo + np.arange(round((hi - lo) * 2**14)) * 2.0**-14  # float16 values there are multiples of 2^-14
    on_edges = [v for v in grid if any(v == lo + i * width for i in range(1, n_bins))]
    assert len(on_edges) == 2
    # Each value on an edge, and the grid value just below it: in two bins.
    t = np.array([lo, hi] + on_edges + [v - 2.0**-14 for v in on_edges])[:, None]
    y = np.array([0, 1, 0, 1, 1, 0])
    cells = [sum(1 for i in range(1, n_bins) if v >= lo + i * width) for v in t[:, 0]]  # [lo + i w, lo + (i+1) w)
    h_t, i_ty = plugin_informations([(c,) for c in cells], y)
    est = binning(t, y, n_bins=n_bins)
    assert est.input_information == pytest.approx(h_t, abs=1e-12)
    assert est.mutual_information == pytest.approx(i_ty, abs=1e-12)


def test_binning_distinct_rows_saturate_and_constant_layer_is_zero():
    t = np.arange(16.0)[:, None]
    y = np.arange(16) % 2
    assert binning(t, y, n_bins=16) == (4.0, 1.0)
    assert binning(np.full((10, 3), 0.7), np.arange(10) % 2) == (0.0, 0.0)
    assert binning(t, y, n_bins=1) == (0.0, 0.0)


def test_fixed_tanh_range_merges_relu_values_above_one():
    # ReLU outputs 1.5, 2, 3, 5 are all in the last bin of (-1, 1); the observed range separates them.
    t = np.array([1.5, 2.0, 3.0, 5.0])
    y = np.array([0, 0, 1, 1])
    assert binning(t, y, n_bins=30, range=(-1, 1)) == (0.0, 0.0)
    assert binning(t, y, n_bins=30) == (2.0, 1.0)


def test_binning_exact_for_many_units():
    # 40 units x 30 bins: rows far wider than 64 bits are still compared exactly.
    rng = np.random.default_rng(2)
    base = rng.integers(0, 30, size=(20, 40))
    rows = base[rng.integers(0, 20, 400)]
    rows[::7, -1] = (rows[::7, -1] + 1) % 30  # near-duplicates differing in the last unit only
    t = rows + 0.5
    y = rng.integers(0, 3, 400)
    h_t, i_ty = plugin_informations(rows, y)
    est = binning(t, y, n_bins=30, range=(0, 30))
    assert est.input_information == pytest.approx(h_t, abs=1e-12)
    assert est.mutual_information == pytest.approx(i_ty, abs=1e-12)


# ---------------------------------------------------------------------------------------------------
# adaptive binning
# ---------------------------------------------------------------------------------------------------
def test_adaptive_binning_equal_mass_blocks_of_pooled_ranks():
    rng = np.random.default_rng(3)
    n, d, n_bins = 120, 2, 6
    t = rng.standard_normal((n, d))
    y = rng.integers(0, 2, n)
    # n * d distinct values: equal-mass bins are blocks of n * d / n_bins consecutive pooled ranks.
    ranks = np.argsort(np.argsort(t.ravel())).reshape(n, d)
    cells = [tuple(int(r) // (n * d // n_bins) for r in row) for row in ranks]
    h_t, i_ty = plugin_informations(cells, y)
    est = adaptive_binning(t, y, n_bins=n_bins)
    assert est.input_information == pytest.approx(h_t, abs=1e-12)
    assert est.mutual_information == pytest.approx(i_ty, abs=1e-12)


def test_adaptive_binning_uniform_cells_and_labels():
    t = np.random.default_rng(4).permutation(400).astype(float)
    est = adaptive_binning(t, (t < 200).astype(int), n_bins=4)
    assert est == (pytest.approx(2.0, abs=1e-12), pytest.approx(1.0, abs=1e-12))


def test_adaptive_binning_point_mass_is_one_bin():
    # 200 ReLU zeros and 200 distinct positives, 4 bins: {0} (1/2), then two bins of 1/4 each.
    rng = np.random.default_rng(5)
    t = np.concatenate([np.zeros(200), rng.uniform(1, 2, 200)])
    est = adaptive_binning(t, np.zeros(400, dtype=int), n_bins=4)
    assert est.input_information == pytest.approx(1.5, abs=1e-12)
    assert est.mutual_information == 0.0


# ---------------------------------------------------------------------------------------------------
# KDE bounds
# ---------------------------------------------------------------------------------------------------
def direct_kde(t, y, var):
    """O(n^2) evaluation of the pairwise-distance bounds from full matrices, in bits."""
    d2 = cdist(t, t, "sqeuclidean")
    n = len(t)

    def information(scale):
        i_xt = math.log(n) - np.mean(logsumexp(-d2 / scale, axis=1))
        h_cond = 0.0
        for c in np.unique(y):
            m = y == c
            h_cond += m.mean() * (math.log(m.sum()) - np.mean(logsumexp(-d2[np.ix_(m, m)] / scale, axis=1)))
        return i_xt / math.log(2), (i_xt - h_cond) / math.log(2)

    (xu, yu), (xl, yl) = information(2 * var), information(8 * var)
    return xu, xl, yu, yl


def test_kde_two_points_closed_form():
    dist, var = 1.3, 0.4
    b = kde_bounds(np.array([[0.0], [dist]]), np.array([0, 1]), noise_var=var)
    upper = 1.0 - math.log2(1.0 + math.exp(-(dist**2) / (2 * var)))
    lower = 1.0 - math.log2(1.0 + math.exp(-(dist**2) / (8 * var)))
    assert isinstance(b, KDEBounds)
    assert b == pytest.approx((upper, lower, upper, lower), abs=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 7, 256])
def test_kde_matches_direct_evaluation(chunk_size):
    rng = np.random.default_rng(6)
    t = rng.standard_normal((150, 3))
    y = rng.integers(0, 3, 150)
    assert kde_bounds(t, y, 0.5, chunk_size=chunk_size) == pytest.approx(direct_kde(t, y, 0.5), abs=1e-9)


def test_kde_limits_and_order():
    rng = np.random.default_rng(7)
    t = rng.standard_normal((64, 4))
    y = rng.integers(0, 3, 64)
    h_y = plugin_entropy(y.tolist())
    small = kde_bounds(t, y, 1e-6)
    assert small == pytest.approx((6.0, 6.0, h_y, h_y), abs=1e-6)
    large = kde_bounds(t, y, 1e8)
    assert large == pytest.approx((0.0, 0.0, 0.0, 0.0), abs=1e-6)
    uppers = []
    for var in (1e-3, 1e-2, 0.1, 1.0, 10.0):
        b = kde_bounds(t, y, var)
        assert 0.0 <= b.input_information_lower <= b.input_information_upper <= 6.0
        uppers.append(b.input_information_upper)
    assert np.all(np.diff(uppers) < 0)  # more noise, less information


# ---------------------------------------------------------------------------------------------------
# KSG
# ---------------------------------------------------------------------------------------------------
KSG_METRICS = ["max", "euclidean"]


@pytest.mark.parametrize("metric", KSG_METRICS)
@pytest.mark.parametrize("d", [1, 2])
@pytest.mark.parametrize("rho", [0.3, 0.6, 0.9])
def test_ksg_correlated_gaussians_low_dimension(d, rho, metric):
    x, y, truth = correlated_gaussians(2000, [rho] * d, seed=0)
    assert ksg(x, y, metric=metric) == pytest.approx(truth, abs=0.05 + 0.05 * truth)


@pytest.mark.parametrize("metric", KSG_METRICS)
def test_ksg_correlated_gaussians_five_pairs(metric):
    x, y, truth = correlated_gaussians(2000, [0.3] * 5, seed=0)
    assert ksg(x, y, metric=metric) == pytest.approx(truth, abs=0.15)
    for rho in (0.6, 0.9):
        x, y, truth = correlated_gaussians(2000, [rho] * 5, seed=0)
        assert 0.6 * truth <= ksg(x, y, metric=metric) <= truth + 0.05  # biased low, documented


@pytest.mark.parametrize("metric", KSG_METRICS)
def test_ksg_unequal_correlations(metric):
    x, y, truth = correlated_gaussians(2000, [0.9, 0.5, 0.1], seed=1)
    assert 0.6 * truth <= ksg(x, y, metric=metric) <= truth + 0.05


@pytest.mark.parametrize("metric", KSG_METRICS)
@pytest.mark.parametrize("d", [1, 3])
def test_ksg_independent_is_near_zero(d, metric):
    x, y, _ = correlated_gaussians(2000, [0.0] * d, seed=2)
    assert abs(ksg(x, y, metric=metric)) < 0.05


@pytest.mark.parametrize("metric", KSG_METRICS)
def test_ksg_roughly_invariant_under_invertible_transforms(metric):
    x, y, _ = correlated_gaussians(2000, [0.6], seed=0)
    base = ksg(x, y, metric=metric)
    for fx, fy in [(np.exp(x), y), (x**3, y), (x, np.exp(y)), (np.exp(x), y**3)]:
        assert abs(ksg(fx, fy, metric=metric) - base) < 0.1


@pytest.mark.parametrize("metric, scipy_metric", [("max", "chebyshev"), ("euclidean", "euclidean")])
@pytest.mark.parametrize("d", [2, 4])  # joint dimension 4 (k-d tree candidates) and 8 (distance blocks)
def test_ksg_counts_match_brute_force(metric, scipy_metric, d):
    x, y, _ = correlated_gaussians(150, [0.7, 0.2, 0.5, 0.1][:d], seed=3)
    x, y = np.exp(x), y
    for k in (1, 3, 5):
        expected = brute_force_ksg(scaled(x), scaled(y), k, scipy_metric)
        assert ksg(x, y, k=k, metric=metric) == pytest.approx(expected, abs=1e-9)


def test_ksg_default_metric_is_euclidean():
    """The default chosen by bench/ksg_accuracy.py (smaller mean absolute error on known answers)."""
    x, y, _ = correlated_gaussians(300, [0.8, 0.4], seed=6)
    assert ksg(x, y) == ksg(x, y, metric="euclidean") != ksg(x, y, metric="max")


def test_ksg_constant_columns_add_nothing_and_seed_is_deterministic():
    x, y, _ = correlated_gaussians(500, [0.8], seed=4)
    with_constant = np.column_stack([x, np.full(500, 3.0)])
    assert ksg(with_constant, y) == pytest.approx(ksg(x, y), abs=1e-3)
    assert abs(ksg(np.zeros(500), y)) < 0.05
    assert ksg(x, y, seed=5) == ksg(x, y, seed=5)
    # Ties (a variable with 4 values) are broken by the noise, not by the order of the samples.
    tied = np.repeat(np.arange(4.0), 125)
    assert math.isfinite(ksg(tied, y))


# ---------------------------------------------------------------------------------------------------
# mixed KSG (continuous vs labels)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mu", [0.25, 0.5, 1.0, 5.0])
def test_ksg_mixed_gaussian_classes(mu):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    t = np.where(y == 1, mu, -mu) + rng.standard_normal(2000)
    assert ksg_mixed(t, y) == pytest.approx(mixture_information(mu), abs=0.05)


def test_ksg_mixed_independent_and_well_separated_classes():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 2000)
    assert abs(ksg_mixed(rng.standard_normal((2000, 3)), y)) < 0.02
    t = 20.0 * y[:, None] + rng.standard_normal((2000, 3))
    assert ksg_mixed(t, y) == pytest.approx(plugin_entropy(y.tolist()), abs=0.02)


def test_ksg_mixed_matches_brute_force_and_skips_singletons():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 120)
    t = rng.standard_normal((120, 2)) + y[:, None]
    expected = brute_force_ksg_mixed(scaled(t), y, k=3)
    assert ksg_mixed(t, y) == pytest.approx(expected, abs=1e-9)
    # A class with one sample is left out: adding one changes nothing but the noise draw.
    t1 = np.vstack([t, [[50.0, 50.0]]])
    y1 = np.append(y, 7)
    assert ksg_mixed(t1, y1) == pytest.approx(brute_force_ksg_mixed(scaled(t1)[:120], y, k=3), abs=1e-9)


# ---------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------
T = np.random.default_rng(9).standard_normal((20, 2))
Y = np.arange(20) % 2


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: binning(T, Y, n_bins=0), "Expected `n_bins` to be an int >= 1, but got 0"),
        (lambda: binning(T, Y, n_bins=2.5), "`n_bins`"),
        (lambda: binning(T, Y, range=(1, 1)), "Expected `range` to be finite with lo < hi"),
        (lambda: binning(T, Y, range=(0,)), "Expected `range` to be a pair"),
        (lambda: binning(T[:, :, None], Y), "Expected `t` to be 1-D"),
        (lambda: binning(T, Y[:5]), "one entry per observation, len\\(y\\) = len\\(t\\) = 20, but got 5"),
        (lambda: binning(T, Y + 0.5), "integer dtype"),
        (lambda: binning(np.where(T > 1, np.nan, T), Y), "Expected `t` to be finite, but got"),
        (lambda: adaptive_binning(np.full((3, 2), np.inf), Y[:3]), "finite"),
        (lambda: adaptive_binning(np.empty((0, 2)), Y[:0]), "at least one sample"),
        (lambda: kde_bounds(T, Y, 0.0), "Expected `noise_var` to be finite and > 0, but got 0.0"),
        (lambda: kde_bounds(T, Y, 1.0, chunk_size=0), "`chunk_size`"),
        (lambda: ksg(T, T[:10]), "as many samples as `x`, len\\(x\\) = 20, but got 10"),
        (lambda: ksg(T, T, k=0), "Expected `k` to be an int >= 1, but got 0"),
        (lambda: ksg(T[:3], T[:3], k=3), "Expected at least k \\+ 1 = 4 samples, but got n = 3"),
        (lambda: ksg(np.array(["a", "b"]), np.array([1.0, 2.0]), k=1), "numeric dtype"),
        (lambda: ksg(T, T, metric="manhattan"), r"`metric` to be one of \('max', 'euclidean'\)"),
        (lambda: ksg_mixed(T, np.arange(20)), "at least one class with 2 or more samples"),
        (lambda: ksg_mixed(T, Y.astype(float)), "integer dtype"),
    ],
)
def test_validation_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
