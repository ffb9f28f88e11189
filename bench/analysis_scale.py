"""Analysis throughput at scale: summarize on one core, on 2 local processes and on a 2-worker Dask cluster.

Generates a synthetic probe run of about ``--size-gb`` of shards written by the real ``ShardWriter``
(uncompressed, the default): ``--ranks`` processes, each ``--samples-per-rank`` probe samples per step,
six sites shaped like a small ResNet (widths 16 to 512, 256 to 1 positions), patterns drawn around per-class
prototypes with sparse bit noise, several shards per rank. Then measures, each in a fresh process and
from a cold page cache (every shard is flushed and dropped from the cache before each measurement):

- the floor: raw sequential read of the same files (``dd``-style, 8 MiB reads), MB/s;
- ``summarize`` with one process, with ``n_jobs=2``, and on a ``LocalCluster(n_workers=2)``: MB of shards
  per second, and peak RSS of the process and of its workers;
- the crossover of ``n_jobs=2`` against one process on small runs (fresh process each: the cost of
  starting the workers included);
- wall time of ``actpat --help`` and ``actpat info RUN`` against ``python -c "import h5py"`` (best of 5).
- ``sort_floor_mb_s``: the shards' MB over the time of one ``np.sort`` of a 64-bit key per observation of
  every record (reading excluded), a bound on any analysis that counts distinct patterns exactly by
  sorting, as ``summarize`` does (entropies, label information and similarities all need the counts).

Targets: one-process analysis at >= 50% of the raw read speed; ``--help`` and ``info`` within 0.5 s of
the h5py import; peak RSS under 1 GB. Prints ONE JSON line; deletes the run unless ``--keep``.
Numbers that depend on the reader's handle cache (one open per shard per pass instead of one per record)
are those of the analysis; the raw read does not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# name, units per pattern, spatial positions per sample (channel patterns)
SITES = (
    ("stem.relu", 16, 256),
    ("layer1.relu", 32, 256),
    ("layer2.relu", 64, 64),
    ("layer3.relu", 128, 16),
    ("layer4.relu", 256, 4),
    ("fc.relu", 512, 1),
)
N_CLASSES = 10
BYTES_PER_SAMPLE = sum(positions * ((units + 7) // 8) for _, units, positions in SITES)


def generate(out: Path, size_gb: float, ranks: int, samples: int, seed: int = 0) -> int:
    """Write the synthetic run; returns the number of steps."""
    from actpat.recorder.shards import Record, ShardWriter, SiteMeta

    steps = max(2, round(size_gb * 1e9 / (BYTES_PER_SAMPLE * samples * ranks)))
    rng = np.random.default_rng(seed)
    metas = [
        SiteMeta(name, i, "ReLU", (units, positions) if positions > 1 else (units,), units,
                 "channel" if positions > 1 else "flat")
        for i, (name, units, positions) in enumerate(SITES)
    ]
    for rank in range(ranks):
        writer = ShardWriter(out, rank=rank, max_shard_bytes=max(1 << 18, int(size_gb * 1e9 / ranks / 3)))
        writer.start()
        ids = np.arange(rank * samples, (rank + 1) * samples)
        labels = ids % N_CLASSES
        protos = [rng.integers(0, 256, (N_CLASSES, positions, (units + 7) // 8), dtype=np.uint8)
                  for _, units, positions in SITES]
        for step in range(steps):
            for meta, proto, (_, units, positions) in zip(metas, protos, SITES):
                shape = (samples, positions, (units + 7) // 8)
                # Bit noise of probability 1/8 (and of three random bytes), fewer flips as training goes on.
                noise = rng.integers(0, 256, shape, dtype=np.uint8) & rng.integers(0, 256, shape, dtype=np.uint8)
                noise &= rng.integers(0, 256, shape, dtype=np.uint8)
                if step > steps // 2:
                    noise &= rng.integers(0, 256, shape, dtype=np.uint8)
                bits = (proto[labels] ^ noise).reshape(samples * positions, -1)
                if units % 8:
                    bits[:, -1] &= (1 << (units % 8)) - 1
                writer.put(Record(meta, step, step * 4 // steps, "probe", bits, positions, samples, 0,
                                  sample_ids=ids, labels=labels))
        writer.close()
    return steps


def drop_cache(paths) -> None:
    """Write back and drop the files' pages, so the next read comes from the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(paths) -> float:
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(8 << 20):
                pass
    return time.perf_counter() - start


