"""Turn a pre-activation tensor into packed on/off bits on the tensor's own device.

Channel patterns of channels-first float32/float64 CPU tensors are packed by the compiled one-pass
kernel of :mod:`~actpat.recorder.kernels` where numba is installed. Other CPU tensors are compared and
packed with numpy: its float comparison is vectorized where torch's ``z > 0`` with a bool result is not
(3-5x slower on CPU), and a numpy call costs about 1 us against several for a torch op, which dominates
the small tensors of small models. Float tensors on the current CUDA device are packed by the Triton
kernel of the same module, with their NaN count, in one pass (where Triton is installed and a view
merges their positions). Other tensors on an accelerator, and any code that ``torch.compile`` traces,
take a few plain torch ops, which inductor fuses into the graph.
"""

from __future__ import annotations

import math
import sys
import threading
from typing import Any

import numpy as np
import torch

from actpat.recorder import kernels
from actpat.recorder.schema import PATTERN_KINDS

_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Shifts that move the 0/1 byte of unit k of a byte group to bit k.
_SHIFTS_NP = np.arange(8, dtype=np.uint64).reshape(8, 1)
# Multiplier that gathers bit 8 k of a word (k = 0..7) into bit 56 + k: sum of 2 ** (56 - 7 k).
_GATHER = np.uint64(sum(1 << (56 - 7 * k) for k in range(8)))
_ROW_WORDS = {2: np.uint16, 4: np.uint32, 8: np.uint64}
# The comparison's output is written into one reused buffer per thread of at most this many bytes.
_SCRATCH_MAX_BYTES = 64 << 20
_local = threading.local()
# [0, 1, ..., 7] as uint8 per device: made once, not at every site call (a kernel launch on an accelerator).
_SHIFTS: dict[torch.device, torch.Tensor] = {}
# Channel-first tensors with at least this many positions per channel and elements in all combine
# channels before moving to the (sample, position) layout; for fewer, a transposing copy is faster.
_MIN_WORD_POSITIONS = 64
_MIN_WORD_ELEMENTS = 1 << 16
# The kernel vectorizes over positions: with fewer it is no faster than numpy (bench/packing_widths.py).
_MIN_KERNEL_POSITIONS = 8
# Flat patterns (one position) up to this many values also take the kernel: one call instead of numpy's
# comparison, gather and NaN sum, whose fixed costs (50-60 us inside a training step, caches cold) it saves;
# beyond, numpy's vectorized passes are faster.
_MAX_FLAT_KERNEL_ELEMENTS = 1 << 14


def _channels_first(z: torch.Tensor, pattern: str) -> tuple[torch.Tensor, str]:
    """``z`` at least 2-d (a 1-D tensor is one sample) and the pattern as ``channel`` or ``flat``: a
    ``channel_last`` pattern is the ``channel`` pattern of a view with the last dimension moved to dimension 1."""
    if pattern not in PATTERN_KINDS:
        raise ValueError(f"Expected `pattern` to be one of {PATTERN_KINDS}, but got {pattern!r}.")
    if z.dim() == 1:
        z = z.unsqueeze(0)
    if pattern == "channel_last":
        return z.movedim(-1, 1), "channel"
    return z, pattern


def observation_view(z: torch.Tensor, pattern: str) -> tuple[torch.Tensor, int]:
    """Reshape ``z`` of shape ``(N, C, *rest)`` into ``(N * P, n_units)`` observations.

    Parameters
    ----------
    z : torch.Tensor
        Pre-activation, batch first. A 1-D tensor is taken as one sample.
    pattern : {"channel", "flat", "channel_last"}
        ``channel``: dim 1 is the pattern, every (sample, position) one observation, ``P = prod(rest)``.
        ``flat``: one pattern of ``C * prod(rest)`` units per sample, ``P = 1``. ``channel_last``: the last
        dimension is the pattern, as ``channel`` of ``z`` with its last dimension moved to dimension 1
        (``(N, L, C)``: ``P = L``).

    Returns
    -------
    obs : torch.Tensor
        ``(N * P, n_units)``, rows sample-major then by flattened position.
    n_positions : int
        ``P``, the number of observations per sample.
    """
    z, pattern = _channels_first(z, pattern)
    units_last, n_positions = _units_last(z, pattern)
    return units_last.reshape(math.prod(units_last.shape[:-1]), units_last.shape[-1]), n_positions


