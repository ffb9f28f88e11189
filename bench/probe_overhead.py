"""Probe-mode overhead on a ResNet-18-shaped model at batch 128 (CPU): the prober against its own forward floor.

The model of ``bench/overhead.py --model resnet18`` (ImageNet stem, 4 stages x 2 BasicBlocks of
64-512 channels, 17 ReLU sites) trains with plain SGD on a fixed batch of 128 images
(``--resolution``, default 64); a probe set of ``--probe-size`` images (default 256, 10 classes) is
probed every ``--every`` steps, mid-block. Four arms run blocks of ``--steps`` SGD steps, rotated in order each
round so that drift of the machine hits all alike:

- ``baseline``: the SGD steps alone;
- ``floor``: the steps plus, at each probe, what even a perfect probe must do: the forward passes of the
  probe set (held in memory, ``--probe-batch`` at a time) under ``no_grad`` through a train-mode copy of
  the model, made once before timing;
- ``probe``: the steps plus ``Prober.probe`` with default settings (a copy of the model synced in place,
  train mode, channel patterns, uncompressed shards, live statistics of
  :func:`actpat.analysis.live.live_measures` in the statistics process);
- ``probe_nolive``: the same without live statistics.

One prober per probe arm serves every round (its first probe, the copy and the statistics process are
made before timing, as at the start of a fit). Each probe block ends when its background work is done
(the live statistics of its probes computed, the shard writer's queue empty), inside the timed block, so
no arm's work spills into the next arm's block.

``probe_vs_floor`` is the median over rounds of probe / floor (wall time; target at most 1.10),
``probe_nolive_vs_floor`` the same without live statistics, ``floor_ratio`` floor / baseline. The
``*_cpu`` ratios divide CPU seconds summed over rounds: every thread of this process and, for the probe
arm, all the statistics process's CPU (its start and the untimed probes before the rounds included, so
a little pessimistic). ``probe_ms_over_floor`` is the median over rounds of a probe arm's block minus
the floor's, per probe, in milliseconds.

Prints one JSON line. ``--quick`` runs a tiny configuration for the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import resource
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from actpat.analysis.live import live_measures
from actpat.recorder import Prober

from _report import emit
from overhead import build

ARMS = ("baseline", "floor", "probe", "probe_nolive")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _drain(prober: Prober) -> None:
    """Wait until the prober's background work is done: live statistics computed, writer queue empty."""
    prober.poll(wait=True)
    while prober.writer is not None and prober.writer.queued_bytes:
        time.sleep(0.001)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny configuration, for the test suite")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of one block per arm (default 3)")
    parser.add_argument("--steps", type=int, default=None, help="SGD steps per block (default 10)")
    parser.add_argument("--every", type=int, default=None, help="steps between probes (default 10)")
    parser.add_argument("--probe-size", type=int, default=None, help="probe images (default 256)")
    parser.add_argument("--probe-batch", type=int, default=128)
    parser.add_argument("--resolution", type=int, default=None, help="input size (default 64)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    quick = args.quick
    rounds = args.rounds or (1 if quick else 3)
    steps = args.steps or (2 if quick else 10)
    every = args.every or (2 if quick else 10)
    probe_size = args.probe_size or (8 if quick else 256)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, x, y = build("resnet18", quick, None, args.resolution)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    probe_x = torch.randn(probe_size, *x.shape[1:], generator=gen)
    probe_set = TensorDataset(probe_x, torch.randint(0, 10, (probe_size,), generator=gen))
    floor_copy = copy.deepcopy(model).requires_grad_(False).train()
    step = 0

    def sgd_step() -> None:
        nonlocal step
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        step += 1

    def floor_probe() -> None:
        with torch.no_grad():
            for start in range(0, probe_size, args.probe_batch):
                floor_copy(probe_x[start : start + args.probe_batch])

    metrics_seen = []
    children_start = _children_cpu()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as probers_open:
        probers = {
            "probe": Prober(model, probe_set, os.path.join(tmp, "probe"), every, batch_size=args.probe_batch,
                            stats=live_measures, on_stats=lambda s, m: metrics_seen.append(s)),
            "probe_nolive": Prober(model, probe_set, os.path.join(tmp, "nolive"), every, batch_size=args.probe_batch),
        }
        for prober in probers.values():
            probers_open.enter_context(prober)
        for prober in probers.values():  # the copy, the probe cache, the statistics process: before timing
            prober.probe(step)
            _drain(prober)

        def block(arm: str) -> None:
            for k in range(steps):
                sgd_step()
                if k % every == every // 2:  # mid-block: the background work overlaps training as in a fit
                    if arm == "floor":
                        floor_probe()
                    elif arm in probers:
                        probers[arm].probe(step)
            if arm in probers:
                _drain(probers[arm])

        for arm in ARMS:  # warm-up (allocator, first calls), untimed
            block(arm)
        wall: dict[str, list[float]] = {arm: [] for arm in ARMS}
        cpu: dict[str, list[float]] = {arm: [] for arm in ARMS}
        for i in range(rounds):
            for arm in ARMS[i % len(ARMS):] + ARMS[: i % len(ARMS)]:
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                block(arm)
                cpu[arm].append(time.process_time() - start_cpu)
                wall[arm].append(time.perf_counter() - start_wall)
        probers_open.close()
    child_cpu = _children_cpu() - children_start  # the statistics process: start, warm-up and rounds

    probes_per_block = steps // every
    paired = {arm: statistics.median(a / f for a, f in zip(wall[arm], wall["floor"])) for arm in ARMS}
    total_cpu = {arm: sum(values) for arm, values in cpu.items()}
    total_cpu["probe"] += child_cpu
    per_probe_ms = {
        arm: 1e3 * statistics.median(a - f for a, f in zip(wall[arm], wall["floor"])) / max(probes_per_block, 1)
        for arm in ("probe", "probe_nolive")
    }
    result = {
        "bench": "probe_overhead",
        "model": "resnet18",
        "probe_vs_floor": round(paired["probe"], 4),
        "probe_vs_floor_target": 1.10,
        "probe_nolive_vs_floor": round(paired["probe_nolive"], 4),
        "floor_ratio": round(statistics.median(f / b for f, b in zip(wall["floor"], wall["baseline"])), 4),
        "probe_vs_floor_cpu": round(total_cpu["probe"] / total_cpu["floor"], 4),
        "probe_nolive_vs_floor_cpu": round(total_cpu["probe_nolive"] / total_cpu["floor"], 4),
        "probe_ms_over_floor": {arm: round(v, 1) for arm, v in per_probe_ms.items()},
        "stats_process_cpu_s": round(child_cpu, 3),
        "live_stats_probes": len(metrics_seen),
        "block_s": {arm: [round(v, 3) for v in values] for arm, values in wall.items()},
        "step_s": round(statistics.median(wall["baseline"]) / steps, 3),
        "rounds": rounds,
        "steps_per_block": steps,
        "every": every,
        "probes_per_block": probes_per_block,
        "probe_size": probe_size,
        "batch": len(x),
        "input_shape": list(x.shape[1:]),
        "quick": quick,
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
    }
    emit(result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
