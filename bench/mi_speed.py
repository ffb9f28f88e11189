"""Time and peak memory of the mutual-information estimators of actpat.analysis.mi, and KSG scaling.

Data: a tanh layer of ``width`` units, ``t = tanh(z @ W + b)`` with ``z`` standard normal of
``--latent`` dims (activations of a real layer have low intrinsic dimension; tanh rather than ReLU
because the k-NN estimators assume a density, and ReLU zeros are point masses), 10 classes
``y = argmax(z @ V)``, and a continuous target ``s = z[:, 0] + 0.5 noise`` for the continuous KSG.
Sizes: ``n = 4096`` and ``20000`` samples of width 10 and 100 (``--quick``: 512 and 2048, width 4 and 16).

For each estimator (``binning``, ``adaptive_binning``, ``kde_bounds`` with noise variance 0.1,
``ksg(t, s)``, ``ksg_mixed(t, y)``) and size: wall time (best of up to ``--repeats`` runs, stopping once
a case has used 1 s), peak memory of numpy allocations (tracemalloc, a separate run; cKDTree's own C++
buffers are not traced), and the value. The scaling exponent ``log(t2 / t1) / log(n2 / n1)`` between the
two sizes: about 1 for ``O(n log n)``, 2 for ``O(n^2)``. KSG's k-d tree searches are ``O(n log n)`` in
low dimension and degrade towards ``O(n^2)`` as the intrinsic dimension of the joint data grows (the
curse of dimensionality), so KSG is also timed on its textbook case, one pair of correlated Gaussians
(``ksg_pair``).

Baseline: KSG with a brute-force ``O(n^2)`` max-norm neighbour search (chunked ``cdist``) on the same
preprocessed data at the first size, for the Gaussian pair and for the layer of the smallest width,
timed in the same run; the estimates must agree exactly.

Prints ONE JSON line. BLAS is pinned to one thread so that every number is single-core.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

import numpy as np  # noqa: E402
import scipy  # noqa: E402
from scipy.spatial.distance import cdist  # noqa: E402
from scipy.special import digamma  # noqa: E402

from actpat.analysis.mi import _prepare_continuous, adaptive_binning, binning, kde_bounds, ksg, ksg_mixed  # noqa: E402
from _report import emit  # noqa: E402  (bench/_report.py, beside this script)

_NOISE_VAR = 0.1
_BRUTE_CHUNK = 512


def layer(n: int, width: int, latent: int, seed: int):
    """tanh activations ``(n, width)``, class labels ``(n,)`` and a continuous target ``(n,)``."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, latent))
    w = rng.standard_normal((latent, width)) / math.sqrt(latent)
    b = 0.1 * rng.standard_normal(width)
    t = np.tanh(z @ w + b)
    y = np.argmax(z @ rng.standard_normal((latent, 10)), axis=1)
    s = z[:, 0] + 0.5 * rng.standard_normal(n)
    return t, y, s


def estimators(t, y, s) -> dict:
    return {
        "binning": lambda: binning(t, y).input_information,
        "adaptive_binning": lambda: adaptive_binning(t, y).input_information,
        "kde_bounds": lambda: kde_bounds(t, y, _NOISE_VAR).input_information_upper,
        "ksg": lambda: ksg(t, s),
        "ksg_mixed": lambda: ksg_mixed(t, y),
    }


def best_time(fn, repeats: int, budget: float = 1.0):
    """Best wall time of up to ``repeats`` runs, stopping once ``budget`` seconds are used."""
    best, result, used = float("inf"), None, 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - t0
        best, used = min(best, elapsed), used + elapsed
        if used >= budget:
            break
    return best, result


def peak_bytes(fn) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return int(peak)


