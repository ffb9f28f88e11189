"""Mutual-information estimators for continuous activations, in bits (SPEC section 5).

Four families, each a small public wrapper around a private ``_compute_*`` function (the layout of
scikit-learn's ``_mutual_info.py``):

- :func:`binning`: equal-width bins per layer (Shwartz-Ziv & Tishby 2017);
- :func:`adaptive_binning`: equal-mass (quantile) bins per layer (Chelombiev et al. 2019);
- :func:`kde_bounds`: pairwise-distance upper and lower bounds for a layer plus Gaussian noise
  (Kolchinsky & Tracey 2017, as used by Saxe et al. 2018);
- :func:`ksg` (continuous-continuous, Kraskov et al. 2004) and :func:`ksg_mixed` (continuous activations
  against discrete class labels, Ross 2014): k-nearest-neighbour estimators.

The binning and KDE estimators return ``I(T;X)`` and ``I(T;Y)`` for a layer ``T`` of a deterministic
network with ``X`` uniform over the ``n`` given samples and ``Y`` their class labels. Binned rows are
counted exactly (one code per distinct row, no hashing); the plug-in label measures are those of
:mod:`actpat.analysis.entropy`. The module imports numpy and scipy only.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist
from scipy.special import digamma

from actpat.analysis._validation import NO_LABEL, check_labels
from actpat.analysis.entropy import entropy, label_information_from_codes

__all__ = [
    "InformationEstimate",
    "KDEBounds",
    "adaptive_binning",
    "binning",
    "kde_bounds",
    "ksg",
    "ksg_mixed",
]

_LN2 = math.log(2.0)
# Relative size of the tie-breaking noise of the k-NN estimators (scikit-learn's choice).
_JITTER = 1e-10
# Entries of the (rows, n) distance blocks of the Euclidean KSG (16 MB per float64 block).
_KSG_BLOCK = 1 << 21
# Up to this joint dimension the Euclidean KSG finds neighbours with k-d trees, above by blocks of distances.
_KSG_TREE_DIMS = 6
#: Norms of the marginal spaces of :func:`ksg`, as Minkowski ``p``.
KSG_METRICS = {"max": np.inf, "euclidean": 2.0}
# Rows of the (chunk, n) distance block of the KDE bounds: at n = 20000 each float64 block is 41 MB and
# about three are alive at once.
_KDE_CHUNK = 256


class InformationEstimate(NamedTuple):
    """``I(X;T)`` and ``I(T;Y)`` of one layer at one time point, in **bits** (metric names of
    :mod:`actpat.analysis.metrics`)."""

    input_information: float
    """``I(X;T)``, from every sample."""
    mutual_information: float
    """``I(T;Y)``, from the labelled samples; NaN when none has a label."""


class KDEBounds(NamedTuple):
    """Pairwise-distance bounds of :func:`kde_bounds`, in **bits**."""

    input_information_upper: float
    input_information_lower: float
    mutual_information_upper: float
    """NaN when no sample has a label."""
    mutual_information_lower: float
    """NaN when no sample has a label."""


# ---------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------
def _check_samples(a, name: str) -> np.ndarray:
    """``(n, d)`` finite float64 array; a 1-D input is one feature, ``(n, 1)``."""
    arr = np.asarray(a)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"Expected `{name}` to have a numeric dtype, but got {arr.dtype}.")
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"Expected `{name}` to be 1-D (n,) or 2-D (n, d), but got shape {arr.shape}.")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"Expected `{name}` to hold at least one sample and one feature, but got shape {arr.shape}.")
    arr = arr.astype(np.float64, copy=False)
    n_bad = int(np.count_nonzero(~np.isfinite(arr)))
    if n_bad:
        raise ValueError(f"Expected `{name}` to be finite, but got {n_bad} NaN or inf values.")
    return arr


def _check_y(y, n: int) -> np.ndarray:
    """Integer class labels of the ``n`` samples (``-1`` = no label), validated as everywhere in the analysis."""
    return check_labels(y, n, name="y", of="len(t)")


def _classes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense class codes ``0 .. L - 1`` of labels without ``-1``, and the class sizes."""
    _, codes, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    return codes.reshape(-1).astype(np.int64, copy=False), sizes


def _check_n_bins(n_bins) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"Expected `n_bins` to be an int >= 1, but got {n_bins!r}.")
    return int(n_bins)


