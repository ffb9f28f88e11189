"""`bench/analysis_scale.py --quick` runs end to end on a tiny run and prints one consistent JSON line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "analysis_scale.py"


@pytest.mark.slow
def test_quick_scale_benchmark(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--no-dask", "--crossover-mb", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    result = json.loads(lines[0])
    assert result["bench"] == "analysis_scale" and result["quick"] is True
    assert result["shards"] >= 2 * result["ranks"] and result["size_mb"] > 1
    # One process and two processes produced the same table (the Dask path: tests/analysis/test_dask.py).
    assert result["tables_identical"] is True
    for key in ("raw_read_cold_mb_s", "summarize_1_mb_s", "summarize_jobs2_mb_s", "sort_floor_mb_s"):
        assert result[key] > 0, key
    assert result["summarize_dask2_mb_s"] is None
    assert set(result["targets"]) == {
        "analysis_ge_half_raw_read", "help_within_0.5s_of_h5py", "info_within_0.5s_of_h5py", "peak_rss_lt_1gb"
    }
    assert result["crossover"] == [] and result["crossover_mb"] is None
    assert list(tmp_path.iterdir()) == []  # the generated run is deleted
