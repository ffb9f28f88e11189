"""Compiled one-pass packing kernels: numba on the CPU, Triton on CUDA devices.

For a channels-first pre-activation, numpy needs a comparison, a handful of shift-and-OR passes and a
transposing copy, and the NaN check is one more read (``bench/packing_widths.py``: 2-6x a bare
comparison). On a CUDA device, torch ops take five kernel launches per site (each tens of us of the
training thread's time) and their reduction over groups of eight is slow on large maps (2.1 ms of GPU
time for a 128x64x112x112 pre-activation on an H100, against 0.17 ms for the Triton kernel). Each kernel
here reads every value once: it compares, packs 8 units into a byte and notes NaNs in the same pass.

The numba kernel is compiled (or loaded from numba's on-disk cache) by :func:`load`, which the recorder
calls when it is made, before training starts. Without numba, when compiling fails (both with a
warning) or under ``NUMBA_DISABLE_JIT``, :func:`load` returns None and packing takes the numpy path.
The Triton kernel is made by :func:`load_triton` at the first packing on a CUDA device (Triton comes
with torch's CUDA builds on Linux) and compiled at its first launch, once per dtype (about a second,
cached on disk by Triton). Without Triton, or after a launch that failed (with a warning), packing
takes the torch ops. Every path gives the same bits.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from typing import Any, Callable, Iterator

import numpy as np

log = logging.getLogger(__name__)

# Signatures compiled: C-contiguous (N, C, P) values, (N, P, B) output bytes.
_SIGNATURES = ["(float32[:, :, ::1], uint8[:, :, ::1])", "(float64[:, :, ::1], uint8[:, :, ::1])"]
DTYPES = (np.float32, np.float64)

_lock = threading.Lock()
# Kernel by name ("numba", "triton"): None where unavailable; absent until its first load.
_kernels: dict[str, Callable | None] = {}
_ABSENT = object()


def _load(name: str, make: Callable[[], Callable | None]) -> Callable | None:
    kernel = _kernels.get(name, _ABSENT)
    if kernel is not _ABSENT:
        return kernel
    with _lock:
        if name not in _kernels:
            _kernels[name] = make()
    return _kernels[name]


def load() -> Callable[[np.ndarray, np.ndarray], bool] | None:
    """The compiled kernel ``kernel(values, out) -> has_nan``, or None without numba.

    ``values`` is a C-contiguous ``(N, C, P)`` float32 or float64 array, ``out`` a C-contiguous
    ``(N, P, ceil(C / 8))`` uint8 array that the kernel fills: bit ``k`` of byte ``b`` at ``[i, j]`` is
    ``values[i, 8 b + k, j] > 0`` (NaN is off, padding bits are 0). Returns whether any value is NaN.
    The first call compiles (a few seconds, once per machine: numba caches the code on disk); later
    calls return at once.
    """
    return _load("numba", _make_numba)


def _make_numba() -> Callable[[np.ndarray, np.ndarray], bool] | None:
    try:
        return _compile(cache=True)
    except ImportError as exc:  # a dependency of actpat: its absence is an install to mend
        log.warning(
            "actpat: numba cannot be imported (%s); channel patterns are packed with numpy (same "
            "bits, 2-3x slower). `pip install numba` restores the compiled packing.", exc,
        )
    except Exception:  # noqa: BLE001 - e.g. no writable cache directory: compile without one
        try:
            return _compile(cache=False)
        except Exception as exc:  # noqa: BLE001 - any compile failure leaves the numpy path
            log.warning(
                "actpat: the compiled packing kernel is unavailable (%s: %s); channel patterns are "
                "packed with numpy (same bits, slower).", type(exc).__name__, exc,
            )
    return None


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Pack with numpy and torch ops alone inside this block, on every thread: for comparisons (benchmarks,
    tests)."""
    global _kernels
    with _lock:
        saved, _kernels = _kernels, {"numba": None, "triton": None}
    try:
        yield
    finally:
        with _lock:
            _kernels = saved


