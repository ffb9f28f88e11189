"""pack_patterns, pack_rows and observation_view against numpy's packbits and hand-written layouts."""

from __future__ import annotations

import builtins
import contextlib
import inspect
import logging
import math
import os
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actpat.recorder import kernels, packing
from actpat.recorder.packing import load_kernels, observation_view, pack_and_count_nans, pack_patterns, pack_rows

BACKENDS = ["kernel", "numpy", "torch"]


def _backend(name: str) -> contextlib.AbstractContextManager:
    """CPU packing with the compiled kernel (where numba is installed), with numpy alone, or with the torch
    ops that pack tensors on an accelerator (run here on the CPU)."""
    if name == "torch":
        return mock.patch.object(packing, "_numpy_packable", lambda z: False)
    return contextlib.nullcontext() if name == "kernel" else kernels.disabled()


@settings(max_examples=150, deadline=None)
@given(
    n_units=st.integers(1, 200),
    rows=st.integers(0, 9),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
)
def test_pack_rows_matches_numpy_packbits_and_round_trips(n_units, rows, seed, dtype, truth):
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((rows, n_units))
    values[rng.random((rows, n_units)) < 0.1] = 0.0  # exactly zero is off
    z = torch.from_numpy(values).to(dtype)
    packed = pack_rows(z)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, (n_units + 7) // 8)
    on = z.double().numpy() > 0  # the sign after the cast (a tiny value may underflow to 0 in float16)
    expected = np.packbits(on, axis=-1, bitorder="little")
    np.testing.assert_array_equal(packed.numpy(), expected)
    np.testing.assert_array_equal(truth.unpack(packed.numpy(), n_units), on)
    np.testing.assert_array_equal(np.unpackbits(packed.numpy(), axis=-1, count=n_units, bitorder="little"), on)


@pytest.mark.parametrize("n_units", [1, 7, 8, 9, 64, 65])
def test_pack_rows_degenerate_patterns(n_units, truth):
    for fill in (1.0, -1.0, 0.0):
        packed = pack_rows(torch.full((3, n_units), fill)).numpy()
        np.testing.assert_array_equal(truth.unpack(packed, n_units), np.full((3, n_units), fill > 0))
    one_hot = torch.eye(n_units) - 0.5  # all distinct patterns, one unit on each
    np.testing.assert_array_equal(truth.unpack(pack_rows(one_hot).numpy(), n_units), np.eye(n_units, dtype=bool))


def test_pack_rows_special_values():
    z = torch.tensor([[float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-30, -1e-30, 3.0]])
    assert pack_rows(z).tolist() == [[0b10100010]]
    assert pack_rows(torch.tensor([[3, -1, 0, 2]], dtype=torch.int64)).tolist() == [[0b1001]]


def test_pack_rows_non_contiguous_and_empty():
    x = torch.randn(16, 5)
    np.testing.assert_array_equal(
        pack_rows(x.t()).numpy(), np.packbits(x.t().numpy() > 0, axis=-1, bitorder="little")
    )
    assert pack_rows(torch.zeros(0, 5)).shape == (0, 1)
    assert pack_rows(torch.zeros(3, 0)).shape == (3, 0)


