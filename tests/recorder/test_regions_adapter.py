"""preactivation_fn: a model's pre-activations in float64, against the test's own arithmetic; exact
region changes of torch models against a dense sweep."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from actpat.analysis.regions import segment_regions
from actpat.recorder.regions import preactivation_fn


@pytest.fixture(autouse=True)
def one_thread():
    """The walk runs many forwards of ~30 points: intra-op threads only contend on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 10), nn.ReLU(inplace=True), nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 2))


def manual_preacts(net, x):
    """The hidden pre-activations of ``mlp`` by numpy matrix products on its float64 weights."""
    w = [(m.weight.detach().double().numpy(), m.bias.detach().double().numpy()) for m in net if isinstance(m, nn.Linear)]
    z1 = x @ w[0][0].T + w[0][1]
    z2 = np.maximum(z1, 0) @ w[1][0].T + w[1][1]
    return np.concatenate([z1, z2], axis=1)


def dense_changes(f, a, b, n):
    t = np.linspace(0, 1, n + 1)
    on = f(a[None] + t[:, None] * (b - a)[None]) > 0
    return t, np.flatnonzero(np.any(on[1:] != on[:-1], axis=1))


def test_preacts_equal_manual_float64_computation_and_leave_the_model_alone():
    net = mlp(0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    f = preactivation_fn(net, (3,))
    x = np.random.default_rng(0).normal(size=(5, 3))
    got = f(x)
    assert got.dtype == np.float64 and f.sites == ["1", "3"] and f.widths == [10, 7]
    np.testing.assert_allclose(got, manual_preacts(net, x), rtol=1e-12, atol=1e-12)
    assert next(net.parameters()).dtype == torch.float32 and net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_region_changes_of_a_torch_mlp_match_a_dense_sweep(seed):
    net = mlp(seed)
    f = preactivation_fn(net, (3,))
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=3) * 10, rng.normal(size=3) * 10
    exact = segment_regions(f, a, b)
    # Brute force on the test's own numpy forward, not on the adapter.
    t, changed = dense_changes(lambda p: manual_preacts(net, p), a, b, 100_000)
    assert exact.changes == changed.size > 3
    assert np.array_equal(np.searchsorted(t, exact.breakpoints) - 1, changed)


class ResidualCNN(nn.Module):
    """BatchNorm, a residual sum, functional relu inside a submodule, average pooling."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.block = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.block(h) + h)
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def test_cnn_with_batchnorm_functional_relu_and_residual():
    torch.manual_seed(0)
    net = ResidualCNN()
    net.train()
    net(torch.randn(16, 1, 4, 4))  # running statistics that differ from the defaults
    stats = net.bn1.running_mean.clone()
    f = preactivation_fn(net, (1, 4, 4))
    assert f.sites == ["relu", "relu#0"] and f.widths == [64, 64]
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=16), rng.normal(size=16)
    exact = segment_regions(f, a, b)
    t, changed = dense_changes(f, a, b, 50_000)
    assert exact.changes == changed.size > 3
    assert np.array_equal(np.searchsorted(t, exact.breakpoints) - 1, changed)
    # One point at a time gives the same values as a batch: eval-mode BatchNorm is per-sample affine.
    np.testing.assert_allclose(f(a[None]), f(np.stack([a, b]))[:1], rtol=1e-12, atol=1e-12)
    assert torch.equal(net.bn1.running_mean, stats) and net.training


def test_refuses_kinks_the_patterns_do_not_see():
    with pytest.raises(ValueError, match=r"modules \['1'\] add kinks"):
        preactivation_fn(nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.ReLU()), (1, 6, 6))
    relu6 = nn.Sequential(nn.Linear(2, 3), nn.ReLU6())
    with pytest.raises(ValueError, match="add kinks"):
        preactivation_fn(relu6, (2,))
    f = preactivation_fn(relu6, (2,), check_kinks=False)
    assert f(np.zeros((1, 2))).shape == (1, 3)

    class Functional6(nn.Module):
        def forward(self, x):
            return F.relu6(x)

    with pytest.raises(ValueError, match=r"sites \['relu6#0'\] are ReLU6"):
        preactivation_fn(Functional6(), (2,))


def test_bad_points_and_models_without_sites():
    f = preactivation_fn(mlp(0), (3,))
    with pytest.raises(ValueError, match=r"Expected `points` of shape \(m, 3\)"):
        f(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="Expected activation sites in the model"):
        preactivation_fn(nn.Linear(2, 2), (2,))