def _check_k(k, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"Expected `k` to be an int >= 1, but got {k!r}.")
    if n < k + 1:
        raise ValueError(f"Expected at least k + 1 = {k + 1} samples, but got n = {n}.")
    return int(k)


def _check_positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"Expected `{name}` to be a positive number, but got {value!r}.")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"Expected `{name}` to be finite and > 0, but got {value!r}.")
    return float(value)


# ---------------------------------------------------------------------------------------------------
# binning
# ---------------------------------------------------------------------------------------------------
def _row_codes(binned: np.ndarray) -> tuple[np.ndarray, int]:
    """Exact codes ``0 .. K - 1`` of the distinct rows of an integer matrix, and ``K``."""
    rows = np.ascontiguousarray(binned)
    # One opaque item per row: np.unique then compares whole rows byte by byte (no hash, no collision).
    items = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).reshape(-1)
    _, codes = np.unique(items, return_inverse=True)
    codes = codes.reshape(-1).astype(np.int64, copy=False)
    return codes, int(codes.max()) + 1


def _bin_dtype(n_bins: int) -> type:
    return np.uint8 if n_bins <= 1 << 8 else np.uint16 if n_bins <= 1 << 16 else np.int64


def _compute_plugin(binned: np.ndarray, labels: np.ndarray) -> InformationEstimate:
    codes, k = _row_codes(binned)
    h_t = entropy(np.bincount(codes, minlength=k))
    if not (labels != NO_LABEL).any():
        return InformationEstimate(h_t, math.nan)
    info = label_information_from_codes(codes, labels, validate_args=False)
    return InformationEstimate(h_t, info["mutual_information"])


def _equal_width_bins(t: np.ndarray, n_bins: int, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(t.shape, dtype=_bin_dtype(n_bins))
    # The edges themselves, as the docstring defines them: a value on an edge is in the bin above it
    # (`floor((t - lo) / w)` rounds some of those into the bin below).
    inner = lo + np.arange(1, n_bins) * ((hi - lo) / n_bins)
    return np.searchsorted(inner, t, side="right").astype(_bin_dtype(n_bins))


def _equal_mass_bins(t: np.ndarray, n_bins: int) -> np.ndarray:
    edges = np.unique(np.quantile(t, np.linspace(0.0, 1.0, n_bins + 1)))
    # Bins are [e_i, e_{i+1}), the last one closed; a point mass repeats a quantile and so shares one bin.
    return np.searchsorted(edges[1:-1], t, side="right").astype(_bin_dtype(n_bins))


def _check_range(range) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in range)
    except (TypeError, ValueError):
        raise ValueError(f"Expected `range` to be a pair (lo, hi) of numbers, but got {range!r}.") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"Expected `range` to be finite with lo < hi, but got {range!r}.")
    return lo, hi