def pack_patterns(z: torch.Tensor, pattern: str) -> tuple[torch.Tensor, int, int]:
    """Packed on/off patterns of ``z`` (``> 0`` is on, NaN is off), laid out as :func:`observation_view`.

    Returns
    -------
    bits : torch.Tensor
        ``(N * P, ceil(n_units / 8))`` uint8 on ``z.device``.
    n_positions : int
        ``P``, observations per sample.
    n_units : int

    Notes
    -----
    For a ``channel`` pattern of a tensor stored channels-first (NCHW), the 8 channels of each byte
    are combined while the positions are still contiguous, 8 positions per 64-bit word, and only the
    packed bytes are moved to the (sample, position) layout: moving the unpacked booleans first costs
    more than the comparison itself.

    Examples
    --------
    >>> z = torch.tensor([[[1.0, -1.0, 2.0], [-1.0, 3.0, 4.0]]])  # 1 sample, 2 channels, 3 positions
    >>> bits, p, n = pack_patterns(z, "channel")
    >>> bits.tolist(), p, n
    ([[1], [2], [3]], 3, 2)
    """
    bits, n_positions, n_units, _ = _pack(z, pattern)
    return bits, n_positions, n_units


def pack_and_count_nans(z: torch.Tensor, pattern: str) -> tuple[torch.Tensor, int, int, Any]:
    """:func:`pack_patterns` and the number of NaNs in ``z``.

    Returns
    -------
    bits, n_positions, n_units
        As :func:`pack_patterns`.
    nan_count : int or torch.Tensor
        An int on the CPU; a 0-d tensor on an accelerator, so that the hook never waits for the device.
    """
    bits, n_positions, n_units, nan_count = _pack(z, pattern)
    return bits, n_positions, n_units, _nan_count(z) if nan_count is None else nan_count


def _nan_count(z: torch.Tensor) -> Any:
    """Number of NaNs in ``z``: an int on CPU, a device tensor on an accelerator (no sync in the hook)."""
    if z.device.type != "cpu":
        return device_nan_count(z)
    if not z.is_floating_point():
        return 0
    # A sum is NaN whenever z holds a NaN (and rarely otherwise, inf - inf): only then count exactly.
    # One read-only reduction is ~3x cheaper than isnan + count_nonzero over every element.
    return int(z.isnan().count_nonzero()) if math.isnan(float(z.sum(dtype=torch.float32))) else 0


def device_nan_count(z: torch.Tensor) -> Any:
    """NaNs in ``z`` without a host read (no wait for the device, no graph break when traced): a 0-d int64
    tensor on its device, or 0 where ``z`` is not floating point."""
    if not z.is_floating_point():
        return 0
    return z.isnan().sum()  # one reduction; count_nonzero is a comparison and a sum on CUDA


def load_kernels() -> bool:
    """Compile (or load from numba's cache) the packing kernel now; whether it is in use.

    The recorder calls this when it is made, so that a first compile (a few seconds, once per machine)
    happens before training rather than inside its first recorded forward.
    """
    return kernels.load() is not None


def _pack(z: torch.Tensor, pattern: str) -> tuple[torch.Tensor, int, int, Any]:
    """Bits, positions, units and the NaN count where the packing noted NaNs (None: not looked at)."""
    z, pattern = _channels_first(z, pattern)
    if _numpy_packable(z):
        bits, n_positions, n_units, has_nan = _pack_numpy(z.detach().numpy(), pattern)
        nan_count = None if has_nan is None else int(z.isnan().count_nonzero()) if has_nan else 0
        return torch.from_numpy(bits), n_positions, n_units, nan_count
    packed = _pack_with_triton(z, pattern)
    if packed is not None:
        return packed
    units_last, n_positions = _units_last(z, pattern)
    return _pack_units_last(units_last), n_positions, units_last.shape[-1], None


