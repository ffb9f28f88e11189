"""The writer benchmarks run end to end in --quick mode and print one JSON line each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _run(script: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


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