def brute_force_ksg(x: np.ndarray, y: np.ndarray, k: int = 3) -> float:
    """Kraskov algorithm 1 with an O(n^2) max-norm search on already preprocessed data, in bits."""
    n = x.shape[0]
    acc = 0.0
    for start in range(0, n, _BRUTE_CHUNK):
        dx = cdist(x[start : start + _BRUTE_CHUNK], x, "chebyshev")
        dy = cdist(y[start : start + _BRUTE_CHUNK], y, "chebyshev")
        eps = np.partition(np.maximum(dx, dy), k, axis=1)[:, k]  # column 0 is the point itself
        nx = np.count_nonzero(dx < eps[:, None], axis=1) - 1
        ny = np.count_nonzero(dy < eps[:, None], axis=1) - 1
        acc += float(np.sum(digamma(nx + 1) + digamma(ny + 1)))
    return (digamma(k) + digamma(n) - acc / n) / math.log(2)


def gaussian_pair(n: int, seed: int, rho: float = 0.6):
    """One pair of correlated standard Gaussians, ``(n,)`` each."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n)
    return x, rho * x + math.sqrt(1.0 - rho**2) * rng.standard_normal(n)


def ksg_baseline(name: str, t: np.ndarray, s: np.ndarray, repeats: int) -> dict:
    t_ksg, value = best_time(lambda: ksg(t, s, metric="max"), repeats)
    rng = np.random.default_rng(0)  # the preprocessing of ksg(..., seed=0), drawn in the same order
    tp = _prepare_continuous(t.reshape(len(t), -1), rng)
    sp = _prepare_continuous(s[:, None], rng)
    t_brute, brute = best_time(lambda: brute_force_ksg(tp, sp), 1)
    return {
        "data": name,
        "n": len(t),
        "ksg_seconds": t_ksg,
        "brute_force_seconds": t_brute,
        "speedup_vs_brute_force": t_brute / t_ksg,
        "ksg_bits": value,
        "brute_force_bits": brute,
        "abs_diff_bits": abs(value - brute),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds), for the test suite")
    parser.add_argument("--latent", type=int, default=8, help="intrinsic dimension of the layer")
    parser.add_argument("--repeats", type=int, default=5, help="at most this many timed runs per case")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes = (512, 2048) if args.quick else (4096, 20000)
    widths = (4, 16) if args.quick else (10, 100)
    t0 = time.perf_counter()
    cases, seconds = [], {}

    def measure(name: str, width: int, n: int, fn) -> None:
        elapsed, value = best_time(fn, args.repeats)
        seconds[name, width, n] = elapsed
        cases.append(
            {"estimator": name, "n": n, "width": width, "seconds": elapsed, "peak_bytes": peak_bytes(fn),
             "value_bits": value}
        )

    for width in widths:
        for n in sizes:
            for name, fn in estimators(*layer(n, width, args.latent, args.seed)).items():
                measure(name, width, n, fn)
    for n in sizes:
        x, s = gaussian_pair(n, args.seed)
        measure("ksg_pair", 1, n, lambda: ksg(x, s))
    n1, n2 = sizes
    scaling = {
        f"{name}/w{width}": math.log(seconds[name, width, n2] / seconds[name, width, n1]) / math.log(n2 / n1)
        for (name, width, n) in seconds
        if n == n1
    }
    t_layer, _, s_layer = layer(n1, widths[0], args.latent, args.seed)
    baselines = [
        ksg_baseline("gaussian_pair", *gaussian_pair(n1, args.seed), args.repeats),
        ksg_baseline(f"layer_w{widths[0]}", t_layer, s_layer, args.repeats),
    ]
    result = {
        "bench": "mi_speed",
        "quick": args.quick,
        "sizes": list(sizes),
        "widths": list(widths),
        "cases": cases,
        "scaling_exponent": scaling,
        "ksg_pair_truth_bits": -0.5 * math.log2(1.0 - 0.6**2),
        "ksg_vs_brute_force": baselines,
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "wall_seconds": time.perf_counter() - t0,
        "single_core": "BLAS pinned to 1 thread; cKDTree queries use one worker",
        "scipy": scipy.__version__,
    }
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
