"""Fixtures shared by every test folder."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                             reason="needs CUDA"))])
def device(request) -> str:
    """Each device a test must hold on: the CPU, and a GPU where torch sees one (never needed by `make test`)."""
    return request.param
