"""Wall-time overhead of ``ActivationPatternCallback`` on a Lightning fit (digits CNN; CPU, or a GPU).

Five arms fit :class:`~actpat.callbacks.demo.DigitsCNN` on scikit-learn's digits (1797 8x8 images,
batch 64, SGD, same seed): ``baseline`` (no callback), ``batch`` (``batch_every_n_steps=1``: every
training batch recorded), ``probe`` (a fixed 10% subset of the training set probed every 0.2 epoch,
live statistics on), ``probe_nolive`` (the same with ``live_stats=False``) and ``floor`` (a callback
that only runs the probe forward passes on the probe arm's schedule: the probe set held in memory,
under ``no_grad``, through a train-mode copy of the model). Every arm logs to its own ``CSVLogger`` in
a temporary directory, so the baseline pays the same logging cost as the probe arm's live statistics
need. Rounds of one fit per arm are interleaved, the order rotating each round, so drift of the machine
(other load, thermal) hits all arms alike; ``batch_ratio``, ``probe_ratio``, ``probe_nolive_ratio`` and
``floor_arm_ratio`` are median(arm) / median(baseline) of the wall times.

``probe_floor_ratio`` is what even a perfect probe must pay, derived: one pass over the probe set
(measured in-process, median of repeats) times the number of probes the probe arm recorded (read back
from its shards), as ``(baseline + probe_forwards) / baseline``. ``probe_vs_floor`` = probe arm /
(baseline + probe forwards) is the probe mode's cost against that floor (target: at most 1.10).
``probe_vs_floor_arm`` and ``probe_nolive_vs_floor_arm`` measure the same against the floor arm, as the
median over rounds of the ratio within each round (a cross-check that needs no in-process timing).
``probe_vs_floor_cpu`` (and ``probe_nolive_vs_floor_cpu``) is the same pairing on the CPU seconds of each
fit: every thread of the process (the shard writer, the live-statistics hand-off) and the statistics
process included, so it counts all the work recording adds, while other processes on the machine,
which swing wall times by a fifth here, barely touch it. ``in_fit_ms_per_probe`` is the time the
training thread spent inside the callback's hooks (probe arms) or the floor's forward passes, per
probe, median over fits: measured within each fit, so far
less noisy than whole fits, but without the contention of background work (the shard writer's thread,
the hand-off of live statistics); ``probe_vs_floor_in_fit`` is ``(baseline + probes * probe ms) /
(baseline + probes * floor ms)``. The costs of one probe are also measured in-process,
interleaved, on the fitted model (``probe_costs_ms``, medians): the bare forward passes over the probe
set held in memory (``floor``), one ``Prober.probe`` without live statistics with the copy
(``probe_copy``) and without it (``probe_nocopy``), the probe's session alone (weight sync in place,
RNG isolation, mode: ``session``) against a ``state_dict`` round trip (``state_dict_sync``), and the
live statistics of one probe, all sites (``live_stats``), which run in the worker process.

``--accelerator gpu`` fits on a GPU (the probe set and the floor's copy on it; the in-process timings
end with a device synchronization).

Torch runs one intra-op thread by default (``--threads``): on a small shared machine, OpenMP worker
threads that spin while other processes hold the cores made single fits swing by up to 10x.

Prints one JSON line. ``--quick`` runs a tiny configuration for the test suite.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader, Subset

from actpat.analysis.live import live_measures
from actpat.callbacks.demo import DigitsCNN, digits_dataset
from actpat.callbacks.patterns import PROBE_SPLIT, ActivationPatternCallback
from actpat.recorder import Prober, open_run
from actpat.recorder.probe_module import ProbeModule
from overhead import synchronizer

ARMS = ("baseline", "batch", "probe", "probe_nolive", "floor")
BATCH_SIZE = 64
PROBE_FRACTION = 0.1
PROBE_EVERY = 0.2
PROBE_BATCH_SIZE = 256


class _FloorCallback(pl.Callback):
    """What a perfect probe must do, on the probe arm's schedule: the forward passes of the probe set (held
    in memory) under ``no_grad`` through a train-mode copy of the model, and nothing else."""

    def __init__(self, probe: Subset) -> None:
        self._inputs = [x for x, _y in DataLoader(probe, batch_size=PROBE_BATCH_SIZE, shuffle=False)]
        self._copy = None
        self.n_probes, self.last_step = 0, -1
        self.seconds = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._copy = copy.deepcopy(pl_module).requires_grad_(False).train()
        self._inputs = [x.to(pl_module.device) for x in self._inputs]
        self._interval = Fraction(PROBE_EVERY).limit_denominator(1000) * trainer.num_training_batches
        self._forwards()  # the init probe

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        step = trainer.global_step  # due at the first step at or after each multiple of the interval
        if math.floor(step / self._interval) > math.floor((step - 1) / self._interval):
            self._forwards(step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step > self.last_step:  # the prober's end-of-fit probe
            self._forwards(trainer.global_step)

    def _forwards(self, step: int = 0) -> None:
        start = time.perf_counter()
        self.n_probes += 1
        self.last_step = step
        with torch.no_grad():
            for x in self._inputs:
                self._copy(x)
        synchronizer(self._inputs[0].device)()
        self.seconds += time.perf_counter() - start


class _TimedCallback(ActivationPatternCallback):
    """The callback, with the wall time spent in its hooks summed (``seconds``): what training waited for.

    The hooks are wrapped once, as attributes of the instance (which Lightning's ``getattr`` finds first),
    so the callback's own attribute reads pay nothing for the timing.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seconds = 0.0
        for name in dir(ActivationPatternCallback):
            if name.startswith("on_") or name in ("setup", "teardown"):
                setattr(self, name, self._timed(getattr(self, name)))

    def _timed(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        """``hook``, adding its wall time to ``seconds``."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def _callback(arm: str, probe: Subset) -> list[pl.Callback]:
    if arm == "batch":
        return [ActivationPatternCallback(batch_every_n_steps=1)]
    if arm in ("probe", "probe_nolive"):
        return [_TimedCallback(probe=probe, probe_every=PROBE_EVERY, probe_batch_size=PROBE_BATCH_SIZE,
                               live_stats=arm == "probe")]
    if arm == "floor":
        return [_FloorCallback(probe)]
    return []


def _fit(arm: str, data, probe: Subset, epochs: int, limit_batches: int | float, seed: int, accelerator: str) -> dict:
    """One fit in a fresh temporary directory: wall seconds, optimizer steps, probes recorded, the model."""
    with tempfile.TemporaryDirectory() as tmp:
        pl.seed_everything(seed, verbose=False)
        callbacks = _callback(arm, probe)
        trainer = pl.Trainer(
            max_epochs=epochs,
            limit_train_batches=limit_batches,
            accelerator=accelerator,
            devices=1,
            logger=CSVLogger(tmp, name="logs"),
            callbacks=callbacks,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            log_every_n_steps=5,
        )
        model = DigitsCNN()
        loader = DataLoader(data, batch_size=BATCH_SIZE, shuffle=True)
        cpu_start = _cpu_seconds()
        start = time.perf_counter()
        trainer.fit(model, loader)
        seconds = time.perf_counter() - start
        cpu_seconds = _cpu_seconds() - cpu_start
        n_probes = 0
        if arm.startswith("probe"):
            run = open_run(callbacks[0].run_dir)
            n_probes = len(run.steps(run.sites[0], PROBE_SPLIT))
        if arm == "floor":
            n_probes = callbacks[0].n_probes
    hooks = [c.seconds for c in callbacks if isinstance(c, (_TimedCallback, _FloorCallback))]
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "steps": trainer.global_step, "probes": n_probes, "model": model,
            "hook_seconds": hooks[0] if hooks else None}


def _cpu_seconds() -> float:
    """CPU seconds of this process (all its threads) and of its ended children (the statistics process)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _probe_costs(model: pl.LightningModule, probe: Subset, repeats: int, device: torch.device) -> dict[str, float]:
    """Median milliseconds of the parts of one probe, measured interleaved (see the module docstring)."""
    model = model.to(device)
    floor_module = copy.deepcopy(model).requires_grad_(False).train()
    inputs = [x.to(device) for x, _y in DataLoader(probe, batch_size=PROBE_BATCH_SIZE, shuffle=False)]
    lender = ProbeModule(model, "train", copy=True)
    state_copy = copy.deepcopy(model)
    times: dict[str, list[float]] = {}

    sync = synchronizer(device)

    def timed(name: str, fn) -> None:
        start = time.perf_counter()
        fn()
        sync()
        times.setdefault(name, []).append(1e3 * (time.perf_counter() - start))

    def floor() -> None:
        with torch.no_grad():
            for x in inputs:
                floor_module(x)

    def session() -> None:
        with lender.session():
            pass

    with tempfile.TemporaryDirectory() as tmp:
        probers = {
            name: Prober(model, probe, os.path.join(tmp, name), 1, batch_size=PROBE_BATCH_SIZE, copy=name == "probe_copy")
            for name in ("probe_copy", "probe_nocopy")
        }
        for prober in probers.values():
            prober.probe(0)  # the copy, the cache, the writer: made once, untimed
        with Prober(model, probe, os.path.join(tmp, "patterns"), 1, batch_size=PROBE_BATCH_SIZE) as prober:
            prober.probe(0)
        run = open_run(os.path.join(tmp, "patterns"))
        patterns = {site: run.read(site, 0, PROBE_SPLIT) for site in run.sites}
        references = {site: live_measures(p, {"init": None})[0] for site, p in patterns.items()}
        for step in range(1, repeats + 1):
            timed("floor", floor)
            for name, prober in probers.items():
                timed(name, lambda: prober.probe(step))
            timed("session", session)
            timed("state_dict_sync", lambda: state_copy.load_state_dict(model.state_dict()))
            timed("live_stats", lambda: [
                live_measures(p, {"init": references[site], "last": references[site]}) for site, p in patterns.items()
            ])
        for prober in probers.values():
            prober.close()
    return {name: round(statistics.median(values), 3) for name, values in times.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny configuration (seconds), for the test suite")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds of one fit per arm")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu", help="Lightning's accelerator")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    quick = args.quick
    rounds = args.rounds or (1 if quick else 7)
    epochs = args.epochs or (1 if quick else 25)
    limit_batches = 8 if quick else 1.0
    for name in ("pytorch_lightning", "lightning_fabric"):  # keep stdout to the one JSON line
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)

    data = digits_dataset()
    n_probe = round(PROBE_FRACTION * len(data))
    probe_ids = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[:n_probe]
    probe = Subset(data, probe_ids.tolist())

    for arm in ARMS:  # warm-up (lazy imports, first-call allocations), untimed
        _fit(arm, data, probe, epochs=1, limit_batches=2, seed=args.seed, accelerator=args.accelerator)
    fits: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for i in range(rounds):
        for arm in ARMS[i % len(ARMS):] + ARMS[: i % len(ARMS)]:  # rotate the order each round
            fits[arm].append(_fit(arm, data, probe, epochs, limit_batches, args.seed, args.accelerator))
    steps = {fit["steps"] for arm_fits in fits.values() for fit in arm_fits}
    if len(steps) != 1:
        raise RuntimeError(f"Expected every fit to run the same number of optimizer steps, but got {sorted(steps)}.")
    n_steps = steps.pop()
    n_probes = fits["probe"][0]["probes"]
    median = {arm: statistics.median(fit["seconds"] for fit in fits[arm]) for arm in ARMS}
    costs = _probe_costs(fits["baseline"][0]["model"], probe, repeats=5 if quick else 30, device=device)
    probe_pass_s = costs["floor"] / 1e3
    probe_forwards_s = n_probes * probe_pass_s
    baseline_s = median["baseline"]
    probe_vs_floor = median["probe"] / (baseline_s + probe_forwards_s)
    # The same against the floor arm, paired by round (arms of one round run minutes apart at most).
    paired = {arm: statistics.median(p["seconds"] / f["seconds"] for p, f in zip(fits[arm], fits["floor"]))
              for arm in ("probe", "probe_nolive")}
    # Time the training thread spent inside the callback (probe arms) or the floor's forwards, per probe:
    # measured within each fit, so far less noisy than whole fits; contention from background work
    # (the writer thread, the live-statistics hand-off) is not in it.
    # CPU seconds of each fit, all threads and the statistics process included: what recording takes from
    # training on a CPU-bound machine, and far less sensitive than wall time to other processes' load.
    paired_cpu = {arm: statistics.median(p["cpu_seconds"] / f["cpu_seconds"] for p, f in zip(fits[arm], fits["floor"]))
                  for arm in ("probe", "probe_nolive")}
    in_fit_ms = {arm: 1e3 * statistics.median(f["hook_seconds"] / max(f["probes"], 1) for f in fits[arm])
                 for arm in ("probe", "probe_nolive", "floor")}
    floor_in_fit_s = in_fit_ms["floor"] * n_probes / 1e3

    result = {
        "bench": "callback_overhead",
        "batch_ratio": round(median["batch"] / baseline_s, 4),
        "probe_ratio": round(median["probe"] / baseline_s, 4),
        "probe_floor_ratio": round((baseline_s + probe_forwards_s) / baseline_s, 4),
        "probe_vs_floor": round(probe_vs_floor, 4),
        "probe_vs_floor_target": 1.10,
        "probe_vs_floor_arm": round(paired["probe"], 4),
        "probe_nolive_vs_floor_arm": round(paired["probe_nolive"], 4),
        "floor_arm_ratio": round(median["floor"] / baseline_s, 4),
        "probe_vs_floor_cpu": round(paired_cpu["probe"], 4),
        "probe_nolive_vs_floor_cpu": round(paired_cpu["probe_nolive"], 4),
        "cpu_s": {arm: round(statistics.median(fit["cpu_seconds"] for fit in fits[arm]), 3) for arm in ARMS},
        "in_fit_ms_per_probe": {arm: round(v, 3) for arm, v in in_fit_ms.items()},
        "probe_vs_floor_in_fit": round((baseline_s + in_fit_ms["probe"] * n_probes / 1e3) / (baseline_s + floor_in_fit_s), 4),
        "probe_nolive_vs_floor_in_fit": round(
            (baseline_s + in_fit_ms["probe_nolive"] * n_probes / 1e3) / (baseline_s + floor_in_fit_s), 4),
        "probe_nolive_ratio": round(median["probe_nolive"] / baseline_s, 4),
        "probe_costs_ms": costs,
        "baseline_s": round(baseline_s, 3),
        "batch_s": round(median["batch"], 3),
        "probe_s": round(median["probe"], 3),
        "probe_forwards_s": round(probe_forwards_s, 3),
        "probe_pass_ms": round(1e3 * probe_pass_s, 3),
        "probe_overhead_per_probe_ms": round(1e3 * (median["probe"] - baseline_s) / max(n_probes, 1), 2),
        "batch_overhead_per_step_ms": round(1e3 * (median["batch"] - baseline_s) / n_steps, 2),
        "rounds": rounds,
        "times_s": {arm: [round(fit["seconds"], 3) for fit in fits[arm]] for arm in ARMS},
        "steps": n_steps,
        "epochs": epochs,
        "probes": n_probes,
        "floor_arm_probes": fits["floor"][0]["probes"],
        "probe_size": n_probe,
        "train_size": len(data),
        "batch": BATCH_SIZE,
        "quick": quick,
        "accelerator": args.accelerator,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "python": platform.python_version(),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