def _pack_with_triton(z: torch.Tensor, pattern: str) -> tuple[torch.Tensor, int, int, torch.Tensor] | None:
    """One Triton launch for a float tensor on the current CUDA device, eager; None: take the torch ops.

    Every size: on an H100 the kernel's direct launch beat the torch ops' five launches for sites of 4k-65k
    values too (bench/overhead.py --model digits, three pairs), as it did for sites of 0.5-25M values."""
    if not (
        _on_current_cuda_device(z) and z.dtype in _TRITON_DTYPES and type(z) is torch.Tensor and z.numel()
        and not torch.compiler.is_compiling()
    ):
        return None  # (an empty tensor: no launch of no programs, whatever the driver makes of one)
    pack = kernels.load_triton()
    if pack is None:
        return None
    _, n_units, n_positions = _layout(z.shape, pattern)
    try:
        values = z.view(z.shape[0], n_units, n_positions)
    except RuntimeError:  # positions (or flat units) whose strides do not merge: the torch ops copy them
        return None
    try:
        bits, nan_count = pack(values)
    except Exception as exc:  # noqa: BLE001 - e.g. no C compiler for Triton's launcher: the torch ops instead
        kernels.drop_triton(exc)
        return None
    return bits, n_positions, n_units, nan_count


def _on_current_cuda_device(z: torch.Tensor) -> bool:
    """Whether ``z`` is on the CUDA device that a Triton kernel launches on: the current one."""
    return z.is_cuda and z.device.index == torch.cuda.current_device()


def _layout(shape: tuple[int, ...], pattern: str) -> tuple[bool, int, int]:
    """For a pre-activation of ``shape`` (at least 2-d): whether each sample is one observation (flat
    patterns, dense layers), the units of an observation and the observations (positions) per sample."""
    if pattern == "flat" or len(shape) == 2:
        return True, math.prod(shape[1:]), 1
    return False, shape[1], math.prod(shape[2:])


def _units_last(z: torch.Tensor, pattern: str) -> tuple[torch.Tensor, int]:
    """``z`` (at least 2-d) as a view ``(N, *positions, n_units)`` (flat: ``(N, n_units)``) and ``P``."""
    flat, n_units, n_positions = _layout(z.shape, pattern)
    if flat:
        return z.reshape(z.shape[0], n_units), 1  # explicit: -1 is ambiguous with 0 values
    return z.movedim(1, -1), n_positions


def pack_rows(obs: torch.Tensor) -> torch.Tensor:
    """Pack the sign of each row of ``obs`` (``> 0`` is on, NaN is off) into little-endian bytes.

    Parameters
    ----------
    obs : torch.Tensor
        ``(rows, n_units)`` of any real dtype, on any device, any strides; a bool tensor is taken as
        the on/off bits themselves. More leading dimensions (``(..., n_units)``) are rows too.

    Returns
    -------
    torch.Tensor
        ``(rows, ceil(n_units / 8))`` uint8 on ``obs.device``; padding bits are 0.

    Notes
    -----
    Plain torch ops (compare, shift, sum over groups of 8): a handful of kernels on an accelerator,
    and ops that ``torch.compile`` traces and fuses into the graph's kernels.

    Examples
    --------
    >>> pack_rows(torch.tensor([[1.0, -1.0, 2.0], [0.0, float("nan"), 3.0]])).tolist()
    [[5], [4]]
    """
    return _pack_units_last(obs)


