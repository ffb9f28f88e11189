"""A functional ReLU call outside every module forward (a loss computed in the loop) is not a site."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from actpat.recorder import ActivationRecorder, open_run


class _RootRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        return F.relu(self.fc(x))


def test_functional_call_outside_forward_is_not_a_site_and_does_not_shift_names(tmp_path, truth):
    torch.manual_seed(0)
    model = _RootRelu()
    x, margin = torch.randn(8, 4), torch.randn(8, 6)
    with ActivationRecorder(model, tmp_path) as rec:
        with rec.capture(0):
            F.relu(margin)  # before the forward: outside every module forward
            out = model(x)
            hinge = torch.relu(1 - out).mean() + (1 - out).relu().sum()  # a hinge loss after it
    run = open_run(tmp_path)
    assert run.sites == ["relu#0"]
    assert len(run.read("relu#0", 0)) == 8  # one call of 8 samples, not the loss's calls as well
    with torch.no_grad():
        expected = truth.channel(model.fc(x))
    np.testing.assert_array_equal(truth.unpack(run.read("relu#0", 0).bits, 6), expected)
    assert torch.isfinite(hinge)