def binning(t, y, *, n_bins: int = 30, range: tuple[float, float] | None = None) -> InformationEstimate:
    """Information plane coordinates by equal-width binning (Shwartz-Ziv & Tishby 2017).

    Every value of the layer is replaced by the index of its bin; ``n_bins`` equal-width bins cover the
    layer's observed range ``[t.min(), t.max()]`` (all units share the bins), or ``range``. With ``X``
    uniform over the ``n`` samples and a deterministic network, ``T_b`` is a function of ``X``, so
    ``I(T;X) = H(T_b)`` and ``I(T;Y) = H(T_b) - H(T_b|Y)``, both plug-in from exact row counts.

    Parameters
    ----------
    t : array_like
        ``(n, d)`` activations of one layer for ``n`` samples (a 1-D array is one unit).
    y : array_like
        ``(n,)`` integer class label of each sample, ``-1`` for none (left out of ``I(T;Y)``).
    n_bins : int, default 30
        Number of equal-width bins (30 in the original work).
    range : (float, float) or None, default None
        ``(lo, hi)`` with ``lo < hi``: fixed bin range; values outside fall into the first or last bin.
        ``None``: the layer's observed ``(t.min(), t.max())`` at this time point.

    Returns
    -------
    InformationEstimate
        ``input_information`` = I(X;T) from all samples and ``mutual_information`` = I(T;Y) from the
        labelled ones, in **bits**; ``0 <= I(T;Y) <= log2 n``, ``0 <= I(X;T) <= log2 n``. ``I(T;Y)`` is
        NaN when no sample has a label.

    Raises
    ------
    ValueError
        Bad shapes, non-finite values, float labels, ``n_bins < 1`` or a bad ``range``.

    Notes
    -----
    The original code bins tanh activations over the fixed range ``(-1, 1)``. That range is wrong for
    ReLU layers: half of the bins lie below 0, where no ReLU output is, and all values above 1 are
    merged into the last bin, so ``I(T;X)`` collapses as the weights grow and the plot shows a
    "compression" made by the binning (Saxe et al. 2018). The default observed range adapts to the
    layer; pass ``range=(-1, 1)`` to reproduce the original tanh setting.

    A constant layer (``t.min() == t.max()``) is one bin: both informations are 0. Bin edges are
    half-open ``[lo + i w, lo + (i + 1) w)`` with ``w = (hi - lo) / n_bins``, the last bin closed.

    The estimate is exact for the binned variable (tests: exact to 1e-12 bits against brute-force
    counts); as an estimate of the information of the continuous layer it depends on ``n_bins`` and
    saturates at ``log2 n`` when every sample falls into its own cell.

    References
    ----------
    Shwartz-Ziv, R. & Tishby, N. (2017). Opening the black box of deep neural networks via information.
    arXiv:1703.00810.
    Saxe, A. M. et al. (2018). On the information bottleneck theory of deep learning. ICLR.

    Examples
    --------
    >>> t = np.array([[0.0], [0.0], [1.0], [1.0]])
    >>> binning(t, np.array([0, 0, 1, 1]), n_bins=2)
    InformationEstimate(input_information=1.0, mutual_information=1.0)
    >>> binning(t, np.array([0, -1, 1, -1]), n_bins=2)  # -1: no label
    InformationEstimate(input_information=1.0, mutual_information=1.0)
    """
    t = _check_samples(t, "t")
    labels = _check_y(y, t.shape[0])
    n_bins = _check_n_bins(n_bins)
    if range is None:
        lo, hi = float(t.min()), float(t.max())
    else:
        lo, hi = _check_range(range)
    return _compute_plugin(_equal_width_bins(t, n_bins, lo, hi), labels)



def adaptive_binning(t, y, *, n_bins: int = 30) -> InformationEstimate:
    """Information plane coordinates by equal-mass binning (Chelombiev et al. 2019).

    As :func:`binning`, but the ``n_bins + 1`` bin edges are the quantiles ``0, 1/n_bins, ..., 1`` of all
    values of the layer at this time point (pooled over units), so each bin holds about the same number
    of values and the bins follow the layer's distribution as it changes during training.

    Parameters
    ----------
    t : array_like
        ``(n, d)`` activations of one layer (a 1-D array is one unit).
    y : array_like
        ``(n,)`` integer class label of each sample, ``-1`` for none (left out of ``I(T;Y)``).
    n_bins : int, default 30
        Number of equal-mass bins.

    Returns
    -------
    InformationEstimate
        ``input_information`` = I(X;T) (all samples) and ``mutual_information`` = I(T;Y) (labelled
        samples; NaN if none) in **bits**.

    Raises
    ------
    ValueError
        Bad shapes, non-finite values, float labels or ``n_bins < 1``.

    Notes
    -----
    Quantiles are numpy's default (linear interpolation). Repeated quantiles are merged, so a point mass
    holding more than ``1 / n_bins`` of the values (the zeros of a ReLU layer) becomes a single bin and
    fewer than ``n_bins`` bins are used; the rest of the values share the remaining bins by mass.
    Bins are half-open ``[e_i, e_{i+1})``, the last closed.

    Exact for the binned variable (tests: 1e-12 bits against brute-force counts, and ``log2 n_bins`` for
    ``n`` distinct values, ``n`` a multiple of ``n_bins``).

    References
    ----------
    Chelombiev, I., Houghton, C. & O'Donnell, C. (2019). Adaptive estimators show information compression
    in deep neural networks. ICLR.

    Examples
    --------
    >>> t = np.arange(8.0)
    >>> adaptive_binning(t, np.array([0, 0, 0, 0, 1, 1, 1, 1]), n_bins=4)
    InformationEstimate(input_information=2.0, mutual_information=1.0)
    """
    t = _check_samples(t, "t")
    labels = _check_y(y, t.shape[0])
    n_bins = _check_n_bins(n_bins)
    return _compute_plugin(_equal_mass_bins(t, n_bins), labels)


