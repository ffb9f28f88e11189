"""Speed and exactness of pattern counting: actpat vs np.unique(axis=0), and what the reference's hash
histogram loses.

Data: sign patterns of a random ReLU layer ``W x + b`` (Gaussian ``W``, ``b`` and inputs ``x`` of
``--d-in`` dims), packed as on disk.

Speed cases: 10M patterns of 64 units and 1M patterns of 512 units (``--quick``: 200k and 50k):

- actpat: ``entropy(pattern_counts(bits, n_units))``, best of ``--repeats`` runs, one process;
- ``np.unique(bits, axis=0, return_counts=True)`` on the first ``--unique-rows`` rows (default all),
  with actpat timed on the same rows for the speedup, and both results compared pattern by pattern;
- peak memory of the exact count (tracemalloc, on top of the input) and the process' max RSS.

Reference cases: the hash histogram of the reference implementation of Hartmann et al. (2021),
re-implemented from its published description (not its code):

- each pattern is cut into blocks of 64 channels; a block is the int64 ``sum_j a_j 2**j``, except that
  in a block of exactly 64 channels channel 63 has weight ``-1`` (a signed 64-bit integer cannot hold
  ``2**63``), so that e.g. the patterns {0, 63} and {} both encode as 0;
- the hash is ``h = 37``, then for every block ``h = (block * 76963) xor (h * 54059)`` in wrapping
  int64 arithmetic, and the bin ``h mod N`` (non-negative remainder);
- ``N`` is the reference's table size for the layer, as bins per observation: its ResNet-20 CIFAR-10
  settings (hash size factor 3e8, per-layer factors 150 of 1186.75 for the 32-channel layers and 50 for
  the 64-channel layers, net factor 1.6, one query) give 60.7M bins for 12.8M observations (4.74 per
  observation) in the 32-channel layers and 20.2M bins for 3.2M observations (6.32) in the 64-channel
  layers.

For 32 and 64 channels, at the reference's own ``n`` and table size (``--quick``: 100k observations,
the same bins per observation) and inputs of ``d_in`` = 4, 8, 16 dimensions (fewer to more distinct
patterns): the distinct patterns K against the occupied bins, the
entropy from exact counts against the one from bin counts (bits), the patterns merged by the 64-bit
encoding alone, and the similarity to a second time point (the same inputs through ``W + 0.2 noise``):
JI and wJI from exact counts against those from bin occupancy and bin counts.

Prints ONE JSON line. BLAS is pinned to one thread so that every number is single-core.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

import numpy as np  # noqa: E402

from actpat.analysis.counts import pattern_counts  # noqa: E402
from actpat.analysis.entropy import entropy, miller_madow  # noqa: E402
from actpat.analysis.similarity import jaccard, weighted_jaccard  # noqa: E402
from _report import emit  # noqa: E402  (bench/_report.py, beside this script)

_CHUNK = 1 << 20
# The reference's ResNet-20 CIFAR-10 tables: (bins, observations per probe) by channels (module docstring).
REFERENCE_TABLES = {32: (60_669_896, 12_800_000), 64: (20_223_298, 3_200_000)}
_FIRST, _A, _B = 37, 54059, 76963


def relu_patterns(n: int, n_units: int, d_in: int, seed: int, *, drift: float = 0.0) -> np.ndarray:
    """``(n, ceil(n_units / 8))`` packed signs of ``x @ W + b``, generated in chunks.

    ``drift > 0`` adds ``drift * noise`` to ``W`` and ``b`` (a later time point, the same inputs).
    """
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((d_in, n_units)).astype(np.float32)
    b = rng.standard_normal(n_units).astype(np.float32)
    moved = np.random.default_rng(seed + 10_000)
    w = w + drift * moved.standard_normal(w.shape).astype(np.float32)
    b = b + drift * moved.standard_normal(b.shape).astype(np.float32)
    out = np.empty((n, (n_units + 7) // 8), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        rows = min(_CHUNK, n - start)
        x = rng.standard_normal((rows, d_in), dtype=np.float32)
        out[start : start + rows] = np.packbits(x @ w + b > 0, axis=1, bitorder="little")
    return out


def reference_blocks(bits: np.ndarray, n_units: int) -> np.ndarray:
    """``(n, ceil(n_units / 64))`` int64 block numbers of the reference's encoding."""
    n, n_bytes = bits.shape
    n_blocks = (n_units + 63) // 64
    padded = np.zeros((n, 8 * n_blocks), dtype=np.uint8)
    padded[:, :n_bytes] = bits
    words = padded.view("<u8")  # word j = sum of 2**i over the channels i of block j that are on
    blocks = (words & np.uint64(2**63 - 1)).astype(np.int64)
    full = [j for j in range(n_blocks) if min(64, n_units - 64 * j) == 64]
    # Channel 63 of a full block has weight -1 (the int64 sign bit cannot hold 2**63).
    blocks[:, full] -= (words[:, full] >> np.uint64(63)).astype(np.int64)
    return blocks