def child(args: list[str]) -> dict:
    """Run one measurement in a fresh process; its last stdout line is JSON."""
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"measurement {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(mode: str, run_dir: str) -> dict:
    """One summarize in this (fresh) process: seconds and peak RSS in MB (self, and its workers)."""
    import pandas as pd  # a fixed cost of the table, not of the MB analysed

    from actpat.analysis import summarize

    workers_rss = 0.0
    start = time.perf_counter()
    if mode == "dask":
        from distributed import Client, LocalCluster

        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            client.wait_for_workers(2)
            start = time.perf_counter()  # the cluster's start-up is not the analysis
            table = summarize(run_dir, progress=False, client=client)
            seconds = time.perf_counter() - start
            rss = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            workers_rss = max(rss.values()) / 1024
    else:
        table = summarize(run_dir, progress=False, n_jobs=int(mode))
        seconds = time.perf_counter() - start
        workers_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"seconds": seconds, "rows": len(table), "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "workers_rss_mb": workers_rss, "table_hash": int(pd.util.hash_pandas_object(table, index=False).sum())}


def sort_floor(run_dir: str) -> dict:
    """Seconds of one ``np.sort`` of a 64-bit key per observation of every record, reading excluded.

    Exact counting of distinct patterns by sorting needs at least this one sort per (site, step) (wider
    rows need more than one 64-bit word of key): whatever else the analysis does, its MB/s on one core
    cannot exceed the shards' MB over these seconds.
    """
    from actpat.recorder import open_run

    run = open_run(run_dir)
    seconds = 0.0
    for site in run.sites:
        for step in run.steps(site):
            bits = run.read(site, int(step)).bits
            keys = np.zeros((len(bits), 8), dtype=np.uint8)
            width = min(8, bits.shape[1])
            keys[:, :width] = bits[:, :width]
            keys = keys.view(np.uint64).ravel()
            start = time.perf_counter()
            np.sort(keys)
            seconds += time.perf_counter() - start
    return {"seconds": seconds}