# ---------------------------------------------------------------------------------------------------
# pairwise-distance (KDE) bounds
# ---------------------------------------------------------------------------------------------------
def _compute_kde_terms(t: np.ndarray, classes: np.ndarray | None, noise_var: float, chunk: int) -> np.ndarray:
    """Means over samples of the four log-sum-exp terms, in nats: (all, own class) x (KL, BD).

    ``classes`` are dense codes ``0 .. L - 1`` (:func:`_classes`), every code present. Without them only the
    two terms over all samples are computed (the others stay 0).
    """
    n = t.shape[0]
    if classes is not None:  # samples grouped by class: class c's columns are one slice, the c-th
        order = np.argsort(classes, kind="stable")
        t, classes = t[order], classes[order]
        starts = np.flatnonzero(np.r_[True, classes[1:] != classes[:-1]])
    sq = np.einsum("ij,ij->i", t, t)
    sums = np.zeros(4)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        d2 = sq[start:stop, None] + sq[None, :] - 2.0 * (t[start:stop] @ t.T)
        np.maximum(d2, 0.0, out=d2)
        # The self-distance is 0 exactly; the expansion above leaves rounding error that tiny noise amplifies.
        rows = np.arange(stop - start)
        d2[rows, np.arange(start, stop)] = 0.0
        for j, var in enumerate((noise_var, 4.0 * noise_var)):
            # Every exponent is <= 0 and a row's own term is exp(0) = 1, so the plain sum neither
            # overflows nor underflows to 0: log-sum-exp needs no shift by the row maximum.
            e = np.exp(d2 * (-0.5 / var))
            sums[2 * j] += np.log(e.sum(axis=1)).sum()
            if classes is not None:
                own = np.add.reduceat(e, starts, axis=1)[rows, classes[start:stop]]
                sums[2 * j + 1] += np.log(own).sum()
    return sums / n


def _compute_kde_bounds(t: np.ndarray, labels: np.ndarray, noise_var: float, chunk: int) -> KDEBounds:
    """The four bounds in bits: I(X;T) from every sample, I(T;Y) from the labelled ones (NaN if none)."""
    log_n = math.log(t.shape[0])
    labelled = labels != NO_LABEL
    if labelled.all():
        lse_kl, lse_kl_class, lse_bd, lse_bd_class = _compute_kde_terms(t, _classes(labels)[0], noise_var, chunk)
    else:
        lse_kl, _, lse_bd, _ = _compute_kde_terms(t, None, noise_var, chunk)
    xt_upper, xt_lower = log_n - lse_kl, log_n - lse_bd
    if not labelled.any():
        return KDEBounds(xt_upper / _LN2, xt_lower / _LN2, math.nan, math.nan)
    if labelled.all():
        t_lab, log_m, ty_kl, ty_bd = t, log_n, lse_kl, lse_bd
    else:
        t_lab = t[labelled]
        log_m = math.log(t_lab.shape[0])
        ty_kl, lse_kl_class, ty_bd, lse_bd_class = _compute_kde_terms(
            t_lab, _classes(labels[labelled])[0], noise_var, chunk
        )
    sizes = _classes(labels[labelled])[1]
    # mean over samples of log n_{y_i} = sum_y p(y) log n_y
    mean_log_class = float(np.sum(sizes * np.log(sizes)) / t_lab.shape[0])
    # H(T) - sum_y p(y) H(T|Y=y); the noise entropy and normalizing constants cancel.
    ty_upper = (log_m - ty_kl) - (mean_log_class - lse_kl_class)
    ty_lower = (log_m - ty_bd) - (mean_log_class - lse_bd_class)
    return KDEBounds(*(float(v) / _LN2 for v in (xt_upper, xt_lower, ty_upper, ty_lower)))


