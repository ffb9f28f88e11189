"""The benchmarks run end to end in --quick mode and print one JSON line each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _run(script: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


def test_overhead_quick():
    result = _run("overhead.py")
    assert result["bench"] == "overhead" and result["quick"] is True
    for key in ("ratio", "floor_ratio", "step_ms", "recorded_step_ms", "floor_ms"):
        assert result[key] > 0
    assert result["floor_ratio"] >= 1.0
    assert result["sites"] == result["floor_sites"] == 7  # stem + 3 stages x 1 block x 2 ReLUs


def test_storage_quick():
    result = _run("storage.py")
    assert result["bench"] == "storage" and result["quick"] is True
    # 16, 32 and 64 units: whole bytes, so the packed bits cost exactly 1/8 byte per unit-observation.
    assert result["bits_bytes_per_unit_obs"] == pytest.approx(0.125)
    assert set(result["disk_bytes_per_unit_obs"]) == {"none", "lzf", "gzip"}
    assert result["disk_bytes_per_unit_obs"]["gzip"] < result["disk_bytes_per_unit_obs"]["none"]
