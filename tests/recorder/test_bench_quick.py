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


def test_writer_codecs_quick():
    result = _run("writer_codecs.py")
    assert result["bench"] == "writer_codecs" and result["quick"] is True
    assert set(result["mb_per_s"]) == {"none", "lzf", "gzip", "lz4", "zstd", "blosc-lz4", "blosc-zstd"}
    assert result["speed_vs_none"]["none"] == result["size_vs_none"]["none"] == 1.0
    assert result["size_vs_none"]["gzip"] < 1.0 and result["crc32_share_of_none"] > 0


def test_writer_rss_quick():
    result = _run("writer_rss.py")
    assert result["bench"] == "writer_rss" and result["quick"] is True
    assert result["rss_growth_mib"] > 0 and result["bound_mib"] > result["max_queue_mib"]
    assert result["ratio"] == round(result["rss_growth_mib"] / result["bound_mib"], 3)
