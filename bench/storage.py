"""Bytes on disk per unit-observation of recorded patterns, for each compression.

A small CNN is trained briefly on scikit-learn's bundled digits (8x8 images, no download) while every
training batch is recorded (channel patterns, labels and sample ids), once per compression (none,
lzf, gzip) with the same seed. A *unit-observation* is one unit of one observed pattern, so packed
bits alone cost 1/8 byte per unit-observation before compression (plus padding to whole bytes).

Reported per compression: whole shard files, the ``bits`` datasets alone, and the rest (labels,
sample ids, record index, HDF5 headers) as metadata overhead. Prints one JSON line; ``--quick`` runs
a tiny configuration for the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from actpat.recorder import ActivationRecorder, open_run


def digits_cnn() -> nn.Module:
    """The small CNN the storage benchmarks record (3 ReLU sites: 16, 32 and 64 units)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )  # fmt: skip


def _train_and_record(out: str, compression: str | None, x, y, epochs: int, batch: int) -> None:
    torch.manual_seed(0)
    model = digits_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    step = 0
    with ActivationRecorder(model, out, compression=compression) as rec:
        for epoch in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x), batch):
                idx = order[start : start + batch]
                with rec.capture(step, epoch=epoch, labels=y[idx], sample_ids=idx):
                    loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1


def _measure(out: str) -> dict:
    run = open_run(out)
    unit_obs = sum(run.n_observations(site) * run.site_info(site)["n_units"] for site in run.sites)
    packed = sum(run.n_observations(site) * ((run.site_info(site)["n_units"] + 7) // 8) for site in run.sites)
    files = sum(os.path.getsize(path) for path in run.shards)
    bits_stored = 0
    for path in run.shards:
        with h5py.File(path, "r") as handle:
            for group in handle["sites"].values():
                bits_stored += group["bits"].id.get_storage_size()
    return {
        "unit_observations": unit_obs,
        "packed_bytes": packed,
        "file_bytes": files,
        "bits_stored_bytes": bits_stored,
        "observations": sum(run.n_observations(site) for site in run.sites),
        "sites": {site: run.site_info(site)["n_units"] for site in run.sites},
        "steps": len(run.steps(run.sites[0])),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny configuration (seconds), for the test suite")
    args = parser.parse_args(argv)
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.int64)
    epochs, batch = (1, 64) if args.quick else (3, 64)
    if args.quick:
        x, y = x[:128], y[:128]

    per = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, compression in (("none", None), ("lzf", "lzf"), ("gzip", "gzip")):
            out = os.path.join(tmp, name)
            _train_and_record(out, compression, x, y, epochs, batch)
            per[name] = _measure(out)

    base = per["none"]
    unit_obs = base["unit_observations"]
    assert all(p["unit_observations"] == unit_obs for p in per.values())  # same seed, same records
    result = {
        "bench": "storage",
        # Packed bits alone, before compression: n_bytes / n_units per observation.
        "bits_bytes_per_unit_obs": round(base["packed_bytes"] / unit_obs, 5),
        "target_bits_bytes_per_unit_obs": 0.125,
        "disk_bytes_per_unit_obs": {k: round(p["file_bytes"] / unit_obs, 5) for k, p in per.items()},
        "bits_disk_bytes_per_unit_obs": {k: round(p["bits_stored_bytes"] / unit_obs, 5) for k, p in per.items()},
        "metadata_bytes_per_unit_obs": {
            k: round((p["file_bytes"] - p["bits_stored_bytes"]) / unit_obs, 5) for k, p in per.items()
        },
        "metadata_fraction_of_file": {
            k: round(1 - p["bits_stored_bytes"] / p["file_bytes"], 4) for k, p in per.items()
        },
        "file_bytes": {k: p["file_bytes"] for k, p in per.items()},
        "unit_observations": unit_obs,
        "observations": base["observations"],
        "sites": base["sites"],
        "steps": base["steps"],
        "samples": len(x),
        "epochs": epochs,
        "batch": batch,
        "quick": args.quick,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