def _pack_units_last(x: torch.Tensor) -> torch.Tensor:
    """Pack ``x`` of shape ``(..., n_units)``, any strides, into ``(prod(...), ceil(n_units / 8))`` uint8."""
    *lead, n_units = x.shape
    rows = math.prod(lead)
    pad = (-n_units) % 8
    n_bytes = (n_units + pad) // 8
    if torch.compiler.is_compiling():
        return _pack_traced((x if x.dtype == torch.bool else x > 0).reshape(rows, n_units), pad, n_bytes)
    # Eager, each op is a kernel launch on an accelerator (tens of us of the training thread's time at each
    # site): the comparison writes straight into a contiguous, padded buffer (no transposing copy, no pad
    # copy), and the shifts are made once per device.
    if x.dtype == torch.bool and not pad and x.is_contiguous():
        on = x
    else:
        on = torch.empty((*lead, n_units + pad), dtype=torch.bool, device=x.device)
        units = on[..., :n_units] if pad else on
        if x.dtype == torch.bool:
            units.copy_(x)
        else:
            torch.gt(x, 0, out=units)
        if pad:
            on[..., n_units:].fill_(False)
    lanes = on.view(torch.uint8).reshape(rows, n_bytes, 8)
    return (lanes << _shifts(x)).sum(dim=-1, dtype=torch.uint8)  # distinct bits: no carry


def _shifts(x: torch.Tensor) -> torch.Tensor:
    """``[0, 1, ..., 7]`` as uint8 on the device of ``x``, made once per device for plain tensors."""
    if type(x) is not torch.Tensor:
        # A fake tensor (made under a FakeTensorMode) or another subclass: a cached tensor would be of
        # the wrong kind for it, and one made under its mode would break later plain tensors.
        return torch.arange(8, dtype=torch.uint8, device=x.device)
    shifts = _SHIFTS.get(x.device)
    if shifts is None:
        # Copied from the host synchronously: complete for every stream before its first use (and an
        # error, not garbage, inside a CUDA graph capture).
        shifts = _SHIFTS[x.device] = torch.arange(8, dtype=torch.uint8).to(x.device)
    return shifts


def _pack_traced(on: torch.Tensor, pad: int, n_bytes: int) -> torch.Tensor:
    """:func:`pack_rows` of bool ``(rows, n_units)`` in ops that inductor fuses well."""
    rows = on.shape[0]
    if pad or on.stride(-1) == 1:
        # Units contiguous: inductor makes the OR of the 8 shifted lanes one pointwise loop over the output
        # bytes; the sum over a trailing dimension of 8 became a reduction ~10x slower.
        on = on.to(torch.uint8)
        if pad:
            on = torch.nn.functional.pad(on, (0, pad))
        lanes = on.reshape(rows, n_bytes, 8)
        packed = lanes[..., 0]
        for k in range(1, 8):
            packed = packed | (lanes[..., k] << k)
        return packed
    shifts = torch.arange(8, dtype=torch.uint8, device=on.device)  # made in the graph: no tensor from outside it
    return (on.view(torch.uint8).reshape(rows, n_bytes, 8) << shifts).sum(dim=-1, dtype=torch.uint8)


def _numpy_packable(z: torch.Tensor) -> bool:
    return (
        z.is_cpu
        and z.dtype in _NUMPY_DTYPES
        # Not a subclass (fake, ...) that numpy cannot read. Functorch-wrapped tensors have the plain type
        # and pass: the recorder refuses them before packing.
        and type(z) is torch.Tensor
        and not torch.compiler.is_compiling()
    )


