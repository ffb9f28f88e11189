"""Memory of probe mode with and without the probe's copy of the model (CPU, or a GPU with ``--device``).

A VGG-shaped CNN (five stages of two 3x3 convolutions with BatchNorm and ReLU, 64 to 1024 channels,
about 19M parameters, 75 MB of float32 weights) trains a few SGD-with-momentum steps on small inputs.
Three arms, each in a fresh process so that its peak resident memory is its own: ``train`` (no
prober), ``probe_copy`` (a probe every step with ``copy=True``, the default) and ``probe_nocopy``
(``copy=False``). Each arm reports its peak RSS (``ru_maxrss``) and its peak of tracked tensor bytes:
the storage of every tensor alive in the process (found through the garbage collector), taken after
each training step and, in the probe arms, inside each probe just before its forward passes (the
prober's ``context``), when the copy or the saved buffers and the cached probe set are all held.
``extra_mb`` and ``tracked_extra_mb`` are an arm's peaks minus those of ``train`` (medians over
rounds); ``nocopy_vs_copy`` is the ratio of the two probe arms' extra RSS.

With ``--device cuda`` the model, its training batch and the probe's cache live on the GPU: tracked
bytes are those of tensors on the GPU, and ``peak_device_mb`` is torch's peak of allocated GPU memory
(``torch.cuda.max_memory_allocated``); ``extra_device_mb`` and ``nocopy_vs_copy`` are then taken from it.

Prints one JSON line. ``--quick`` runs a small configuration for the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import warnings

import torch
from torch import nn
from torch.utils.data import TensorDataset

ARMS = ("train", "probe_copy", "probe_nocopy")


def vgg_shaped(widths: tuple[int, ...], classes: int = 10) -> nn.Sequential:
    """Stages of two conv-BN-ReLU layers; the first conv of each stage after the first halves the size."""
    layers, c_in = [], 3
    for i, width in enumerate(widths):
        for j in range(2):
            layers += [nn.Conv2d(c_in, width, 3, 2 if i and not j else 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            c_in = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes))


def _tensor_mb(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def tracked_tensor_mb(device: str = "cpu") -> float:
    """MiB of the storages of every tensor on ``device`` alive in this process (shared storages counted once)."""
    gc.collect()  # what only a reference cycle keeps is not held
    storages = {}
    with warnings.catch_warnings():  # isinstance() on deprecated torch objects warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type == device:
                try:
                    storage = obj.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
                except (RuntimeError, NotImplementedError):  # a tensor without data (fake, meta)
                    continue
    return sum(storages.values()) / 2**20


def run_arm(arm: str, widths: tuple[int, ...], steps: int, device: str = "cpu") -> dict:
    """Train ``steps`` steps on ``device`` in this process, probing after each one unless ``arm == "train"``."""
    from actpat.recorder import Prober

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = vgg_shaped(widths).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 16, 16, generator=g).to(device), torch.randint(0, 10, (16,), generator=g).to(device)
    probe_set = TensorDataset(torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g))
    tracked: list[float] = []

    @contextlib.contextmanager
    def measured(module: nn.Module):
        tracked.append(tracked_tensor_mb(device))  # inside the probe: the copy or the saved buffers are held
        yield

    with tempfile.TemporaryDirectory() as tmp:
        prober = None
        if arm != "train":
            prober = Prober(model, probe_set, tmp, 1, batch_size=8, copy=arm == "probe_copy", context=measured)
            prober.maybe(0)
        for step in range(1, steps + 1):
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            del loss
            tracked.append(tracked_tensor_mb(device))
            if prober is not None:
                prober.maybe(step)
        if prober is not None:
            prober.close()
    return {
        "arm": arm,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "peak_device_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device == "cuda" else None,
        "tracked_mb": max(tracked),
        "weights_mb": _tensor_mb(model.parameters()),
        "buffers_mb": _tensor_mb(model.buffers()),
        "probe_set_mb": _tensor_mb(probe_set.tensors),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small configuration (seconds), for the test suite")
    parser.add_argument("--rounds", type=int, default=None, help="fresh processes per arm")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # internal: run one arm, print its JSON
    args = parser.parse_args(argv)
    widths = (8, 16, 32, 64, 128) if args.quick else (64, 128, 256, 512, 1024)
    steps = 2 if args.quick else 4
    if args.arm:
        result = run_arm(args.arm, widths, steps, args.device)
        print(json.dumps(result), flush=True)
        return result
    rounds = args.rounds or (1 if args.quick else 3)
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for i in range(rounds):
        for arm in ARMS[i % 3:] + ARMS[: i % 3]:  # rotate the order each round
            command = [sys.executable, __file__, "--arm", arm, "--device", args.device]
            command += ["--quick"] if args.quick else []
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            runs[arm].append(json.loads(done.stdout.strip().splitlines()[-1]))
    peak = {arm: statistics.median(r["peak_rss_mb"] for r in runs[arm]) for arm in ARMS}
    extra = {arm: peak[arm] - peak["train"] for arm in ARMS[1:]}
    device_fields = {}
    if args.device == "cuda":
        peak_device = {arm: statistics.median(r["peak_device_mb"] for r in runs[arm]) for arm in ARMS}
        extra_device = {arm: peak_device[arm] - peak_device["train"] for arm in ARMS[1:]}
        device_fields = {
            "nocopy_vs_copy": round(extra_device["probe_nocopy"] / extra_device["probe_copy"], 4),
            "extra_device_mb": {arm: round(value, 1) for arm, value in extra_device.items()},
            "peak_device_mb": {arm: round(value, 1) for arm, value in peak_device.items()},
            "device_name": torch.cuda.get_device_name(),
        }
    tracked = {arm: statistics.median(r["tracked_mb"] for r in runs[arm]) for arm in ARMS}
    result = {
        "bench": "probe_memory",
        "nocopy_vs_copy": round(extra["probe_nocopy"] / extra["probe_copy"], 4) if extra["probe_copy"] > 0 else None,
        "extra_mb": {arm: round(value, 1) for arm, value in extra.items()},
        "peak_rss_mb": {arm: round(value, 1) for arm, value in peak.items()},
        "tracked_extra_mb": {arm: round(tracked[arm] - tracked["train"], 3) for arm in ARMS[1:]},
        "weights_mb": round(runs["train"][0]["weights_mb"], 2),
        "buffers_mb": round(runs["train"][0]["buffers_mb"], 3),
        "probe_set_mb": round(runs["train"][0]["probe_set_mb"], 3),
        "rss_rounds_mb": {arm: [round(r["peak_rss_mb"], 1) for r in runs[arm]] for arm in ARMS},
        "widths": list(widths),
        "rounds": rounds,
        "device": args.device,
        **device_fields,
        "quick": args.quick,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