def _compile(cache: bool) -> Callable[[np.ndarray, np.ndarray], bool] | None:
    import numba

    if numba.config.DISABLE_JIT:  # NUMBA_DISABLE_JIT=1 would run the loops below in Python
        log.info("actpat: NUMBA_DISABLE_JIT is set; channel patterns are packed with numpy.")
        return None

    @numba.njit(_SIGNATURES, cache=cache, nogil=True, boundscheck=False)
    def pack_planes(values, out):  # pragma: no cover - compiled; tested through its callers
        n, n_units, n_positions = values.shape
        n_bytes = out.shape[2]
        # Missing channels of the last byte read a row of zeros (off), so every byte takes the one
        # 8-row loop that the compiler vectorizes over positions.
        zeros = np.zeros(n_positions, dtype=values.dtype)
        plane = np.empty(n_positions, dtype=np.uint8)
        nan = np.zeros(n_positions, dtype=np.uint8)
        for i in range(n):
            for b in range(n_bytes):
                c = 8 * b
                r0 = values[i, c]
                r1 = values[i, c + 1] if c + 1 < n_units else zeros
                r2 = values[i, c + 2] if c + 2 < n_units else zeros
                r3 = values[i, c + 3] if c + 3 < n_units else zeros
                r4 = values[i, c + 4] if c + 4 < n_units else zeros
                r5 = values[i, c + 5] if c + 5 < n_units else zeros
                r6 = values[i, c + 6] if c + 6 < n_units else zeros
                r7 = values[i, c + 7] if c + 7 < n_units else zeros
                for j in range(n_positions):
                    a0, a1, a2, a3 = r0[j], r1[j], r2[j], r3[j]
                    a4, a5, a6, a7 = r4[j], r5[j], r6[j], r7[j]
                    plane[j] = (
                        np.uint8(a0 > 0) | (np.uint8(a1 > 0) << 1) | (np.uint8(a2 > 0) << 2)
                        | (np.uint8(a3 > 0) << 3) | (np.uint8(a4 > 0) << 4) | (np.uint8(a5 > 0) << 5)
                        | (np.uint8(a6 > 0) << 6) | (np.uint8(a7 > 0) << 7)
                    )
                    # Per-position flags, not one scalar: a scalar reduction stops the vectorization.
                    nan[j] |= (
                        np.uint8(a0 != a0) | np.uint8(a1 != a1) | np.uint8(a2 != a2) | np.uint8(a3 != a3)
                        | np.uint8(a4 != a4) | np.uint8(a5 != a5) | np.uint8(a6 != a6) | np.uint8(a7 != a7)
                    )
                # Written through a contiguous plane: strided stores in the loop above stop the
                # vectorization (measured 3-4x slower).
                for j in range(n_positions):
                    out[i, j, b] = plane[j]
        return nan.any()

    return pack_planes


def load_triton() -> Callable[[Any], tuple[Any, Any]] | None:
    """The Triton kernel ``pack(values) -> (bits, nan_count)``, or None without Triton.

    ``values`` is a float ``(N, U, P)`` tensor (any strides) on the current CUDA device (on the CPU under
    ``TRITON_INTERPRET=1``); ``bits`` the ``(N * P, ceil(U / 8))`` uint8 patterns of its ``(sample,
    position)`` rows (bit ``k`` of byte ``b`` is unit ``8 b + k``, ``> 0`` is on, NaN off, padding 0),
    ``nan_count`` a 0-d int64 tensor on the same device. Two launches: the zeroing of one buffer that
    holds both, and the kernel.
    """
    return _load("triton", _make_triton)


def drop_triton(exc: BaseException) -> None:
    """After a failed launch: warn once and pack on CUDA devices with torch ops from now on."""
    with _lock:
        if _kernels.get("triton") is None:
            return
        _kernels["triton"] = None
    log.warning(
        "actpat: the Triton packing kernel failed (%s: %s); patterns on CUDA devices are packed with torch "
        "ops from now on (same bits, more kernel launches per site).", type(exc).__name__, exc,
    )


# Rows of a program, and bytes per row: 128 x 4 bytes read 4096 values per program.
_TRITON_ROWS = 128
_TRITON_BYTES = 4


