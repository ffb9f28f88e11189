"""Training-step overhead of recording every activation site at every step (CPU, ResNet-20-like).

A CIFAR-shaped ResNet-20 (3 stages x 3 BasicBlocks, 16/32/64 channels, BatchNorm, ReLU; 19 ReLU
sites), batch 128 of 32x32 inputs, SGD. Plain steps (A), steps whose forward runs inside
``recorder.capture()`` (B), and steps captured by a recorder whose records are discarded instead of
written (C: hooks and packing only) are interleaved in groups, the order alternating, so drift of the
machine (thermal, other load) hits all alike; ``ratio`` is the median over groups of B / A and
``hook_ratio`` of C / A. ``floor_ratio`` is what even a perfect recorder must pay: one bare ``z > 0`` pass over the
same pre-activations (collected once with hooks), as ``(step + floor) / step``.

Prints one JSON line. ``--quick`` runs a tiny configuration for the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from actpat.recorder import ActivationRecorder, open_run


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, blocks_per_stage: int = 3, widths: tuple[int, ...] = (16, 32, 64), n_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        layers, c_in = [], widths[0]
        for i, width in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                blocks.append(BasicBlock(c_in, width, 2 if (i > 0 and j == 0) else 1))
                c_in = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(c_in, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.conv(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _step(model, opt, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _floor_ms(model, x, repeats: int) -> tuple[float, int, int]:
    """Median time of one bare ``z > 0`` over every site's pre-activation of one forward."""
    zs = []
    handles = [
        m.register_forward_pre_hook(lambda mod, args: zs.append(args[0].detach().clone()))
        for m in model.modules()
        if isinstance(m, nn.ReLU)
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for z in zs:
            z > 0  # noqa: B015 - the work being timed
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), len(zs), sum(z.numel() for z in zs)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny configuration (seconds), for the test suite")
    parser.add_argument("--pairs", type=int, default=None, help="interleaved A/B/C groups to time")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--compression", default="lzf", choices=["lzf", "gzip", "none"])
    args = parser.parse_args(argv)
    quick = args.quick
    batch = args.batch or (8 if quick else 128)
    pairs = args.pairs or (3 if quick else 20)
    warmup = 1 if quick else 3

    torch.manual_seed(0)
    model = ResNet20(blocks_per_stage=1 if quick else 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    compression = None if args.compression == "none" else args.compression

    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as null_out:
        recorder = ActivationRecorder(model, out, compression=compression)
        # C arm: the same hooks and on-device packing, but records are discarded instead of written,
        # to split the overhead into the hook's share and the writer thread's share.
        hooks_only = ActivationRecorder(model, null_out)
        hooks_only.writer.put = lambda record: True
        step = 0

        def plain() -> float:
            start = time.perf_counter()
            _step(model, opt, x, y)
            return time.perf_counter() - start

        def with_capture(rec) -> float:
            nonlocal step
            start = time.perf_counter()
            with rec.capture(step, labels=y):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            return time.perf_counter() - start

        arms = {"a": plain, "b": lambda: with_capture(recorder), "c": lambda: with_capture(hooks_only)}
        with recorder, hooks_only:
            for _ in range(warmup):
                for arm in arms.values():
                    arm()
            times = {name: [] for name in arms}
            for i in range(pairs):
                order = "abc" if i % 2 == 0 else "cba"  # alternate the order inside each group
                for name in order:
                    times[name].append(arms[name]())
            close_start = time.perf_counter()
        close_ms = 1e3 * (time.perf_counter() - close_start)  # draining the writer queue at the end
        times_a, times_b, times_c = times["a"], times["b"], times["c"]
        run = open_run(out)
        n_sites = len(run.sites)
        bytes_on_disk = sum(os.path.getsize(p) for p in run.shards)
        recorded_steps = len(run.steps(run.sites[0]))

    step_ms = 1e3 * statistics.median(times_a)
    floor_ms, n_floor_sites, n_values = _floor_ms(model, x, 5 if quick else 20)
    result = {
        "bench": "overhead",
        "ratio": round(statistics.median(b / a for a, b in zip(times_a, times_b)), 4),
        "ratio_of_medians": round(statistics.median(times_b) / statistics.median(times_a), 4),
        "hook_ratio": round(statistics.median(c / a for a, c in zip(times_a, times_c)), 4),
        "floor_ratio": round((step_ms + floor_ms) / step_ms, 4),
        "step_ms": round(step_ms, 2),
        "recorded_step_ms": round(1e3 * statistics.median(times_b), 2),
        "floor_ms": round(floor_ms, 3),
        "close_ms": round(close_ms, 1),
        "target_ratio": 1.05,
        "sites": n_sites,
        "floor_sites": n_floor_sites,
        "pre_activation_values_per_step": n_values,
        "recorded_steps": recorded_steps,
        "bytes_on_disk_per_step": round(bytes_on_disk / max(recorded_steps, 1)),
        "batch": batch,
        "groups": pairs,
        "compression": args.compression,
        "quick": quick,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
