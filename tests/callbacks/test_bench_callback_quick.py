"""`bench/callback_overhead.py --quick` runs, prints one JSON line, and its numbers are consistent."""

import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "callback_overhead.py"
ARMS = ("baseline", "batch", "probe", "probe_nolive", "floor")


def _expected_probes(steps: int, steps_per_epoch: int, every: float) -> int:
    """Brute-force probe schedule: step 0, the first step at or after each multiple of the interval, the end."""
    interval = every * steps_per_epoch
    due = {0, steps} | {s for s in range(1, steps + 1) if int(s / interval) > int((s - 1) / interval)}
    return len(due)


def test_quick_benchmark_runs_and_reports_positive_ratios():
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=120, check=True
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    result = json.loads(lines[0])
    assert result["bench"] == "callback_overhead" and result["quick"] is True and result["rounds"] == 1
    for key in ("batch_ratio", "probe_ratio", "probe_floor_ratio", "baseline_s", "probe_forwards_s",
                "probe_vs_floor_arm", "probe_nolive_vs_floor_arm", "floor_arm_ratio"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["probe_floor_ratio"] > 1
    assert set(result["times_s"]) == set(ARMS) and all(len(t) == 1 for t in result["times_s"].values())
    assert result["probe_size"] == round(0.1 * result["train_size"])
    # --quick: one epoch of 8 batches, probe every 0.2 epoch = 1.6 steps.
    assert result["steps"] == 8
    assert result["probes"] == _expected_probes(8, 8, 0.2) == 6
    assert result["floor_arm_probes"] == result["probes"]  # the floor arm forwards on the probe's schedule
