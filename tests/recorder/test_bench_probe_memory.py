"""`bench/probe_memory.py`: each arm runs, and a prober holds what its copy mode promises, no more."""

import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "probe_memory.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("probe_memory", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_copy_holds_one_set_of_weights_and_no_copy_only_the_buffers(bench, device):
    widths = (64, 128)  # 1 MiB of weights
    results = {arm: bench.run_arm(arm, widths, steps=2, device=device) for arm in bench.ARMS}
    model = bench.vgg_shaped(widths)
    weights = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    buffers = sum(b.numel() * b.element_size() for b in model.buffers()) / 2**20
    probe_set = 16 * 3 * 16 * 16 * 4 / 2**20 + 16 * 8 / 2**20  # inputs and labels, cached on the device
    assert results["train"]["weights_mb"] == pytest.approx(weights)
    extra = {arm: results[arm]["tracked_mb"] - results["train"]["tracked_mb"] for arm in bench.ARMS[1:]}
    # Besides, the packed bits of the probes before a measurement may wait for the writer's next block
    # (one a second): at most the two probes before the last measurement, each 16 samples x positions x
    # channels / 8 bytes per ReLU.
    bits = []
    hooks = [m.register_forward_hook(lambda m, a, z: bits.append(z[0, 0].numel() * -(-z.shape[1] // 8)))
             for m in model if isinstance(m, torch.nn.ReLU)]  # fmt: skip
    model(torch.zeros(1, 3, 16, 16))
    for hook in hooks:
        hook.remove()
    pending = 2 * 16 * sum(bits) / 2**20
    for arm, expected in (("probe_copy", weights + buffers + probe_set), ("probe_nocopy", buffers + probe_set)):
        assert expected - 0.01 <= extra[arm] <= expected + pending + 0.01, (arm, extra[arm], expected, pending)
    assert all(r["peak_rss_mb"] > 0 for r in results.values())
