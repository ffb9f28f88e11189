"""`bench/mi_speed.py --quick` runs, prints one JSON line, and KSG agrees with its brute-force baseline."""

import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "mi_speed.py"
ESTIMATORS = {"binning", "adaptive_binning", "kde_bounds", "ksg", "ksg_mixed"}


def test_quick_benchmark_runs_and_ksg_matches_brute_force():
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=300, check=True
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    result = json.loads(lines[0])
    assert result["bench"] == "mi_speed" and result["quick"] is True
    sizes, widths = result["sizes"], result["widths"]
    assert len(result["cases"]) == (len(ESTIMATORS) * len(widths) + 1) * len(sizes)
    assert {c["estimator"] for c in result["cases"]} == ESTIMATORS | {"ksg_pair"}
    for case in result["cases"]:
        assert case["seconds"] > 0 and case["peak_bytes"] > 0 and math.isfinite(case["value_bits"])
        if case["estimator"] in ("binning", "adaptive_binning", "kde_bounds"):
            assert 0 <= case["value_bits"] <= math.log2(case["n"]) + 1e-9
    assert set(result["scaling_exponent"]) == {f"{e}/w{w}" for e in ESTIMATORS for w in widths} | {"ksg_pair/w1"}
    pair = [c for c in result["cases"] if c["estimator"] == "ksg_pair"]
    assert all(abs(c["value_bits"] - result["ksg_pair_truth_bits"]) < 0.2 for c in pair)
    for baseline in result["ksg_vs_brute_force"]:
        assert baseline["n"] == sizes[0] and baseline["abs_diff_bits"] < 1e-9
        assert baseline["speedup_vs_brute_force"] > 0
