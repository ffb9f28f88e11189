"""Shard writer throughput (MB/s) and bytes on disk per codec, on patterns of a trained CNN.

A small CNN (2 conv + 1 dense ReLU sites, 16/32/64 channels) is trained on scikit-learn's bundled
digits (no download) for a few hundred SGD steps; then the patterns of every training batch of one
more epoch are captured once (channel patterns, labels, sample ids). The same records (several times
over, so that fixed costs weigh little) are written by
a fresh :class:`~actpat.recorder.shards.ShardWriter` per codec, codecs interleaved over rounds; each
codec's figure is the median over rounds. Ratios are against the uncompressed writer of the same run:
``speed_vs_none`` (MB/s ratio) and ``size_vs_none`` (bytes on disk ratio). ``crc32_share_of_none`` is the
time CRC-32 takes over the same bytes (the checksums every version-3 record carries) as a share of the
uncompressed writer's time. Codecs of ``hdf5plugin`` are measured when it is installed.

Prints one JSON line; ``--quick`` runs a tiny configuration for the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from actpat.recorder import ActivationRecorder, schema
from actpat.recorder.shards import ShardWriter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from storage import digits_cnn  # noqa: E402 - the same model as bench/storage.py


def _trained_records(train_steps: int, x: torch.Tensor, y: torch.Tensor, batch: int, out: str) -> list:
    torch.manual_seed(0)
    model = digits_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)

    def batches():
        while True:
            order = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x) - batch + 1, batch):
                yield order[start : start + batch]

    stream = batches()
    for _ in range(train_steps):
        idx = next(stream)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    records: list = []
    with torch.no_grad(), ActivationRecorder(model, out, on_record=records.append) as rec:
        for step in range(len(x) // batch):
            idx = next(stream)
            with rec.capture(train_steps + step, labels=y[idx], sample_ids=idx):
                model(x[idx])
    return records


def _write(records: list, out: str, compression: str | None, repeats: int) -> tuple[float, int]:
    writer = ShardWriter(out, compression=compression, max_queue_bytes=1 << 40)
    writer.start()
    start = time.perf_counter()
    for _ in range(repeats):
        for record in records:
            writer.put(record)
    writer.close()  # the last block, finalize and fsync included
    seconds = time.perf_counter() - start
    return seconds, sum(os.path.getsize(p) for p in writer.finalized)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny configuration (seconds), for the test suite")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.int64)
    train_steps, rounds, repeats, batch = (20, 1, 1, 64) if args.quick else (300, 3, 24, 64)
    if args.quick:
        x, y = x[:256], y[:256]
    try:
        import hdf5plugin  # noqa: F401

        codecs = list(schema.CODECS)
    except ImportError:
        codecs = [None, *schema.BUILTIN_CODECS]
    with tempfile.TemporaryDirectory() as tmp:
        records = _trained_records(train_steps, x, y, batch, os.path.join(tmp, "capture"))
        record_bytes = repeats * sum(r.nbytes for r in records)
        seconds: dict[str, list[float]] = {str(c).lower(): [] for c in codecs}
        sizes: dict[str, int] = {}
        for round_ in range(rounds):
            order = codecs if round_ % 2 == 0 else codecs[::-1]
            for codec in order:
                name = str(codec).lower()
                spent, size = _write(records, os.path.join(tmp, f"{name}-{round_}"), codec, repeats)
                seconds[name].append(spent)
                sizes[name] = size
        start = time.perf_counter()
        for _ in range(repeats):
            for record in records:
                for array in (record.bits, record.labels, record.sample_ids):
                    zlib.crc32(np.ascontiguousarray(array))
        crc_seconds = time.perf_counter() - start
    median = {name: statistics.median(values) for name, values in seconds.items()}
    mb_per_s = {name: round(record_bytes / s / 1e6, 1) for name, s in median.items()}
    result = {
        "bench": "writer_codecs",
        "patterns": f"digits CNN after {train_steps} SGD steps, every batch of one epoch, 3 sites, x{repeats}",
        "record_mb": round(record_bytes / 1e6, 2),
        "mb_per_s": mb_per_s,
        "speed_vs_none": {name: round(mb_per_s[name] / mb_per_s["none"], 3) for name in mb_per_s},
        "size_vs_none": {name: round(size / sizes["none"], 3) for name, size in sizes.items()},
        "crc32_share_of_none": round(crc_seconds / median["none"], 3),
        "rounds": rounds,
        "quick": args.quick,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
