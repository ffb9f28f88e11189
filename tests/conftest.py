"""Fixtures shared by every test folder."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (the CUDA packing) run in Triton's interpreter on the CPU here. Triton reads this when
    # it is imported, so it is set before any test imports it.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                             reason="needs CUDA"))])
def device(request) -> str:
    """Each device a test must hold on: the CPU, and a GPU where torch sees one (never needed by `make test`)."""
    return request.param


@pytest.fixture
def every_probe_gets_statistics(monkeypatch):
    """No probe's live statistics skipped because the worker is two probes behind (by design, tested in
    tests/recorder/test_prober.py): on a loaded machine that happens with a probe every few steps of a tiny
    model. For the tests that check the statistics of every probe."""
    monkeypatch.setattr("actpat.recorder.live_stats.BACKLOG", 100)