def _make_triton() -> Callable[[Any], tuple[Any, Any]] | None:
    try:
        import torch
        import triton
        import triton.language as tl
        from triton.compiler import CompiledKernel
    except ImportError as exc:
        log.info("actpat: Triton cannot be imported (%s); patterns on CUDA devices are packed with torch ops.", exc)
        return None

    # Integer arguments unspecialized: one compile per dtype, not one per divisibility of every size; where
    # this Triton can also leave the pointers' alignment unspecialized, the dtype is all that selects the
    # compiled kernel, and later launches skip the JIT's dispatch (its argument binding and cache lookup
    # cost ~60 us of CPU per launch, more than the launch itself).
    integers = ["n_rows", "n_positions", "n_units", "n_bytes", "stride_n", "stride_u", "stride_p", "byte_blocks"]
    pointers = ["values", "out", "nan_count"]
    direct = "do_not_specialize_on_alignment" in inspect.signature(triton.jit).parameters
    options = {"do_not_specialize_on_alignment": pointers} if direct else {}

    @triton.jit(do_not_specialize=integers, **options)
    def pack_kernel(  # pragma: no cover - compiled; tested through pack, in Triton's interpreter and on CUDA
        values, out, nan_count, n_rows, n_positions, n_units, n_bytes, stride_n, stride_u, stride_p, byte_blocks,
        ROWS: tl.constexpr, BYTES: tl.constexpr,
    ):
        block = tl.program_id(0)
        rows = (block // byte_blocks) * ROWS + tl.arange(0, ROWS)
        first = (block % byte_blocks) * BYTES
        row_ok = rows < n_rows
        sample = rows // n_positions
        start = sample.to(tl.int64) * stride_n + (rows - sample * n_positions).to(tl.int64) * stride_p
        nans = tl.zeros([ROWS], dtype=tl.int32)
        for j in tl.static_range(BYTES):
            byte = tl.zeros([ROWS], dtype=tl.int32)
            # Masks as vectors: a scalar condition in a mask is refused by Triton's interpreter (the tests).
            in_bytes = row_ok & (tl.full([ROWS], first + j, tl.int32) < n_bytes)
            for k in tl.static_range(8):
                unit = (first + j) * 8 + k
                in_units = row_ok & (tl.full([ROWS], unit, tl.int32) < n_units)
                x = tl.load(values + start + unit.to(tl.int64) * stride_u, mask=in_units, other=0)
                if x.dtype.is_bf16():  # exact; Triton's interpreter (the tests) compares bfloat16 as integers
                    x = x.to(tl.float32)
                byte |= (x > 0).to(tl.int32) << k  # NaN compares False: off
                nans += (x != x).to(tl.int32)
            tl.store(out + rows.to(tl.int64) * n_bytes + first + j, byte.to(tl.uint8), mask=in_bytes)
        total = tl.sum(nans, axis=0)
        if total > 0:
            tl.atomic_add(nan_count, total.to(tl.int64))

    compiled: dict[Any, Any] = {}  # (device, dtype) -> the kernel compiled for it, launched directly

    def pack(values: Any) -> tuple[Any, Any]:
        n, n_units, n_positions = values.shape
        n_rows, n_bytes = n * n_positions, (n_units + 7) // 8
        end = -(-n_rows * n_bytes // 8) * 8  # the count's 8 bytes, aligned, after the bits
        buffer = torch.zeros(end + 8, dtype=torch.uint8, device=values.device)
        count = buffer.view(torch.int64)[end // 8]  # few views: each costs microseconds of the training thread
        byte_blocks = -(-n_bytes // _TRITON_BYTES)
        stride_n, stride_u, stride_p = values.stride()
        grid = (-(-n_rows // _TRITON_ROWS) * byte_blocks, 1, 1)  # three entries: a compiled kernel's launch reads them
        args = (
            values, buffer, count, n_rows, n_positions, n_units, n_bytes, stride_n, stride_u, stride_p, byte_blocks,
            _TRITON_ROWS, _TRITON_BYTES,
        )
        key = (values.device, values.dtype)
        kernel = compiled.get(key)
        if kernel is not None:
            kernel[grid](*args)
        else:
            kernel = pack_kernel[grid](*args)
            if direct and isinstance(kernel, CompiledKernel):  # None in Triton's interpreter
                compiled[key] = kernel
        return buffer.as_strided((n_rows, n_bytes), (n_bytes, 1)), count

    return pack