def kde_bounds(t, y, noise_var: float, *, chunk_size: int = _KDE_CHUNK) -> KDEBounds:
    """Upper and lower bounds on the information of a noisy layer (Kolchinsky & Tracey 2017).

    The layer is made stochastic as in Saxe et al. (2018): ``T = h(X) + Z``, ``Z ~ N(0, noise_var I)``,
    ``X`` uniform over the ``n`` samples. ``T`` is then a mixture of ``n`` Gaussians and its entropy is
    bounded by pairwise distances between the components: the KL divergence gives an upper bound, the
    Bhattacharyya distance a lower bound. With ``d2_ij = ||h_i - h_j||^2``::

        I(T;X)_upper = log n - mean_i log sum_j exp(-d2_ij / (2 noise_var))
        I(T;X)_lower = log n - mean_i log sum_j exp(-d2_ij / (8 noise_var))

    (``H(T|X)``, the Gaussian noise entropy, cancels). ``I(T;Y) = H(T) - sum_y p(y) H(T|Y=y)`` applies the
    same bound to ``T`` and to each class's mixture.

    Parameters
    ----------
    t : array_like
        ``(n, d)`` activations ``h`` of one layer (a 1-D array is one unit).
    y : array_like
        ``(n,)`` integer class label of each sample, ``-1`` for none: ``I(T;Y)`` is then bounded on the
        labelled samples only (a mixture of those), ``I(T;X)`` on all.
    noise_var : float
        Variance of the added isotropic Gaussian noise, ``> 0``, in the units of ``t`` squared.
    chunk_size : int, default 256
        Rows of the distance block held at once: memory is ``O(chunk_size * n)``, not ``O(n^2)``, beside
        a copy of ``t`` grouped by class (two where some labels are ``-1``).

    Returns
    -------
    KDEBounds
        ``input_information_upper``, ``input_information_lower``, ``mutual_information_upper``,
        ``mutual_information_lower`` in **bits** (the last two NaN when no sample has a label).

    Raises
    ------
    ValueError
        Bad shapes, non-finite values, float labels, ``noise_var <= 0`` or ``chunk_size < 1``.

    Notes
    -----
    ``0 <= input_information_lower <= input_information_upper <= log2 n`` always. As ``noise_var -> 0``
    (distinct rows) both ``I(T;X)`` bounds tend to ``log2 n`` and both ``I(T;Y)`` bounds to the label
    entropy ``H(Y)``; as ``noise_var -> inf`` all four tend to 0. The ``I(T;Y)`` values are differences of two bounds of the
    same kind (Saxe et al.'s usage), so they are estimates, not guaranteed bounds, and their order is not
    guaranteed. Nothing is clipped. The result depends on ``noise_var``, which must be stated with it.

    Tests: the closed form for two points (1e-12 bits), a direct ``O(n^2)`` evaluation (1e-9 bits), and
    the small/large-noise limits (1e-6 bits).

    References
    ----------
    Kolchinsky, A. & Tracey, B. D. (2017). Estimating mixture entropy with pairwise distances. Entropy 19(7).
    Saxe, A. M. et al. (2018). On the information bottleneck theory of deep learning. ICLR.

    Examples
    --------
    >>> t = np.array([[0.0], [10.0]])
    >>> b = kde_bounds(t, np.array([0, 1]), noise_var=0.01)
    >>> [round(v, 6) for v in b]
    [1.0, 1.0, 1.0, 1.0]
    """
    t = _check_samples(t, "t")
    labels = _check_y(y, t.shape[0])
    noise_var = _check_positive(noise_var, "noise_var")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"Expected `chunk_size` to be an int >= 1, but got {chunk_size!r}.")
    return _compute_kde_bounds(t, labels, noise_var, int(chunk_size))


