"""The benchmarks run end to end in --quick mode and print one JSON line each."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _run(script: str, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


@pytest.mark.parametrize("model, sites", [("resnet20", 7), ("digits", 3)])  # quick ResNet-20: 1 block per stage
def test_overhead_quick(model, sites):
    result = _run("overhead.py", "--model", model, "--compression", "none", "--threads", "1")
    assert result["bench"] == "overhead" and result["quick"] is True and result["model"] == model
    for key in ("ratio", "cpu_ratio", "hook_ratio", "floor_ratio", "step_ms", "recorded_step_ms", "floor_ms"):
        assert result[key] > 0
    assert result["floor_ratio"] >= 1.0
    assert result["sites"] == result["floor_sites"] == sites
    # one warm-up step, two groups, and two sustained blocks of two steps
    assert result["recorded_steps"] == 3 + result["sustained_pairs"] * result["sustained_steps"] == 7
    assert result["sustained_cpu_ratio"] > 0
    for key in ("site_us", "site_us_written", "floor_site_us", "fixed_site_us"):
        assert isinstance(result[key], float)


def test_resnet18_shape():
    """The ResNet-18 of the benchmark: ImageNet stem, 4 stages x 2 BasicBlocks, 64-512 channels, 17 ReLUs."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("overhead", BENCH / "overhead.py")
    overhead = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(overhead)
    model, x, y = overhead.build("resnet18", quick=False, batch=None, resolution=None)
    assert sum(isinstance(m, torch.nn.ReLU) for m in model.modules()) == 17
    assert sum(p.numel() for p in model.parameters()) == 11_181_642  # torchvision's resnet18 with 10 classes
    assert tuple(x.shape) == (128, 3, 64, 64) and tuple(y.shape) == (128,)


@pytest.mark.slow
def test_compile_overhead_quick():
    result = _run(
        "compile_overhead.py", "--backend", "eager", "--model", "digits", "--compression", "none", "--threads", "1"
    )
    assert result["bench"] == "compile_overhead" and result["backend"] == "eager"
    assert result["same_sites_as_eager"] is True and result["sites"] == 3
    for key in ("eager_ratio", "compiled_ratio", "speedup", "eager_step_ms", "compiled_step_ms"):
        assert result[key] > 0


@pytest.mark.slow
def test_probe_overhead_quick():
    result = _run("probe_overhead.py", "--threads", "1")
    assert result["bench"] == "probe_overhead" and result["model"] == "resnet18" and result["quick"] is True
    for key in ("probe_vs_floor", "probe_nolive_vs_floor", "floor_ratio", "probe_vs_floor_cpu", "stats_process_cpu_s"):
        assert result[key] > 0
    assert all(len(blocks) == result["rounds"] for blocks in result["block_s"].values())
    # Live statistics of every probe of the probe arm: the one before timing, the warm-up block's, one per round.
    assert result["live_stats_probes"] == 2 + result["rounds"] * result["probes_per_block"]


def test_packing_widths_quick():
    result = _run("packing_widths.py")
    assert result["bench"] == "packing_widths" and result["quick"] is True
    widths = {row["channels"] for row in result["shapes"]}
    assert {3, 12, 100, 128} <= widths  # on and off whole bytes
    assert all(row["pack_us"] > 0 and row["numpy_us"] > 0 and row["floor_us"] > 0 for row in result["shapes"])
    assert result["kernel"] is (importlib.util.find_spec("numba") is not None)


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
