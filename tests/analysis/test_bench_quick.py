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
        # A hash table can only merge patterns, never split them: it loses distinct patterns and entropy.
        assert case["hash_occupied_buckets"] <= case["k_true"]
        assert case["hash_lost_distinct"] == case["k_true"] - case["hash_occupied_buckets"] >= 0
        assert case["hash_entropy_error_bits"] >= -1e-9
        assert case["exact_patterns_per_s"] > 0 and case["speedup_vs_np_unique"] > 0
        assert case["exact_peak_extra_bytes"] > 0
