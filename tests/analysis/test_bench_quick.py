"""`bench/analysis_speed.py --quick` runs, prints one JSON line, and its exactness claims hold."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "analysis_speed.py"


def test_quick_benchmark_runs_and_is_exact():
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    result = json.loads(lines[0])
    assert result["bench"] == "analysis_speed" and result["quick"] is True
    assert [c["n_units"] for c in result["cases"]] == [64, 512]
    for case in result["cases"]:
        assert case["exact_matches_np_unique"] is True
        assert case.get("exact_matches_uint64_unique", True) is True
        assert 1 <= case["k_true"] <= case["n"]
        assert case["exact_patterns_per_s"] > 0 and case["speedup_vs_np_unique"] > 0
        assert case["exact_peak_extra_bytes"] > 0
    reference = result["reference_hash"]
    assert [(c["n_units"], round(c["bins_per_observation"], 2)) for c in reference] == [(32, 4.74), (64, 6.32)]
    for case in reference:
        # A hash table can only merge patterns, never split them: it loses distinct patterns and entropy,
        # and its bin counts can only raise the weighted Jaccard index.
        assert 0 <= case["encoding_merged_patterns"] and case["occupied_bins"] <= case["k_true"]
        assert case["lost_distinct"] == case["k_true"] - case["occupied_bins"] >= 0
        assert case["entropy_error_bits"] <= 1e-9
        assert case["weighted_jaccard_error"] >= -1e-12
    assert reference[0]["encoding_merged_patterns"] == 0  # 32 channels: no sign bit in the encoding