def _pack_numpy(values: np.ndarray, pattern: str) -> tuple[np.ndarray, int, int, bool | None]:
    n = values.shape[0]
    flat, n_units, n_positions = _layout(values.shape, pattern)
    if (
        (values.size <= _MAX_FLAT_KERNEL_ELEMENTS if flat else n_positions >= _MIN_KERNEL_POSITIONS)
        and values.dtype in kernels.DTYPES and values.flags.c_contiguous
    ):
        kernel = kernels.load()
        if kernel is not None:
            out = np.empty((n, n_positions, (n_units + 7) // 8), dtype=np.uint8)
            has_nan = kernel(values.reshape(n, n_units, n_positions), out)
            return out.reshape(n * n_positions, out.shape[-1]), n_positions, n_units, bool(has_nan)
    if flat:
        rows = np.greater(values, 0, out=_scratch(values.shape)).reshape(n, n_units)  # NaN compares False: off
        return _pack_rows_numpy(rows), 1, n_units, None
    # Units padded to whole bytes with off units, so that widths like 3, 12 or 100 take the fast paths of
    # whole-byte widths (numpy's packbits of rows of a few bits took 9-24x the comparison:
    # bench/packing_widths.py).
    padded = 8 * ((n_units + 7) // 8)
    if (
        n_positions % 8 == 0
        and n_positions >= _MIN_WORD_POSITIONS
        and values.size >= _MIN_WORD_ELEMENTS
        and sys.byteorder == "little"
    ):
        on = _buffer((n, padded, *values.shape[2:]))
        on[:, n_units:] = False
        np.greater(values, 0, out=on[:, :n_units])  # the comparison fills the first n_units
        return _pack_channels_first(on, n, padded // 8, n_positions), n_positions, n_units, None
    on = np.greater(values, 0, out=_scratch(values.shape))
    if n_units < 64 and n_units != padded:
        # Padded by the transposing copy itself: the gather of _pack_rows_numpy then applies.
        rows = np.zeros((n, *values.shape[2:], padded), dtype=bool)
        rows[..., :n_units] = np.moveaxis(on, 1, -1)
        return _pack_rows_numpy(rows.reshape(n * n_positions, padded)), n_positions, n_units, None
    rows = on.transpose(0, *range(2, on.ndim), 1).reshape(n * n_positions, n_units)
    return _pack_rows_numpy(rows), n_positions, n_units, None


def _pack_channels_first(on: np.ndarray, n: int, n_bytes: int, n_positions: int) -> np.ndarray:
    """Channel patterns of a C-contiguous ``(N, C, *rest)`` bool array, ``C = 8 n_bytes``."""
    # Byte k of each word holds unit 8 b + k at 8 consecutive positions: shifting by k never carries
    # across bytes, so the OR of the 8 shifted words packs 8 positions at once.
    words = on.reshape(n, n_bytes, 8, n_positions).view(np.uint64)
    packed = words[:, :, 0].copy()
    shifted = np.empty_like(packed)
    for k in range(1, 8):
        np.left_shift(words[:, :, k], np.uint64(k), out=shifted)
        packed |= shifted
    by_unit = packed.view(np.uint8).reshape(n, n_bytes, n_positions)
    word = _ROW_WORDS.get(n_bytes)
    if word is None:
        return by_unit.transpose(0, 2, 1).reshape(n * n_positions, n_bytes)
    # Rows of 2, 4 or 8 bytes: assembled as one little-endian word per row, several times faster than
    # numpy's transposing copy of so short rows.
    rows = by_unit[:, 0].astype(word)
    for b in range(1, n_bytes):
        rows |= by_unit[:, b].astype(word) << word(8 * b)
    return rows.view(np.uint8).reshape(n * n_positions, n_bytes)


def _buffer(shape: tuple[int, ...]) -> np.ndarray:
    """The scratch array of ``shape``, or a new one where it would be too large."""
    buffer = _scratch(shape)
    return np.empty(shape, dtype=bool) if buffer is None else buffer


def _scratch(shape: tuple[int, ...]) -> np.ndarray | None:
    """A C-contiguous bool array of ``shape`` reused across calls (per thread), or None if too large.

    A fresh array of a few MiB comes from the kernel at each call, page faults included, which costs
    more than the comparison that fills it.
    """
    size = math.prod(shape)
    if size > _SCRATCH_MAX_BYTES:
        return None
    buffer = getattr(_local, "scratch", None)
    if buffer is None or buffer.size < size:
        buffer = _local.scratch = np.empty(max(size, 1 << 16), dtype=bool)
    return buffer[:size].reshape(shape)


def _pack_rows_numpy(on: np.ndarray) -> np.ndarray:
    """``(rows, n_units)`` bool to little-endian packed bytes."""
    n_units = on.shape[1]
    if 0 < n_units <= 64 and n_units % 8 == 0 and sys.byteorder == "little":
        # Short rows: the 8 bytes of each output byte, read as one little-endian word, are gathered
        # by one multiplication (bit 8 k moves to bit 56 + k); packbits is slower below ~64 units.
        words = np.ascontiguousarray(on).view(np.uint64)
        return ((words * _GATHER) >> np.uint64(56)).astype(np.uint8)
    return np.packbits(on, axis=-1, bitorder="little")
