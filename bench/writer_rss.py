"""Resident memory of a recording process while the shard writer applies ``block`` backpressure.

A producer hands the writer records as a training loop would, faster than the writer can store them:
per step, one fresh record per site of a ResNet-like model (20 sites, 16-512 channels, batch 128,
channel patterns over 32x32 down to 4x4 positions, labels and sample ids), so the queue stays full
and the producer blocks. Each configuration runs in its own process and reports the growth of the
resident set size (VmRSS, sampled every 5 ms, and VmHWM) over the process's RSS right before the
writer started, against the writer's documented bound: ``max_queue_bytes`` + the block being written
(``_WRITE_BYTES``, 16 MiB, plus one record) + the reused staging buffer (8 MiB) + HDF5's chunk cache
(64 KiB per open dataset, up to 5 per site) and metadata cache (4 MiB).

``ratio`` is the measured growth over that bound (at most 1: the bound holds). Prints one JSON line;
``--quick`` runs a tiny configuration for the test suite.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time


def _rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _child(steps: int, max_queue: int) -> dict:
    import numpy as np

    from actpat.recorder import shards
    from actpat.recorder.shards import Record, ShardWriter, SiteMeta

    widths = [16] * 7 + [32] * 6 + [64] * 6 + [512]
    sides = [32] * 7 + [16] * 6 + [8] * 6 + [4]
    metas = [SiteMeta(f"s{i}", i, "ReLU", (w, s, s), w, "channel") for i, (w, s) in enumerate(zip(widths, sides))]
    batch = 128
    rng = np.random.default_rng(0)
    templates = [rng.integers(0, 256, (batch * s * s, (w + 7) // 8), dtype=np.uint8) for w, s in zip(widths, sides)]
    labels = np.arange(batch, dtype=np.int64) % 10
    step_bytes = sum(t.nbytes + 2 * labels.nbytes for t in templates)
    with tempfile.TemporaryDirectory() as out:
        writer = ShardWriter(out, max_queue_bytes=max_queue, on_backpressure="block", max_shard_bytes=256 << 20)
        base = _rss_kib()
        peak = [base]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _rss_kib())
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        writer.start()
        start = time.perf_counter()
        for step in range(steps):
            for meta, template in zip(metas, templates):
                bits = template.copy()  # a fresh allocation per record, as a hook's packing makes
                writer.put(Record(meta, step, 0, "train", bits, bits.shape[0] // batch, batch, 0,
                                  sample_ids=labels + batch * step, labels=labels.copy()))  # fmt: skip
        writer.close()
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
        hwm = _rss_kib("VmHWM")
    largest = max(t.nbytes + 2 * labels.nbytes for t in templates)
    bound = max_queue + shards._WRITE_BYTES + largest + (8 << 20) + len(metas) * 5 * (64 << 10) + (4 << 20)
    return {
        "rss_growth_mib": round((peak[0] - base) / 1024, 1),
        "hwm_growth_mib": round((hwm - base) / 1024, 1),
        "bound_mib": round(bound / 2**20, 1),
        "writer_mb_per_s": round(steps * step_bytes / seconds / 1e6, 1),
        "step_mb": round(step_bytes / 1e6, 2),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny configuration (seconds), for the test suite")
    parser.add_argument("--child", nargs=2, type=int, metavar=("STEPS", "MAX_QUEUE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(*args.child)), flush=True)
        return {}
    steps, max_queue = (8, 16 << 20) if args.quick else (80, 16 << 20)
    # A fresh process: the RSS baseline is not inflated by anything this one allocated before.
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(steps), str(max_queue)], capture_output=True, text=True, check=True
    )
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    result = {
        "bench": "writer_rss",
        "max_queue_mib": max_queue >> 20,
        "steps": steps,
        **measured,
        "ratio": round(measured["rss_growth_mib"] / measured["bound_mib"], 3),
        "quick": args.quick,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