def best_wall(cmd: list[str], repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        best = min(best, time.perf_counter() - start)
    return best


def crossover(base: Path, sizes_mb, ranks: int, samples: int) -> list[dict]:
    points = []
    for mb in sizes_mb:
        run_dir = base / f"small_{mb}"
        generate(run_dir, mb / 1000, ranks, samples, seed=1)
        one = child(["--measure", "1", str(run_dir)])["seconds"]
        two = child(["--measure", "2", str(run_dir)])["seconds"]
        points.append({"mb": mb, "one_s": round(one, 3), "jobs2_s": round(two, 3)})
        shutil.rmtree(run_dir)
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.0)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--samples-per-rank", type=int, default=256)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the run (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated run")
    parser.add_argument("--no-dask", action="store_true")
    parser.add_argument("--crossover-mb", type=float, nargs="*", default=None,
                        help="sizes of the small runs of the crossover (default 4 16 64; --quick: 0.5)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command line timing (best taken)")
    parser.add_argument("--quick", action="store_true", help="a tiny run, for the test suite")
    parser.add_argument("--measure", nargs=2, metavar=("MODE", "RUN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        mode, run_dir = args.measure
        print(json.dumps(sort_floor(run_dir) if mode == "sort" else measure(mode, run_dir)))
        return
    if args.quick:
        args.size_gb, args.ranks, args.samples_per_rank, args.repeats = 0.002, 2, 64, 1
    if args.crossover_mb is None:
        args.crossover_mb = [0.5] if args.quick else [4, 16, 64]

    base = Path(tempfile.mkdtemp(prefix="actpat-scale-", dir=args.dir))
    try:
        free = shutil.disk_usage(base).free
        need = args.size_gb * 1e9 * 1.3 + 2e9
        if free < need:
            raise SystemExit(f"Expected {need / 1e9:.1f} GB free in {base} for a {args.size_gb} GB run, but "
                             f"{free / 1e9:.1f} GB are; pass a smaller --size-gb or another --dir.")
        run_dir = base / "run"
        start = time.perf_counter()
        steps = generate(run_dir, args.size_gb, args.ranks, args.samples_per_rank)
        generate_s = time.perf_counter() - start
        shards = sorted(run_dir.glob("*.h5"))
        size = sum(p.stat().st_size for p in shards)
        mb = size / 1e6

        drop_cache(shards)
        cold = raw_read(shards)
        warm = raw_read(shards)
        results = {}
        for mode in ("1", "2") + (() if args.no_dask else ("dask",)):
            drop_cache(shards)
            results[mode] = child(["--measure", mode, str(run_dir)])
        identical = len({(r["rows"], r["table_hash"]) for r in results.values()}) == 1
        sort_s = child(["--measure", "sort", str(run_dir)])["seconds"]

        actpat = Path(sys.executable).with_name("actpat")
        cli = [str(actpat)] if actpat.exists() else [sys.executable, "-m", "actpat.analysis.cli"]
        h5py_s = best_wall([sys.executable, "-c", "import h5py"], args.repeats)
        help_s = best_wall([*cli, "--help"], args.repeats)
        info_s = best_wall([*cli, "info", str(run_dir)], args.repeats)
        points = crossover(base, args.crossover_mb, args.ranks, args.samples_per_rank)
        faster = [p["mb"] for p in points if p["jobs2_s"] < p["one_s"]]

        raw_mb_s = mb / cold
        one_mb_s = mb / results["1"]["seconds"]
        peak_rss = max(max(r["rss_mb"], r["workers_rss_mb"]) for r in results.values())
        line = {
            "bench": "analysis_scale",
            "quick": args.quick,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg_1min_at_end": round(os.getloadavg()[0], 2),
            "size_mb": round(mb, 1),
            "shards": len(shards),
            "ranks": args.ranks,
            "steps": steps,
            "records": steps * len(SITES) * args.ranks,
            "generate_s": round(generate_s, 1),
            "raw_read_cold_mb_s": round(raw_mb_s, 1),
            "raw_read_warm_mb_s": round(mb / warm, 1),
            "summarize_1_mb_s": round(one_mb_s, 1),
            "summarize_jobs2_mb_s": round(mb / results["2"]["seconds"], 1),
            "summarize_dask2_mb_s": None if args.no_dask else round(mb / results["dask"]["seconds"], 1),
            "ratio_1_to_raw": round(one_mb_s / raw_mb_s, 3),
            "sort_floor_mb_s": round(mb / sort_s, 1),
            "sort_floor_to_raw": round(mb / sort_s / raw_mb_s, 3),
            "tables_identical": identical,
            "speedup_jobs2": round(results["1"]["seconds"] / results["2"]["seconds"], 2),
            "speedup_dask2": None if args.no_dask else round(results["1"]["seconds"] / results["dask"]["seconds"], 2),
            "peak_rss_mb": {k: {"self": round(r["rss_mb"]), "workers": round(r["workers_rss_mb"])}
                            for k, r in results.items()},
            "import_h5py_s": round(h5py_s, 3),
            "help_s": round(help_s, 3),
            "info_s": round(info_s, 3),
            "crossover": points,
            "crossover_mb": min(faster) if faster else None,
            "targets": {
                "analysis_ge_half_raw_read": one_mb_s >= 0.5 * raw_mb_s,
                "help_within_0.5s_of_h5py": help_s - h5py_s <= 0.5,
                "info_within_0.5s_of_h5py": info_s - h5py_s <= 0.5,
                "peak_rss_lt_1gb": peak_rss < 1000,
            },
        }
        print(json.dumps(line))
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
