"""Accuracy of the KSG estimator with the max-norm against Euclidean norms in the marginal spaces.

``actpat.analysis.mi.ksg(x, y, metric=...)`` measures distances within X and within Y with the max-norm
(``"max"``, Kraskov et al.'s own choice) or the Euclidean norm (``"euclidean"``, the default of the
benchmark-mi suite); the joint distance is the larger of the two. This benchmark runs both on tasks
with a known answer and reports the error of each, to pick the default:

- correlated Gaussians: ``d`` independent pairs ``(x_i, y_i)`` of correlation ``rho``,
  ``I = -0.5 * d * log2(1 - rho^2)`` bits, for ``d`` in 1, 2, 5, 10 and ``rho`` in 0.5, 0.9;
- the same after invertible maps, which leave ``I`` unchanged: ``x -> x^3, y -> exp(y)`` elementwise
  (``cube_exp``), and a random well-conditioned linear map within each of X and Y (``mix``);
- ``n`` = 1000, 3000, 10000 samples (seeds 0 and 1; one seed at 10000), ``k = 3``.
(``--quick``: ``d`` in 1, 3, ``n`` = 500, one seed, for the test suite.)

Prints ONE JSON line: every case (truth, both estimates and their errors), the mean absolute error of
each metric overall, per dimension ``d`` and per transform, the ratio ``mae_euclidean / mae_max``
(below 1: Euclidean is more accurate), and the metric with the lower overall mean absolute error.
BLAS is pinned to one thread.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402

import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from actpat.analysis.mi import KSG_METRICS, ksg  # noqa: E402
from _report import emit  # noqa: E402  (bench/_report.py, beside this script)

TRANSFORMS = ("identity", "cube_exp", "mix")


def gaussian_pairs(n: int, d: int, rho: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``d`` independent pairs of standard Gaussians with correlation ``rho``, ``(n, d)`` each."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    return x, rho * x + math.sqrt(1.0 - rho**2) * rng.standard_normal((n, d))


def well_conditioned(d: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``(d, d)`` matrix with singular values between 1 and 3 (invertible)."""
    q1, _ = np.linalg.qr(rng.standard_normal((d, d)))
    q2, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return q1 @ np.diag(np.linspace(1.0, 3.0, d)) @ q2


def transform(x: np.ndarray, y: np.ndarray, name: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if name == "identity":
        return x, y
    if name == "cube_exp":
        return x**3, np.exp(y)
    rng = np.random.default_rng(seed + 1000)
    return x @ well_conditioned(x.shape[1], rng), y @ well_conditioned(y.shape[1], rng)


def mean(values) -> float:
    return float(np.mean(values)) if values else math.nan


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds), for the test suite")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        dims, rhos, sizes = (1, 3), (0.5, 0.9), {500: (0,)}
    else:
        dims, rhos, sizes = (1, 2, 5, 10), (0.5, 0.9), {1000: (0, 1), 3000: (0, 1), 10000: (0,)}
    metrics = tuple(KSG_METRICS)
    tasks = [
        (n, seed, d, rho, name)
        for n, seeds in sizes.items() for seed in seeds for d in dims for rho in rhos for name in TRANSFORMS
    ]
    t0 = time.perf_counter()
    cases = []
    errors: dict[str, dict[str, list]] = {m: defaultdict(list) for m in metrics}
    for n, seed, d, rho, name in tqdm(tasks, disable=args.no_progress, desc="ksg accuracy", unit="task"):
        x, y = transform(*gaussian_pairs(n, d, rho, seed), name, seed)
        truth = -0.5 * d * math.log2(1.0 - rho**2)
        case = {"n": n, "seed": seed, "d": d, "rho": rho, "transform": name, "truth_bits": truth}
        for metric in metrics:
            start = time.perf_counter()
            value = ksg(x, y, k=args.k, metric=metric)
            error = value - truth
            case.update({f"{metric}_bits": value, f"{metric}_error_bits": error,
                         f"{metric}_seconds": time.perf_counter() - start})
            for group in ("all", f"d={d}", f"transform={name}", f"n={n}"):
                errors[metric][group].append(abs(error))
        cases.append(case)
    mae = {metric: {group: mean(v) for group, v in groups.items()} for metric, groups in errors.items()}
    best = min(metrics, key=lambda m: mae[m]["all"])
    result = {
        "bench": "ksg_accuracy",
        "quick": args.quick,
        "k": args.k,
        "mean_abs_error_bits": mae,
        "ratio_mae_euclidean_to_max": {g: mae["euclidean"][g] / mae["max"][g] for g in mae["max"]},
        "euclidean_closer_fraction": mean(
            [abs(c["euclidean_error_bits"]) < abs(c["max_error_bits"]) for c in cases]
        ),
        "more_accurate": best,
        "cases": cases,
        "wall_seconds": time.perf_counter() - t0,
    }
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