def test_observation_view_layouts():
    z = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    obs, n_positions = observation_view(z, "channel")
    assert n_positions == 4 and obs.shape == (8, 3)
    # Row r = sample r // 4 at flattened position r % 4; column c = channel c.
    for r in range(8):
        s, p = divmod(r, 4)
        assert obs[r].tolist() == z[s, :, p // 2, p % 2].tolist()
    flat, n_positions = observation_view(z, "flat")
    assert n_positions == 1 and flat.tolist() == z.reshape(2, 12).tolist()
    dense, n_positions = observation_view(torch.ones(5, 7), "channel")
    assert n_positions == 1 and dense.shape == (5, 7)
    single, n_positions = observation_view(torch.ones(7), "channel")
    assert n_positions == 1 and single.shape == (1, 7)
    empty, n_positions = observation_view(torch.ones(0, 3, 4, 5), "channel")
    assert n_positions == 20 and empty.shape == (0, 3)
    # No value to infer a -1 from: no samples, or no units.
    assert observation_view(torch.ones(0, 3, 4), "flat")[0].shape == (0, 12)
    assert observation_view(torch.ones(3, 0), "flat")[0].shape == (3, 0)
    assert observation_view(torch.ones(2, 0, 5), "channel")[0].shape == (10, 0)
    channels_last = z.to(memory_format=torch.channels_last)
    assert torch.equal(observation_view(channels_last, "channel")[0], obs)
    with pytest.raises(ValueError, match="pattern"):
        observation_view(z, "pixel")


def test_pack_rows_of_bool_input_and_offset_views():
    rng = np.random.default_rng(0)
    on = torch.from_numpy(rng.random((7, 24)) > 0.5)
    expected = np.packbits(on.numpy(), axis=-1, bitorder="little")
    np.testing.assert_array_equal(pack_rows(on).numpy(), expected)
    # A view starting at an odd byte offset cannot be read as int64 words in place.
    np.testing.assert_array_equal(pack_rows(on[3:]).numpy(), expected[3:])
    wide = torch.from_numpy(rng.random((5, 33)) > 0.5)
    np.testing.assert_array_equal(
        pack_rows(wide[:, 1:]).numpy(), np.packbits(wide[:, 1:].numpy(), axis=-1, bitorder="little")
    )


def _expected_bits(z: torch.Tensor, pattern: str) -> np.ndarray:
    """np.packbits of ``z > 0`` (computed in float64) in the observation layout, built by numpy alone."""
    with np.errstate(invalid="ignore"):
        on = z.detach().double().numpy() > 0
    if on.ndim == 1:
        on = on[None]
    if pattern == "flat" or on.ndim == 2:
        rows = on.reshape(on.shape[0], -1)
    else:
        rows = np.moveaxis(on, 1, -1).reshape(-1, on.shape[1])
    return np.packbits(rows, axis=-1, bitorder="little")


@settings(max_examples=120, deadline=None)
@given(
    n=st.integers(1, 5),
    channels=st.sampled_from([1, 5, 8, 13, 16, 24, 64, 72]),
    spatial=st.sampled_from([(), (7,), (3, 5), (8, 16), (16, 16), (2, 3, 4)]),
    layout=st.sampled_from(["contiguous", "channels_last", "transposed"]),
    pattern=st.sampled_from(["channel", "flat"]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
    backend=st.sampled_from(BACKENDS),
)
def test_pack_patterns_of_every_backend_match_numpy(n, channels, spatial, layout, pattern, dtype, seed, backend):
    """CPU floats are packed by the kernel or numpy, other dtypes (and devices) by torch ops: all equal packbits.

    Every layout reaches the torch path: bfloat16 always, other dtypes with the ``torch`` backend."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((n, channels, *spatial), generator=g)
    flat = z.view(-1)
    flat[torch.randint(0, flat.numel(), (max(1, flat.numel() // 10),), generator=g)] = 0.0
    flat[0] = float("nan")
    flat[-1] = -0.0
    z = z.to(dtype)
    if layout == "channels_last" and z.dim() == 4:
        z = z.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed" and z.dim() >= 3:
        z = z.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, non-contiguous strides
    expected = _expected_bits(z, pattern)
    with _backend(backend):
        bits, n_positions, n_units = pack_patterns(z, pattern)
    np.testing.assert_array_equal(bits.numpy(), expected)
    assert n_units == (channels if pattern == "channel" else channels * int(np.prod(spatial)))
    assert n_positions == (int(np.prod(spatial)) if pattern == "channel" else 1)
    np.testing.assert_array_equal(pack_rows(observation_view(z, pattern)[0]).numpy(), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", ["channel", "flat"])
@pytest.mark.parametrize("shape", [(0, 5), (0, 3, 4), (0, 12, 3, 3)])
def test_an_empty_batch_packs_to_no_rows_of_the_right_width(backend, pattern, shape):
    with _backend(backend):
        bits, n_positions, n_units, nan_count = pack_and_count_nans(torch.zeros(shape), pattern)
    flat = pattern == "flat" or len(shape) == 2
    expected_units = int(np.prod(shape[1:])) if flat else shape[1]
    assert (n_positions, n_units) == ((1, expected_units) if flat else (int(np.prod(shape[2:])), expected_units))
    assert bits.shape == (0, (expected_units + 7) // 8) and nan_count == 0


def test_packing_under_a_fake_tensor_mode_leaves_later_real_tensors_packable():
    """Fake tensors (shape propagation) take the torch path; nothing of theirs may be kept for real tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake_bits, _, _ = pack_patterns(torch.randn(2, 9, dtype=torch.bfloat16), "flat")
    assert fake_bits.shape == (2, 2)
    z = torch.tensor([[1.0, -1.0, 2.0, 0.0, 3.0, -2.0, 1.0, 1.0, 5.0]], dtype=torch.bfloat16)
    assert pack_patterns(z, "flat")[0].tolist() == [[0b11010101, 0b1]]


# 1, 2, 4, 8 and 16 bytes per row; widths off whole bytes (3, 5, 12, 20, 100) are padded with off units
@pytest.mark.parametrize("channels", [3, 5, 8, 12, 16, 20, 32, 64, 100, 128])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_patterns_of_large_conv_tensors_match_numpy(channels, channels_last, backend):
    # 40 x 48 positions: channels-first tensors of 8k channels take the word path (>= 64 positions).
    g = torch.Generator().manual_seed(channels)
    z = torch.randn(16, channels, 40, 48, generator=g)
    z[0, 0, 0, :3] = float("nan")
    if channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
    with _backend(backend):
        bits, n_positions, n_units = pack_patterns(z, "channel")
    assert (n_positions, n_units) == (40 * 48, channels)
    np.testing.assert_array_equal(bits.numpy(), _expected_bits(z, "channel"))


def test_pack_patterns_of_a_1d_tensor_and_of_a_tensor_that_requires_grad():
    z = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    bits, n_positions, n_units = pack_patterns(z * 1, "channel")
    assert bits.tolist() == [[0b101]] and (n_positions, n_units) == (1, 3)


def test_the_kernel_is_in_use_where_numba_is_installed():
    pytest.importorskip("numba")
    assert load_kernels() and kernels.load() is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [1, 2, 7, 8, 9, 15, 16, 17, 63, 64, 65])
@pytest.mark.parametrize("spatial", [(), (1,), (3,), (5, 7), (16, 16)])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", ["channel", "flat"])
def test_patterns_and_nan_counts_of_every_width(dtype, channels, spatial, backend, pattern):
    g = torch.Generator().manual_seed(channels * 31 + len(spatial))
    z = torch.randn((3, channels, *spatial), generator=g, dtype=torch.float64)
    flat = z.view(-1)
    tiny = torch.finfo(dtype).tiny / 4  # subnormal, still > 0: on
    specials = [float("inf"), -float("inf"), -0.0, 0.0, tiny, -tiny, float("nan")]
    for k, value in enumerate(specials[: flat.numel()]):
        flat[(k * 7919) % flat.numel()] = value
    z = z.to(dtype)
    with _backend(backend):
        bits, n_positions, n_units, nan_count = pack_and_count_nans(z, pattern)
    np.testing.assert_array_equal(bits.numpy(), _expected_bits(z, pattern))
    positions = int(np.prod(spatial))
    assert (n_positions, n_units) == ((positions, channels) if pattern == "channel" else (1, channels * positions))
    assert nan_count == int(np.isnan(z.numpy()).sum())
    clean = torch.nan_to_num(z, nan=1.0)
    with _backend(backend):
        assert pack_and_count_nans(clean, pattern)[3] == 0


@pytest.mark.parametrize("channels", [3, 8, 13, 64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_patterns_and_nan_counts_on_the_device_of_the_tensor(device, channels, layout):
    """On CUDA the torch path with its device NaN count (a 0-d tensor); the same bits as numpy's."""
    g = torch.Generator().manual_seed(channels)
    z = torch.randn(5, channels, 6, 7, generator=g)
    z.view(-1)[:: 11] = float("nan")
    z.view(-1)[5:: 13] = 0.0
    expected_nans = int(torch.isnan(z).sum())
    z = z.to(device)
    if layout == "channels_last":
        z = z.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        z = z.transpose(-1, -2).contiguous().transpose(-1, -2)
    for pattern in ("channel", "flat"):
        bits, _, _, nan_count = pack_and_count_nans(z, pattern)
        assert bits.device == z.device
        np.testing.assert_array_equal(bits.cpu().numpy(), _expected_bits(z.cpu(), pattern))
        assert int(nan_count) == expected_nans


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_device_nan_count_is_exact_past_a_byte(dtype):
    """The count an accelerator's sites keep on the device (run here on the CPU): 0-d int64, any count."""
    z = torch.randn(7, 50, 3).to(dtype)
    z.view(-1)[::3] = float("nan")
    count = packing.device_nan_count(z)
    assert count.dtype == torch.int64 and count.dim() == 0
    assert int(count) == int(np.isnan(z.float().numpy()).sum()) == 350
    assert packing.device_nan_count(torch.arange(5)) == 0  # no NaN in integers


def _block_import(monkeypatch, package: str) -> None:
    """Make ``import package`` (and its submodules) raise ImportError, as where it is not installed."""
    real_import = builtins.__import__

    def blocked(name, *args, **kwargs):
        if name == package or name.startswith(package + "."):
            raise ImportError(f"No module named {package!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", blocked)


@pytest.fixture
def unloaded_kernels(monkeypatch):
    """The kernel module as before its first load, restored after the test."""
    monkeypatch.setattr(kernels, "_kernels", {})


def test_a_kernel_that_fails_to_compile_leaves_the_numpy_path(unloaded_kernels, monkeypatch, caplog):
    tries = []

    def broken(cache):
        tries.append(cache)
        raise RuntimeError("no cache locator")

    monkeypatch.setattr(kernels, "_compile", broken)
    with caplog.at_level(logging.WARNING, logger="actpat.recorder.kernels"):
        assert load_kernels() is False
    assert "no cache locator" in caplog.text and "packed with numpy" in caplog.text
    assert tries == [True, False]  # without a cache before giving up
    z = torch.randn(4, 12, 9, 9)
    z[1, 3, 2, 2] = float("nan")
    bits, _, _, nan_count = pack_and_count_nans(z, "channel")
    np.testing.assert_array_equal(bits.numpy(), _expected_bits(z, "channel"))
    assert nan_count == 1


def test_a_cache_that_cannot_be_written_still_compiles_the_kernel(unloaded_kernels, monkeypatch):
    pytest.importorskip("numba")
    real = kernels._compile

    def no_cache(cache):
        if cache:
            raise RuntimeError("cannot cache function: no locator available")
        return real(cache)

    monkeypatch.setattr(kernels, "_compile", no_cache)
    assert load_kernels()
    z = torch.randn(2, 9, 4, 4)
    np.testing.assert_array_equal(pack_patterns(z, "channel")[0].numpy(), _expected_bits(z, "channel"))


def test_numba_disable_jit_takes_the_numpy_path(unloaded_kernels, monkeypatch):
    numba = pytest.importorskip("numba")
    monkeypatch.setattr(numba.config, "DISABLE_JIT", True)
    assert load_kernels() is False


def test_without_numba_a_warning_names_the_fix_and_numpy_packs(unloaded_kernels, monkeypatch, caplog):
    _block_import(monkeypatch, "numba")
    with caplog.at_level(logging.WARNING, logger="actpat.recorder.kernels"):
        assert load_kernels() is False
    assert "numba cannot be imported" in caplog.text and "pip install numba" in caplog.text
    z = torch.randn(3, 10, 6, 6)
    np.testing.assert_array_equal(pack_patterns(z, "channel")[0].numpy(), _expected_bits(z, "channel"))


@pytest.fixture
def triton_on_the_cpu(monkeypatch, unloaded_kernels):
    """Float CPU tensors packed the way a CUDA device packs them: by the Triton kernel, run here in Triton's
    interpreter (the same kernel code that a GPU compiles). Yields the shapes the kernel was launched on."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is set up where no CUDA device is (tests/conftest.py)")
    monkeypatch.setattr(packing, "_numpy_packable", lambda z: False)
    monkeypatch.setattr(packing, "_on_current_cuda_device", lambda z: True)
    pack, launches = kernels.load_triton(), []
    kernels._kernels["triton"] = lambda values: launches.append(tuple(values.shape)) or pack(values)
    return launches


def _with_nans_and_zeros(z: torch.Tensor) -> torch.Tensor:
    flat = z.view(-1)
    flat[::11] = float("nan")
    flat[5::13] = 0.0
    return z


def _check_triton_packing(z: torch.Tensor, launches: list, kernel_for: dict[str, bool]) -> None:
    expected_nans = int(torch.isnan(z).sum())
    for pattern, kernel in kernel_for.items():
        launches.clear()
        bits, n_positions, n_units, nan_count = pack_and_count_nans(z, pattern)
        np.testing.assert_array_equal(bits.numpy(), _expected_bits(z, pattern))
        positions = math.prod(z.shape[2:])
        assert (n_positions, n_units) == ((positions, z.shape[1]) if pattern == "channel" else (1, z.shape[1] * positions))
        assert int(nan_count) == expected_nans
        assert len(launches) == kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "batch_transposed", "positions_transposed"])
def test_the_triton_kernel_packs_every_dtype_and_layout(triton_on_the_cpu, dtype, layout):
    g = torch.Generator().manual_seed(3)
    z = _with_nans_and_zeros(torch.randn((3, 13, 5, 7), generator=g)).to(dtype)
    if layout == "channels_last":
        z = z.contiguous(memory_format=torch.channels_last)
    elif layout == "batch_transposed":  # strides of a batch-second buffer: the kernel reads them as they are
        z = z.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "positions_transposed":
        z = z.transpose(-1, -2).contiguous().transpose(-1, -2)
    # Positions (or, flat, units) whose strides no view merges take the torch ops, which copy them.
    merged = {"contiguous": (True, True), "channels_last": (True, False), "batch_transposed": (True, False),
              "positions_transposed": (False, False)}[layout]
    _check_triton_packing(z, triton_on_the_cpu, dict(zip(("channel", "flat"), merged)))


@pytest.mark.parametrize("channels", [1, 7, 8, 9, 33, 64, 65])
@pytest.mark.parametrize("spatial", [(), (3,), (5, 7)])
def test_the_triton_kernel_packs_every_width(triton_on_the_cpu, channels, spatial):
    g = torch.Generator().manual_seed(channels * 7 + len(spatial))
    z = _with_nans_and_zeros(torch.randn((3, channels, *spatial), generator=g))
    _check_triton_packing(z, triton_on_the_cpu, {"channel": True, "flat": True})


def test_the_triton_kernel_counts_nans_of_many_programs_exactly(triton_on_the_cpu):
    """Rows and bytes spread over several programs, each adding its own count."""
    z = torch.randn(2, 70, 9, 17)  # 306 rows (3 row blocks) x 9 bytes (3 byte blocks)
    z.view(-1)[::3] = float("nan")
    bits, _, _, nan_count = pack_and_count_nans(z, "channel")
    np.testing.assert_array_equal(bits.numpy(), _expected_bits(z, "channel"))
    assert nan_count.dtype == torch.int64 and int(nan_count) == int(np.isnan(z.numpy()).sum()) == 7140
    assert triton_on_the_cpu == [(2, 70, 153)]


@pytest.mark.parametrize("shape", [(0, 8, 3, 3), (4, 0, 3, 3), (4, 8, 0, 3)])
def test_an_empty_pre_activation_launches_no_triton_kernel(triton_on_the_cpu, shape):
    """`pack_patterns` is public: an empty tensor (no sample, unit or position) is packed by the torch ops, so
    that no launch of no programs can fail and switch every later site to the torch ops."""
    z = torch.randn(shape)
    n, units, positions = shape[0], shape[1], shape[2] * shape[3]
    for pattern, rows, width in (("channel", n * positions, units), ("flat", n, units * positions)):
        bits, _, _, nan_count = pack_and_count_nans(z, pattern)
        assert tuple(bits.shape) == (rows, (width + 7) // 8) and int(nan_count) == 0
    assert triton_on_the_cpu == []


def test_a_failed_triton_launch_warns_once_and_torch_ops_pack_from_then_on(triton_on_the_cpu, caplog):
    calls = []

    def broken(values):
        calls.append(values.shape)
        raise RuntimeError("Failed to find C compiler")

    kernels._kernels["triton"] = broken
    z = _with_nans_and_zeros(torch.randn(4, 12, 5, 5))
    with caplog.at_level(logging.WARNING, logger="actpat.recorder.kernels"):
        for _ in range(2):
            bits, _, _, nan_count = pack_and_count_nans(z, "channel")
            np.testing.assert_array_equal(bits.numpy(), _expected_bits(z, "channel"))
            assert int(nan_count) == int(torch.isnan(z).sum())
    assert len(calls) == 1 and caplog.text.count("Failed to find C compiler") == 1
    assert "packed with torch ops from now on" in caplog.text


def test_without_triton_torch_ops_pack(triton_on_the_cpu, monkeypatch):
    _block_import(monkeypatch, "triton")
    z = _with_nans_and_zeros(torch.randn(3, 10, 4, 4))
    bits, _, _, nan_count = pack_and_count_nans(z, "channel")
    np.testing.assert_array_equal(bits.numpy(), _expected_bits(z, "channel"))
    assert int(nan_count) == int(torch.isnan(z).sum())
    assert kernels.load_triton() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(16, 13, 40, 40), (2, 9, 3, 3)])
def test_on_a_cuda_device_a_site_of_any_size_is_packed_in_one_triton_launch(dtype, layout, shape):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("triton")
    launches = []
    pack = kernels.load_triton()
    z = _with_nans_and_zeros(torch.randn(shape)).to(dtype)
    expected, expected_nans = _expected_bits(z, "channel"), int(torch.isnan(z).sum())
    z = z.cuda()
    if layout == "channels_last":
        z = z.contiguous(memory_format=torch.channels_last)
    with mock.patch.dict(kernels._kernels, triton=lambda values: launches.append(values.shape) or pack(values)):
        bits, _, _, nan_count = pack_and_count_nans(z, "channel")
    assert launches == [(shape[0], shape[1], shape[2] * shape[3])]
    np.testing.assert_array_equal(bits.cpu().numpy(), expected)
    assert int(nan_count) == expected_nans


def test_on_a_cuda_device_later_triton_launches_skip_the_jit_dispatch_and_stay_exact():
    """After the first launch per dtype (through Triton's JIT, which compiles), the compiled kernel is
    launched directly; pre-activations that start off 16-byte alignment (views at an element offset)
    reuse it and pack exactly, as the kernel is compiled without alignment assumptions."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    triton = pytest.importorskip("triton")
    from triton.runtime.jit import JITFunction

    if "do_not_specialize_on_alignment" not in inspect.signature(triton.jit).parameters:
        pytest.skip("this Triton specializes on alignment: every launch goes through its JIT")
    dispatched = []
    run = JITFunction.run

    def counting(self, *args, **kwargs):
        dispatched.append(kwargs.get("warmup"))
        return run(self, *args, **kwargs)

    shape, n = (4, 13, 40, 40), 4 * 13 * 40 * 40
    with mock.patch.dict(kernels._kernels), mock.patch.object(JITFunction, "run", counting):
        kernels._kernels.pop("triton", None)  # a fresh kernel: nothing compiled for it yet
        pack = kernels.load_triton()
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            base = _with_nans_and_zeros(torch.randn(n + 3)).to(dtype).cuda()
            for offset in (0, 1, 3):
                z = base[offset : offset + n].view(shape)
                bits, nan_count = pack(z.view(4, 13, 1600))
                np.testing.assert_array_equal(bits.cpu().numpy(), _expected_bits(z.cpu(), "channel"))
                assert int(nan_count) == int(torch.isnan(z).sum()) > 0
    assert dispatched == [False] * 4  # one JIT launch per dtype, the other eight direct


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 7, 13), (2, 5, 4, 16), (4, 9), (6,)])
def test_channel_last_patterns_take_the_last_dimension_as_the_units(backend, shape):
    torch.manual_seed(0)
    z = torch.randn(shape)
    z.view(-1)[::5] = float("nan")  # off, and counted
    with _backend(backend):
        bits, n_positions, n_units, nan_count = pack_and_count_nans(z, "channel_last")
    # Brute force: every index of the leading dimensions is one observation of the last dimension's signs.
    rows = (z.nan_to_num(-1.0) > 0).reshape(-1, shape[-1]).numpy()
    np.testing.assert_array_equal(bits.numpy(), np.packbits(rows, axis=1, bitorder="little"))
    assert n_units == shape[-1]
    assert n_positions == (math.prod(shape[1:-1]) if len(shape) > 1 else 1)
    assert nan_count == int(z.isnan().sum())
    obs, p = observation_view(z, "channel_last")
    np.testing.assert_array_equal(obs.numpy(), z.reshape(-1, shape[-1]).numpy())