def reference_bins(bits: np.ndarray, n_units: int, table_size: int) -> np.ndarray:
    """Bin of each pattern in the reference's hash table of ``table_size`` bins."""
    out = np.empty(bits.shape[0], dtype=np.int64)
    with np.errstate(over="ignore"):
        for start in range(0, bits.shape[0], _CHUNK):
            numbers = reference_blocks(bits[start : start + _CHUNK], n_units) * np.int64(_B)
            h = np.full(numbers.shape[0], _FIRST, dtype=np.int64)
            for j in range(numbers.shape[1]):
                h = numbers[:, j] ^ (h * np.int64(_A))
            out[start : start + _CHUNK] = np.mod(h, np.int64(table_size))
    return out


def reference_histogram(bits: np.ndarray, n_units: int, table_size: int) -> np.ndarray:
    """Bin counts of the reference's hash table."""
    return np.bincount(reference_bins(bits, n_units, table_size), minlength=table_size)


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


def run_case(n: int, n_units: int, d_in: int, seed: int, unique_rows: int | None, repeats: int):
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

    tracemalloc.start()
    tracemalloc.reset_peak()
    exact_entropy(bits, n_units)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    case.update(input_bytes=int(bits.nbytes), exact_peak_extra_bytes=int(peak))
    return case


def reference_case(n: int, n_units: int, d_in: int, seed: int) -> dict:
    """What the reference's hash histogram reports against exact counts, at its table size."""
    bins, observations = REFERENCE_TABLES[n_units]
    table_size = bins if n == observations else int(round(bins / observations * n))
    now, later = relu_patterns(n, n_units, d_in, seed), relu_patterns(n, n_units, d_in, seed, drift=0.2)
    exact_now, exact_later = pattern_counts(now, n_units), pattern_counts(later, n_units)
    bins_now = reference_histogram(now, n_units, table_size)
    bins_later = reference_histogram(later, n_units, table_size)
    # Distinct encoded numbers: what the table would see with no collision at all.
    encoded = np.unique(reference_blocks(now, n_units), axis=0).shape[0]
    occupied = int(np.count_nonzero(bins_now))
    ji_exact, wji_exact = jaccard(exact_now, exact_later), weighted_jaccard(exact_now, exact_later)
    ji_hash = np.count_nonzero((bins_now > 0) & (bins_later > 0)) / np.count_nonzero((bins_now > 0) | (bins_later > 0))
    wji_hash = np.minimum(bins_now, bins_later).sum() / np.maximum(bins_now, bins_later).sum()
    h_exact, h_hash = entropy(exact_now), entropy(bins_now)
    return {
        "n_units": n_units,
        "n": n,
        "d_in": d_in,
        "bins_per_observation": table_size / n,
        "reference_size": n == observations,
        "table_size": table_size,
        "k_true": exact_now.k,
        "k_over_n": exact_now.k / n,
        "encoding_merged_patterns": exact_now.k - int(encoded),
        "occupied_bins": occupied,
        "lost_distinct": exact_now.k - occupied,
        "lost_fraction": (exact_now.k - occupied) / exact_now.k,
        "h_exact_bits": h_exact,
        "h_reference_bits": h_hash,
        "entropy_error_bits": h_hash - h_exact,
        "jaccard_exact": ji_exact,
        "jaccard_reference": float(ji_hash),
        "jaccard_error": float(ji_hash - ji_exact),
        "weighted_jaccard_exact": wji_exact,
        "weighted_jaccard_reference": float(wji_hash),
        "weighted_jaccard_error": float(wji_hash - wji_exact),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds), for the test suite")
    parser.add_argument("--n64", type=int, default=None, help="patterns of 64 units (default 10M, quick 200k)")
    parser.add_argument("--n512", type=int, default=None, help="patterns of 512 units (default 1M, quick 50k)")
    parser.add_argument("--n-reference", type=int, default=None,
                        help="observations of the reference cases (default: the reference's own, 12.8M for 32 "
                             "and 3.2M for 64 channels, with its table sizes; quick 100k, same bins per observation)")
    parser.add_argument("--d-in", type=int, default=8, help="input dimension of the random ReLU layer")
    parser.add_argument("--unique-rows", type=int, default=None, help="time np.unique on this many rows only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n64 = args.n64 or (200_000 if args.quick else 10_000_000)
    n512 = args.n512 or (50_000 if args.quick else 1_000_000)

    t0 = time.perf_counter()
    cases = [
        run_case(n64, 64, args.d_in, args.seed, args.unique_rows, args.repeats),
        run_case(n512, 512, args.d_in, args.seed + 1, args.unique_rows, args.repeats),
    ]
    reference = [
        reference_case(args.n_reference or (100_000 if args.quick else REFERENCE_TABLES[n_units][1]), n_units, d_in,
                       args.seed + 2)
        for n_units in (32, 64) for d_in in ((8,) if args.quick else (4, 8, 16))
    ]
    result = {
        "bench": "analysis_speed",
        "quick": args.quick,
        "cases": cases,
        "reference_hash": reference,
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "wall_seconds": time.perf_counter() - t0,
        "single_core": "BLAS pinned to 1 thread; numpy sorts are single-threaded",
    }
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
