"""Training-step overhead of recording every activation site at every step (CPU, or a GPU with ``--device``).

Models (``--model``):

- ``resnet20`` (default): a CIFAR ResNet-20 (3 stages x 3 BasicBlocks, 16/32/64 channels, BatchNorm,
  ReLU; 19 sites), batch 128 of 3x32x32.
- ``resnet18``: ResNet-18-shaped (ImageNet stem: 7x7 conv stride 2 and max-pool; 4 stages x 2
  BasicBlocks of 64/128/256/512 channels; 17 sites), batch 128 at a small resolution (``--resolution``,
  default 64) so that a step takes well under a second on 2 cores.
- ``digits``: the demo's digits CNN (3 sites), batch 64 of 1x8x8, where the fixed cost per site
  dominates.

Three arms are interleaved in groups, the order alternating, so drift of the machine hits all alike:
plain SGD steps (A), steps whose forward runs inside ``recorder.capture()`` (B), and steps captured by
a recorder whose records are discarded instead of written (C: hooks, packing and hand-off only).
``ratio`` is the median over groups of B / A in wall time, ``cpu_ratio`` the same in CPU time of the
whole process (every torch thread and the writer thread; robust to other processes' load on a shared
machine), ``hook_ratio`` of C / A. ``floor_ratio`` is what even a perfect recorder must pay: one bare
``z > 0`` pass over the same pre-activations (collected once with hooks), as ``(step + floor) / step``.

Cost per site and step, in microseconds: ``site_us`` = median over groups of (C - A) / sites,
``site_us_written`` = the same of (B - A), ``floor_site_us`` = floor / sites, and
``fixed_site_us``: the same as ``site_us`` for the forward of a single sample under ``no_grad``
(tensors so small that only the fixed cost of hooks, packing and hand-off remains).

The writer thread writes a recorded step's records while the next arm runs, so in the interleaved arms
its cost lands in the arm that follows (the hooks-only or the plain one): ``ratio`` and ``cpu_ratio``
leave it out, and ``hook_ratio`` can come out above ``ratio``. ``sustained_cpu_ratio`` charges it:
process CPU seconds of alternating blocks of plain and recorded steps, each recorded block timed until
the writer has written all its records (median over pairs of blocks).

On a GPU (``--device cuda``) every timed call ends with a device synchronization, so that a time
holds the work its call queued; ``floor_ratio`` then times ``z > 0`` on the device, ``device_name``
names the card.

``--packing ops`` packs with numpy and torch ops alone (no numba kernel on the CPU, no Triton kernel on a
CUDA device), to compare with the kernels (the default).

Prints one JSON line. ``--quick`` runs a tiny configuration for the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
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

from actpat.recorder import ActivationRecorder, kernels, open_run

COMPRESSION_CHOICES = ("default", "none", "lzf", "gzip")


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


class ResNet(nn.Module):
    """BasicBlock ResNet: ``cifar`` stem (3x3 conv) or ``imagenet`` stem (7x7 conv stride 2, max-pool)."""

    def __init__(
        self,
        blocks_per_stage: tuple[int, ...] = (3, 3, 3),
        widths: tuple[int, ...] = (16, 32, 64),
        stem: str = "cifar",
        n_classes: int = 10,
    ) -> None:
        super().__init__()
        if stem == "cifar":
            self.conv = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
            self.pool = nn.Identity()
        else:
            self.conv = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
            self.pool = nn.MaxPool2d(3, 2, 1)
        self.bn = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, c_in = [], widths[0]
        for i, (width, n_blocks) in enumerate(zip(widths, blocks_per_stage)):
            blocks = []
            for j in range(n_blocks):
                blocks.append(BasicBlock(c_in, width, 2 if (i > 0 and j == 0) else 1))
                c_in = width
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.pool(self.relu(self.bn(self.conv(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def digits_cnn() -> nn.Module:
    """The demo's DigitsCNN network (two conv layers with BatchNorm and a dense layer, 3 ReLU sites)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def build(
    model: str, quick: bool, batch: int | None, resolution: int | None, device: torch.device = torch.device("cpu")
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The model, a batch of inputs and labels for ``--model``, on ``device``."""
    torch.manual_seed(0)
    if model == "digits":
        net, shape, batch = digits_cnn(), (1, 8, 8), batch or (16 if quick else 64)
    elif model == "resnet18":
        blocks = (1, 1, 1, 1) if quick else (2, 2, 2, 2)
        net, batch = ResNet(blocks, (64, 128, 256, 512), stem="imagenet"), batch or (4 if quick else 128)
        shape = (3, resolution or (32 if quick else 64), resolution or (32 if quick else 64))
    else:
        net, shape, batch = ResNet((1, 1, 1) if quick else (3, 3, 3)), (3, 32, 32), batch or (4 if quick else 128)
    return net.to(device), torch.randn(batch, *shape).to(device), torch.randint(0, 10, (batch,)).to(device)


def site_inputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every ReLU's input of one forward, collected by the benchmark's own hooks (no recorder)."""
    zs: list[torch.Tensor] = []
    handles = [
        m.register_forward_pre_hook(lambda mod, args: zs.append(args[0].detach().clone()))
        for m in model.modules()
        if isinstance(m, nn.ReLU)
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return zs


def synchronizer(device: torch.device):
    """What makes a timed call wait for the work it queued: nothing on the CPU."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def floor_ms(zs: list[torch.Tensor], repeats: int) -> float:
    """Median time of one bare ``z > 0`` over every site's pre-activation of one forward."""
    sync = synchronizer(zs[0].device)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for z in zs:
            z > 0  # noqa: B015 - the work being timed
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def fixed_site_us(model: nn.Module, recorder: ActivationRecorder, x: torch.Tensor, n_sites: int, repeats: int) -> float:
    """Per site, the extra time of a captured single-sample forward under no_grad (fixed cost), in us.

    The model runs in eval mode (BatchNorm cannot normalize a batch of one) and is put back in train mode.
    """
    plain, captured = [], []
    sync = synchronizer(x.device)
    model.eval()
    with torch.no_grad():
        for i in range(repeats + 3):
            start = time.perf_counter()
            model(x)
            sync()
            middle = time.perf_counter()
            with recorder.capture(10**9 + i):
                model(x)
            sync()
            end = time.perf_counter()
            if i >= 3:
                plain.append(middle - start)
                captured.append(end - middle)
    model.train()
    return median_difference_us(captured, plain) / n_sites


def recorder_kwargs(compression: str) -> dict:
    """``compression=`` as given on the command line; ``default`` leaves the recorder's default."""
    return {} if compression == "default" else {"compression": None if compression == "none" else compression}


def discarding(recorder: ActivationRecorder) -> ActivationRecorder:
    """The recorder with its records dropped at the hand-off: hooks, packing and hand-off only."""
    recorder.writer.put_many = len
    return recorder


class Clock:
    """Wall and process CPU time of one call, until ``sync()`` returns after it."""

    def __init__(self, sync) -> None:
        self.sync = sync
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def time(self, fn) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        self.sync()
        self.cpu.append(time.process_time() - cpu)
        self.wall.append(time.perf_counter() - wall)


def median_ratio(num: list[float], den: list[float]) -> float:
    return round(statistics.median(b / a for a, b in zip(den, num)), 4)


def median_difference_us(num: list[float], den: list[float]) -> float:
    """Median over groups of ``num - den``, in microseconds (robust to drift between groups)."""
    return 1e6 * statistics.median(b - a for a, b in zip(den, num))


def run_arms(arms: dict, groups: int, warmup: int, device: torch.device = torch.device("cpu")) -> dict[str, Clock]:
    """Time ``groups`` interleaved rounds of every arm, the order reversed every other round."""
    for _ in range(warmup):
        for arm in arms.values():
            arm()
    clocks = {name: Clock(synchronizer(device)) for name in arms}
    names = list(arms)
    for i in range(groups):
        for name in names if i % 2 == 0 else names[::-1]:
            clocks[name].time(arms[name])
    return clocks


def parse_args(doc: str, argv: list[str] | None, *extra: tuple[str, dict]) -> argparse.Namespace:
    """The options every overhead benchmark takes (plus ``extra`` ones); sets torch's thread count."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny configuration, for the test suite")
    parser.add_argument("--model", default="resnet20", choices=["resnet20", "resnet18", "digits"])
    parser.add_argument("--pairs", type=int, default=None, help="interleaved groups of the arms to time")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--resolution", type=int, default=None, help="input size of resnet18 (default 64)")
    parser.add_argument("--compression", default="default", choices=COMPRESSION_CHOICES)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"), help="cpu (default) or cuda")
    for flag, kwargs in extra:
        parser.add_argument(flag, **kwargs)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    return args


def sustained_cpu(
    plain, captured, recorder: ActivationRecorder, n_sites: int, steps: int, pairs: int, sync
) -> dict:
    """``sustained_cpu_ratio`` (module docstring): a recorded block's process CPU time runs until the
    writer has written every record of the block (waiting costs no CPU)."""
    cpu = {"plain": [], "recorded": []}
    for i in range(pairs):
        for arm in ("plain", "recorded") if i % 2 == 0 else ("recorded", "plain"):
            start = time.process_time()
            if arm == "plain":
                for _ in range(steps):
                    plain()
                sync()
            else:
                target = recorder.writer.written_records + steps * n_sites
                for _ in range(steps):
                    captured()
                sync()
                deadline = time.monotonic() + 60
                while recorder.writer.written_records < target and time.monotonic() < deadline:
                    time.sleep(0.005)
                if recorder.writer.written_records < target:
                    raise RuntimeError("the writer did not write a recorded block within 60 s")
            cpu[arm].append(time.process_time() - start)
    return {
        "sustained_cpu_ratio": median_ratio(cpu["recorded"], cpu["plain"]),
        "sustained_steps": steps,
        "sustained_pairs": pairs,
    }


def run_fields(x: torch.Tensor, groups: int, compression: str, quick: bool) -> dict:
    """The JSON fields that describe the run: input, groups, settings and environment."""
    cuda = x.device.type == "cuda"
    return {
        "device": x.device.type,
        "device_name": torch.cuda.get_device_name(x.device) if cuda else platform.processor() or platform.machine(),
        "batch": len(x),
        "input_shape": list(x.shape[1:]),
        "groups": groups,
        "compression": compression,
        "quick": quick,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__, argv, ("--packing", {
        "default": "kernels", "choices": ["kernels", "ops"],
        "help": "ops: pack with numpy and torch ops alone, without the numba and Triton kernels (a comparison)",
    }))
    with contextlib.nullcontext() if args.packing == "kernels" else kernels.disabled():
        return measure(args)


def measure(args: argparse.Namespace) -> dict:
    quick = args.quick
    groups = args.pairs or (2 if quick else 20 if args.model != "digits" else 200)
    warmup = 1 if quick else 3

    model, x, y = build(args.model, quick, args.batch, args.resolution, args.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    step = 0

    def plain() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def captured(rec: ActivationRecorder) -> None:
        nonlocal step
        with rec.capture(step, labels=y):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1

    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as null_out:
        recorder = ActivationRecorder(model, out, **recorder_kwargs(args.compression))
        hooks_only = discarding(ActivationRecorder(model, null_out))
        arms = {"a": plain, "b": lambda: captured(recorder), "c": lambda: captured(hooks_only)}
        with recorder, hooks_only:
            clocks = run_arms(arms, groups, warmup, args.device)
            n_sites = len(recorder.sites)
            sustained = sustained_cpu(
                plain, lambda: captured(recorder), recorder, n_sites,
                steps=2 if quick else 200 if args.model == "digits" else 8, pairs=2 if quick else 6,
                sync=synchronizer(args.device),
            )
            fixed_us = fixed_site_us(model, hooks_only, x[:1], n_sites, 5 if quick else 200)
            close_start = time.perf_counter()
        close_ms = 1e3 * (time.perf_counter() - close_start)  # draining the writer queue at the end
        run = open_run(out)
        bytes_on_disk = sum(os.path.getsize(p) for p in run.shards)
        recorded_steps = len(run.steps(run.sites[0]))

    a, b, c = clocks["a"], clocks["b"], clocks["c"]
    step_ms = 1e3 * statistics.median(a.wall)
    zs = site_inputs(model, x)
    floor = floor_ms(zs, 5 if quick else 20)
    result = {
        "bench": "overhead",
        "model": args.model,
        "ratio": median_ratio(b.wall, a.wall),
        "cpu_ratio": median_ratio(b.cpu, a.cpu),
        "hook_ratio": median_ratio(c.wall, a.wall),
        "hook_cpu_ratio": median_ratio(c.cpu, a.cpu),
        "floor_ratio": round((step_ms + floor) / step_ms, 4),
        "target_ratio": 1.05,
        "step_ms": round(step_ms, 2),
        "recorded_step_ms": round(1e3 * statistics.median(b.wall), 2),
        "floor_ms": round(floor, 3),
        "site_us": round(median_difference_us(c.wall, a.wall) / n_sites, 1),
        "site_us_written": round(median_difference_us(b.wall, a.wall) / n_sites, 1),
        "floor_site_us": round(1e3 * floor / len(zs), 1),
        "fixed_site_us": round(fixed_us, 1),
        **sustained,
        "close_ms": round(close_ms, 1),
        "sites": n_sites,
        "floor_sites": len(zs),
        "pre_activation_values_per_step": sum(z.numel() for z in zs),
        "recorded_steps": recorded_steps,
        "bytes_on_disk_per_step": round(bytes_on_disk / max(recorded_steps, 1)),
        "packing": args.packing,
        **run_fields(x, groups, args.compression, quick),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
