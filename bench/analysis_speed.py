"""Speed and exactness of pattern counting: actpat vs np.unique(axis=0) vs a lossy hash-bucket histogram.

Data: sign patterns of a random ReLU layer ``W x + b`` (Gaussian ``W``, ``b`` and inputs ``x`` of
``--d-in`` dims), packed as on disk. Cases: 10M patterns of 64 units and 1M patterns of 512 units
(``--quick``: 200k and 50k). For each case:

- actpat: ``entropy(pattern_counts(bits, n_units))``, best of ``--repeats`` runs, one process;
- ``np.unique(bits, axis=0, return_counts=True)`` on the first ``--unique-rows`` rows (default all),
  with actpat timed on the same rows for the speedup, and both results compared pattern by pattern;
- the hash-bucket histogram of earlier activation-pattern tools: rows as 64-bit words, multiply-xor
  hash ``h = (h ^ w) * P`` with a final ``h ^= h >> 29`` (without it a power-of-two table sees only the
  low bits of the words and loses far more), ``h % table_size`` buckets, ``np.bincount``; its occupied buckets against
  the true number of distinct patterns, and the entropy it reports against the exact one;
- peak memory of the exact count (tracemalloc, on top of the input) and the process' max RSS.

Prints ONE JSON line. BLAS is pinned to one thread so that every number is single-core.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

import numpy as np  # noqa: E402

from actpat.analysis.counts import pattern_counts  # noqa: E402
from actpat.analysis.entropy import entropy, miller_madow  # noqa: E402

_PRIME = np.uint64(0x100000001B3)  # FNV-1 64-bit prime
_CHUNK = 1 << 20


def relu_patterns(n: int, n_units: int, d_in: int, seed: int) -> np.ndarray:
    """``(n, ceil(n_units / 8))`` packed signs of ``x @ W + b``, generated in chunks."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((d_in, n_units)).astype(np.float32)
    b = rng.standard_normal(n_units).astype(np.float32)
    out = np.empty((n, (n_units + 7) // 8), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        rows = min(_CHUNK, n - start)
        x = rng.standard_normal((rows, d_in), dtype=np.float32)
        out[start : start + rows] = np.packbits(x @ w + b > 0, axis=1, bitorder="little")
    return out


def hash_histogram(bits: np.ndarray, table_size: int) -> np.ndarray:
    """Bucket counts of the lossy multiply-xor hash table used by earlier tools."""
    n, n_bytes = bits.shape
    n_words = (n_bytes + 7) // 8
    counts = np.zeros(table_size, dtype=np.int64)
    for start in range(0, n, _CHUNK):
        chunk = bits[start : start + _CHUNK]
        buf = np.zeros((chunk.shape[0], 8 * n_words), dtype=np.uint8)
        buf[:, :n_bytes] = chunk
        words = buf.view("<u8")
        h = np.zeros(chunk.shape[0], dtype=np.uint64)
        for j in range(n_words):
            h ^= words[:, j]
            h *= _PRIME
        h ^= h >> np.uint64(29)  # fold the high bits in, or `% 2**k` would see only the low bits of w
        counts += np.bincount((h % np.uint64(table_size)).astype(np.intp), minlength=table_size)
    return counts


def best_time(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def exact_entropy(bits, n_units):
    pc = pattern_counts(bits, n_units)
    return pc, entropy(pc)


def lexicographic(patterns: np.ndarray, counts: np.ndarray):
    """Sort rows by byte 0, then byte 1, ... (the order of np.unique(axis=0))."""
    order = np.lexsort(patterns.T[::-1])
    return patterns[order], counts[order]


def run_case(n: int, n_units: int, d_in: int, seed: int, unique_rows: int | None, table_size: int, repeats: int):
    bits = relu_patterns(n, n_units, d_in, seed)
    case = {"n_units": n_units, "n": n, "d_in": d_in}

    pattern_counts(bits[: min(n, 1000)], n_units)  # warm-up
    t_exact, (pc, h) = best_time(lambda: exact_entropy(bits, n_units), repeats)
    case.update(
        k_true=pc.k,
        h_bits=h,
        h_miller_madow_bits=miller_madow(pc),
        exact_seconds=t_exact,
        exact_patterns_per_s=n / t_exact,
    )

    # Independent check of K for <= 64 units: 1-D uint64 keys through np.unique.
    if n_units <= 64:
        keys = np.zeros((n, 8), dtype=np.uint8)
        keys[:, : bits.shape[1]] = bits
        ku, kc = np.unique(keys.view("<u8").ravel(), return_counts=True)
        case["exact_matches_uint64_unique"] = bool(ku.size == pc.k and np.array_equal(np.sort(kc), np.sort(pc.counts)))

    m = n if unique_rows is None else min(n, unique_rows)
    sub = bits[:m]
    t_np, (u_pat, u_cnt) = best_time(lambda: np.unique(sub, axis=0, return_counts=True), 1)
    t_sub, (pc_sub, _) = best_time(lambda: exact_entropy(sub, n_units), repeats)
    mine_pat, mine_cnt = lexicographic(pc_sub.patterns, pc_sub.counts)
    case.update(
        np_unique_rows=m,
        np_unique_on_subset=m < n,
        np_unique_seconds=t_np,
        np_unique_patterns_per_s=m / t_np,
        exact_seconds_same_rows=t_sub,
        speedup_vs_np_unique=t_np / t_sub,
        exact_matches_np_unique=bool(np.array_equal(mine_pat, u_pat) and np.array_equal(mine_cnt, u_cnt)),
    )

    t_hash, buckets = best_time(lambda: hash_histogram(bits, table_size), 1)
    occupied = int(np.count_nonzero(buckets))
    h_hash = entropy(buckets)
    case.update(
        hash_table_size=table_size,
        hash_seconds=t_hash,
        hash_patterns_per_s=n / t_hash,
        hash_occupied_buckets=occupied,
        hash_lost_distinct=pc.k - occupied,
        hash_lost_fraction=(pc.k - occupied) / pc.k,
        hash_h_bits=h_hash,
        hash_entropy_error_bits=h - h_hash,
    )

    tracemalloc.start()
    tracemalloc.reset_peak()
    exact_entropy(bits, n_units)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    case.update(input_bytes=int(bits.nbytes), exact_peak_extra_bytes=int(peak))
    return case


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds), for the test suite")
    parser.add_argument("--n64", type=int, default=None, help="patterns of 64 units (default 10M, quick 200k)")
    parser.add_argument("--n512", type=int, default=None, help="patterns of 512 units (default 1M, quick 50k)")
    parser.add_argument("--d-in", type=int, default=8, help="input dimension of the random ReLU layer")
    parser.add_argument("--unique-rows", type=int, default=None, help="time np.unique on this many rows only")
    parser.add_argument("--table-bits", type=int, default=20, help="hash table of 2**bits buckets")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n64 = args.n64 or (200_000 if args.quick else 10_000_000)
    n512 = args.n512 or (50_000 if args.quick else 1_000_000)
    t0 = time.perf_counter()
    cases = [
        run_case(n64, 64, args.d_in, args.seed, args.unique_rows, 1 << args.table_bits, args.repeats),
        run_case(n512, 512, args.d_in, args.seed + 1, args.unique_rows, 1 << args.table_bits, args.repeats),
    ]
    result = {
        "bench": "analysis_speed",
        "quick": args.quick,
        "cases": cases,
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "wall_seconds": time.perf_counter() - t0,
        "single_core": "BLAS pinned to 1 thread; numpy sorts are single-threaded",
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
