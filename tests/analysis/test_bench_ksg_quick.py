"""`bench/ksg_accuracy.py --quick` runs, prints one JSON line, and its summary is computed from its cases."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[2] / "bench" / "ksg_accuracy.py"


def test_quick_benchmark_runs_and_summarizes_its_cases():
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--no-progress"], capture_output=True, text=True, timeout=300,
        check=True,
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    result = json.loads(lines[0])
    assert result["bench"] == "ksg_accuracy" and result["quick"] is True
    cases = result["cases"]
    assert {c["transform"] for c in cases} == {"identity", "cube_exp", "mix"}
    for case in cases:
        rho, d = case["rho"], case["d"]
        assert case["truth_bits"] == -0.5 * d * math.log2(1 - rho**2)
        for metric in ("max", "euclidean"):
            assert case[f"{metric}_error_bits"] == case[f"{metric}_bits"] - case["truth_bits"]
    for metric in ("max", "euclidean"):
        mae = np.mean([abs(c[f"{metric}_error_bits"]) for c in cases])
        assert result["mean_abs_error_bits"][metric]["all"] == mae
    best = min(("max", "euclidean"), key=lambda m: result["mean_abs_error_bits"][m]["all"])
    assert result["more_accurate"] == best
