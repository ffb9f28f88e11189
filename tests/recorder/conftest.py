"""Independent truth for the recorder tests: the tests' own hooks and their own bit arithmetic.

Nothing here calls the library's packing code: pre-activations are captured by hooks the test
installs itself, and packed bytes are decoded with shifts and masks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch


def unpack_bits(bits: np.ndarray, n_units: int) -> np.ndarray:
    """``(rows, n_units)`` bool from little-endian packed bytes, by bit arithmetic; padding must be 0."""
    bits = np.asarray(bits, dtype=np.uint8)
    assert bits.ndim == 2 and bits.shape[1] == (n_units + 7) // 8, (bits.shape, n_units)
    units = np.arange(n_units)
    on = (bits[:, units // 8] >> (units % 8).astype(np.uint8)) & 1
    n_pad = 8 * bits.shape[1] - n_units
    if n_pad and len(bits):
        assert not np.any(bits[:, -1] >> np.uint8(8 - n_pad)), "padding bits must be 0"
    return on.astype(bool)


def on_bits(z: torch.Tensor) -> np.ndarray:
    """``z > 0`` as a numpy bool array of z's shape (NaN is off), computed in float64 on the host."""
    values = z.detach().to("cpu", torch.float64).numpy()
    with np.errstate(invalid="ignore"):
        return values > 0


def channel_truth(z: torch.Tensor) -> np.ndarray:
    """Channel layout of ``z > 0``: rows sample-major then flattened position, columns = dim 1."""
    on = on_bits(z)
    if on.ndim == 2:
        return on
    return np.moveaxis(on, 1, -1).reshape(-1, on.shape[1])


def flat_truth(z: torch.Tensor) -> np.ndarray:
    """Flat layout of ``z > 0``: one row per sample, units in C-order of ``(C, *rest)``."""
    on = on_bits(z)
    return on.reshape(on.shape[0], -1)


class Taps:
    """Clone the input of chosen modules with the test's own forward pre-hooks."""

    def __init__(self, *modules: torch.nn.Module) -> None:
        self.inputs: list[torch.Tensor] = []
        self._handles = [m.register_forward_pre_hook(self._hook) for m in modules]

    def _hook(self, module, args):
        self.inputs.append(args[0].detach().clone())

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def exact_conv_net(channels: int, batch: int, size: int, seed: int = 3):
    """Conv-ReLU-1x1 conv-ReLU with weights in {-1, 0, 1} and an integer input holding one NaN.

    Every pre-activation is a small integer, exact on any device and in any fused kernel, so recorded
    bits must equal ``z > 0`` of an eager CPU forward bit for bit.
    """
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, channels, 3, padding=1), torch.nn.ReLU(inplace=True),
        torch.nn.Conv2d(channels, 5, 1), torch.nn.ReLU(),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-1, 2, p.shape, generator=gen).float())
    x = torch.randint(-3, 4, (batch, 3, size, size), generator=gen).float()
    x[0, 0, 0, 0] = float("nan")
    return model, x


@pytest.fixture
def no_global_hooks():
    """Assert that a test leaves no global module hook and no torch function mode behind."""
    yield
    from torch.nn.modules import module as module_mod

    assert not module_mod._global_forward_pre_hooks
    assert not module_mod._global_forward_hooks
    assert torch._C._len_torch_function_stack() == 0


@pytest.fixture(scope="session")
def truth():
    """The helpers above, for test modules (conftest is not importable under --import-mode=importlib)."""

    class _Truth:
        unpack = staticmethod(unpack_bits)
        on = staticmethod(on_bits)
        channel = staticmethod(channel_truth)
        flat = staticmethod(flat_truth)
        exact_conv_net = staticmethod(exact_conv_net)
        Taps = Taps

    return _Truth


@pytest.fixture
def gated_writer(tmp_path):
    """``make(**kwargs) -> (writer, gate)``: a started ShardWriter into ``tmp_path`` whose thread buffers
    nothing until ``gate.set()`` (to fill its queue deterministically)."""
    import threading

    from actpat.recorder.shards import ShardWriter

    def make(**kwargs):
        writer = ShardWriter(tmp_path, **kwargs)
        gate = threading.Event()
        original = writer._buffer

        def gated(record):
            gate.wait(5)
            original(record)

        writer._buffer = gated
        writer.start()
        return writer, gate

    return make