# ---------------------------------------------------------------------------------------------------
# k-nearest-neighbour estimators
# ---------------------------------------------------------------------------------------------------
def _prepare_continuous(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance columns plus tiny noise, so that max-norm distances are comparable and tie-free."""
    std = a.std(axis=0)
    # A constant column carries no information; it is left unscaled and the noise makes it pure noise.
    a = a / np.where(std > 0, std, 1.0)
    scale = _JITTER * np.maximum(1.0, np.mean(np.abs(a), axis=0))
    return a + scale * rng.standard_normal(a.shape)


def _count_within(tree: cKDTree, points: np.ndarray, radius: np.ndarray, p: float = np.inf) -> np.ndarray:
    """Neighbours strictly closer than ``radius`` (Minkowski ``p``-norm), the point itself included."""
    return np.asarray(tree.query_ball_point(points, np.nextafter(radius, 0.0), p=p, return_length=True))


def _joint_kth_distance_tree(x: np.ndarray, y: np.ndarray, k: int, p: float) -> np.ndarray:
    """As :func:`_joint_kth_distance` for ``p = 2``, from k-d tree candidates (low joint dimension).

    ``m = max(||dx||, ||dy||) <= ||(dx, dy)|| <= sqrt(2) m``: the ``k + 1`` nearest points (self included)
    in the joint Euclidean norm lie within ``r_k`` of it under ``m`` as well, so the ``k``-th neighbour
    under ``m`` is at most ``r_k`` away, and every point that close under ``m`` lies in the joint ball
    of radius ``sqrt(2) r_k``. The exact distances of those candidates give the answer.
    """
    xy = np.hstack((x, y))
    tree = cKDTree(xy)
    radius = tree.query(xy, k=k + 1)[0][:, k] * (math.sqrt(2.0) * (1.0 + 1e-9))
    n = x.shape[0]
    out = np.empty(n)
    rows = max(1, _KSG_BLOCK // (64 * (k + 1)))
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        candidates = tree.query_ball_point(xy[start:stop], radius[start:stop])
        lengths = np.fromiter(map(len, candidates), dtype=np.int64, count=stop - start)
        cols = np.concatenate(candidates).astype(np.int64)
        owner = np.repeat(np.arange(start, stop), lengths)
        d = np.maximum(np.linalg.norm(x[owner] - x[cols], axis=1), np.linalg.norm(y[owner] - y[cols], axis=1))
        d = d[np.lexsort((d, owner))]
        # Within each point's sorted candidates, position 0 is the point itself (distance 0).
        out[start:stop] = d[np.cumsum(lengths) - lengths + k]
    return out


def _joint_kth_distance(x: np.ndarray, y: np.ndarray, k: int, p: float) -> np.ndarray:
    """Distance of each sample to its ``k``-th neighbour under ``max(||dx||_p, ||dy||_p)``."""
    if p == np.inf:
        # The max over both marginal max-norms is the max-norm of the joint space: one k-d tree.
        xy = np.hstack((x, y))
        return cKDTree(xy).query(xy, k=k + 1, p=np.inf)[0][:, k]
    if x.shape[1] + y.shape[1] <= _KSG_TREE_DIMS:
        return _joint_kth_distance_tree(x, y, k, p)
    n = x.shape[0]
    out = np.empty(n)
    rows = max(1, _KSG_BLOCK // n)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        d = np.maximum(cdist(x[start:stop], x, "minkowski", p=p), cdist(y[start:stop], y, "minkowski", p=p))
        # Column 0 of the partition is the sample itself (distance 0).
        out[start:stop] = np.partition(d, k, axis=1)[:, k]
    return out


def _compute_ksg(x: np.ndarray, y: np.ndarray, k: int, p: float = np.inf) -> float:
    """Kraskov et al. algorithm 1 with ``p``-norms in the marginal spaces, in nats."""
    n = x.shape[0]
    eps = _joint_kth_distance(x, y, k, p)
    nx = _count_within(cKDTree(x), x, eps, p) - 1
    ny = _count_within(cKDTree(y), y, eps, p) - 1
    return float(digamma(k) + digamma(n) - np.mean(digamma(nx + 1) + digamma(ny + 1)))


def _compute_ksg_mixed(t: np.ndarray, classes: np.ndarray, sizes: np.ndarray, k: int) -> float:
    """Ross (2014), in nats; samples of singleton classes are left out."""
    keep = sizes[classes] > 1
    t, classes = t[keep], classes[keep]
    radius = np.empty(t.shape[0])
    k_used = np.empty(t.shape[0])
    for c in np.unique(classes):
        members = np.flatnonzero(classes == c)
        k_c = min(k, members.size - 1)
        radius[members] = cKDTree(t[members]).query(t[members], k=k_c + 1, p=np.inf)[0][:, k_c]
        k_used[members] = k_c
    m = _count_within(cKDTree(t), t, radius)
    n_c = sizes[classes]
    return float(digamma(t.shape[0]) + np.mean(digamma(k_used)) - np.mean(digamma(n_c)) - np.mean(digamma(m)))


def ksg(x, y, *, k: int = 3, metric: str = "euclidean", seed: int = 0) -> float:
    """Mutual information of two continuous variables by k-nearest neighbours (Kraskov et al. 2004).

    Algorithm 1 of Kraskov, Stögbauer & Grassberger: distances are measured within X and within Y
    with the norm ``metric``, the joint distance of two samples is the larger of the two; for each
    sample, ``eps_i`` is the joint distance to its ``k``-th neighbour, ``n_x(i)`` and ``n_y(i)`` count
    the other samples strictly closer than ``eps_i`` in each marginal space, and::

        I = psi(k) + psi(n) - mean_i [psi(n_x(i) + 1) + psi(n_y(i) + 1)]

    Neighbour searches use ``scipy.spatial.cKDTree``. With ``metric="max"`` they are ``O(n log n)``
    when the joint data has a low intrinsic dimension (bench/mi_speed.py, n = 4096 -> 20000: time
    exponent 1.1 to 1.4 for one Gaussian pair) and degrade towards ``O(n^2)`` as it grows (exponent
    1.5 to 1.8 for layers of intrinsic dimension 8). With ``metric="euclidean"`` the joint neighbours
    come from k-d tree candidates up to a joint dimension ``d_x + d_y`` of 6 and from exact blocks of
    pairwise distances above (``O(n^2 (d_x + d_y))`` time, 16 MB per block): 6 to 28 s at n = 10000
    on one busy core for ``d_x = d_y = 5 .. 10``, where the max-norm k-d trees took 6 to 58 s.

    Parameters
    ----------
    x : array_like
        ``(n, d_x)`` samples of the first variable (a 1-D array is one feature).
    y : array_like
        ``(n, d_y)`` samples of the second variable.
    k : int, default 3
        Number of neighbours; larger ``k`` lowers the variance and raises the bias.
    metric : {"euclidean", "max"}, default "euclidean"
        Norm within each marginal space. ``"max"`` is Kraskov et al.'s max-norm (the joint distance is
        then the max-norm of the joint space); ``"euclidean"`` is the default of the benchmark-mi suite.
        The default is the one with the smaller error on known answers (bench/ksg_accuracy.py, table in
        the README): equal for one pair, 6 to 9 % smaller mean absolute error for 2 to 10 pairs of
        correlated Gaussians and their invertible transforms, n = 1000 to 10000.
    seed : int, default 0
        Seed of the tie-breaking noise (the result is deterministic for a fixed seed).

    Returns
    -------
    float
        ``I(X;Y)`` in **bits**. Not clipped: a negative value is estimation noise around 0 (clip with
        ``max(0, ...)`` for display, but keep the raw value when averaging).

    Raises
    ------
    ValueError
        Bad shapes, different ``n``, non-finite values, ``k < 1``, ``n < k + 1`` or an unknown
        ``metric``.

    Notes
    -----
    As in scikit-learn, every column is first scaled to unit standard deviation (the true information
    is invariant, the neighbourhoods become comparable across columns) and noise of relative
    size 1e-10 from ``numpy.random.default_rng(seed)`` is added, so that repeated values (ties, which
    the estimator assumes away) are broken deterministically. A constant column is left unscaled and so
    becomes pure 1e-10 noise: it adds nothing. The estimator assumes densities: point masses, such as
    the rows of a ReLU layer with every unit off, form clusters of width 1e-10 whose neighbour counts
    bias the estimate (Gao et al. 2017), so use it on continuous activations (tanh, pre-activations);
    discrete labels belong to :func:`ksg_mixed`, binary patterns to the plug-in estimates of
    :mod:`actpat.analysis.entropy`.

    The estimator is biased low for strong dependence in many dimensions (its neighbourhoods are not
    small enough): with 5 pairs of ``rho = 0.9`` (true 5.99 bits) and ``n = 3000`` it gives about 4.6
    (max-norm 4.4), with 10 pairs (11.98 bits) about 5.5 (max-norm 4.8).

    Tolerance on the tests, for both metrics (seed 0, ``n = 2000``), against ``-0.5 * sum log2(1 - rho_i^2)`` for ``d``
    independent pairs of correlated Gaussians: ``d = 1, 2``, ``rho`` up to 0.9: within
    ``0.05 + 0.05 * I`` bits; ``d = 5``, ``rho = 0.3``: within 0.15 bits; ``d = 5``, ``rho = 0.6, 0.9``
    and ``d = 3``, ``rho = (0.9, 0.5, 0.1)``: between ``0.6 * I`` and ``I + 0.05``. Independent
    variables: ``|I| < 0.05`` bits. Invertible transforms (``exp``, cube) of one marginal (``d = 1``)
    change it by less than 0.1 bits. The counts are exactly those of a brute-force ``O(n^2)``
    neighbour search with either norm (tested).

    References
    ----------
    Kraskov, A., Stögbauer, H. & Grassberger, P. (2004). Estimating mutual information. Phys. Rev. E 69,
    066138.
    Gao, W., Kannan, S., Oh, S. & Viswanath, P. (2017). Estimating mutual information for
    discrete-continuous mixtures. NeurIPS.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal(1000)
    >>> y = 0.8 * x + 0.6 * rng.standard_normal(1000)
    >>> bool(abs(ksg(x, y) - (-0.5 * np.log2(1 - 0.8**2))) < 0.1)
    True
    """
    x = _check_samples(x, "x")
    y = _check_samples(y, "y")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"Expected `y` to have as many samples as `x`, len(x) = {x.shape[0]}, but got {y.shape[0]}.")
    k = _check_k(k, x.shape[0])
    if metric not in KSG_METRICS:
        raise ValueError(f"Expected `metric` to be one of {tuple(KSG_METRICS)}, but got {metric!r}.")
    rng = np.random.default_rng(seed)
    x = _prepare_continuous(x, rng)
    y = _prepare_continuous(y, rng)
    return _compute_ksg(x, y, k, KSG_METRICS[metric]) / _LN2


def ksg_mixed(t, y, *, k: int = 3, seed: int = 0) -> float:
    """Mutual information between continuous activations and discrete labels by k-NN (Ross 2014).

    For each sample ``i`` of class ``y_i``, ``d_i`` is the max-norm distance to its ``k``-th neighbour
    among the ``N_{y_i}`` samples of its class and ``m_i`` counts all samples strictly closer than
    ``d_i`` (itself included); then::

        I = psi(n) + mean_i psi(k) - mean_i psi(N_{y_i}) - mean_i psi(m_i)

    A separate function rather than a ``discrete_y`` flag of :func:`ksg`: the labels are validated as
    integers and the estimator is a different one.

    Parameters
    ----------
    t : array_like
        ``(n, d)`` continuous activations (a 1-D array is one unit).
    y : array_like
        ``(n,)`` integer class labels; samples labelled ``-1`` (no label) are left out.
    k : int, default 3
        Neighbours within the class; lowered to ``N_c - 1`` for a class with ``N_c <= k`` samples.
    seed : int, default 0
        Seed of the tie-breaking noise.

    Returns
    -------
    float
        ``I(T;Y)`` in **bits**, not clipped (a negative value is estimation noise around 0).

    Raises
    ------
    ValueError
        Bad shapes, different ``n``, non-finite values, float labels, ``k < 1``, fewer than ``k + 1``
        labelled samples, or no class with at least two samples.

    Notes
    -----
    Preprocessing as in :func:`ksg` (unit-variance columns, 1e-10 tie-breaking noise). Samples whose
    class occurs once are left out (they have no within-class neighbour), as in scikit-learn.

    Tolerance on the tests (seed 0, ``n = 2000``, two equiprobable classes, ``t | y ~ N(mu_y, 1)``):
    within 0.05 bits of the value from numerical integration, for well-separated (1 bit) and
    overlapping means; independent labels ``|I| < 0.02`` bits.

    References
    ----------
    Ross, B. C. (2014). Mutual information between discrete and continuous data sets. PLoS ONE 9(2),
    e87357.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 2, 1000)
    >>> t = 10.0 * y + rng.standard_normal(1000)
    >>> bool(abs(ksg_mixed(t, y) - 1.0) < 0.05)
    True
    """
    t = _check_samples(t, "t")
    labels = _check_y(y, t.shape[0])
    labelled = labels != NO_LABEL
    t = t[labelled]
    k = _check_k(k, t.shape[0])
    classes, sizes = _classes(labels[labelled])
    if sizes.max() < 2:
        raise ValueError(f"Expected at least one class with 2 or more samples, but got {sizes.size} singleton classes.")
    t = _prepare_continuous(t, np.random.default_rng(seed))
    return _compute_ksg_mixed(t, classes, sizes, k) / _LN2
