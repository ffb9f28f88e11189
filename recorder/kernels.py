"""Compiled one-pass packing of channel patterns on the CPU (numba).

For a channels-first pre-activation, numpy needs a comparison, a handful of shift-and-OR passes and a
transposing copy, and the NaN check is one more read (``bench/packing_widths.py``: 2-6x a bare
comparison). The kernel here reads every value once: it compares, packs 8 channels into a byte and
notes NaNs in the same loop, vectorized over positions.

The kernel is compiled (or loaded from numba's on-disk cache) by :func:`load`, which the recorder calls
when it is made, before training starts. Without numba, when compiling fails (both with a warning) or
under ``NUMBA_DISABLE_JIT``, :func:`load` returns None and packing takes the numpy path: the bits are
the same.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Callable, Iterator

import numpy as np

log = logging.getLogger(__name__)

# Signatures compiled: C-contiguous (N, C, P) values, (N, P, B) output bytes.
_SIGNATURES = ["(float32[:, :, ::1], uint8[:, :, ::1])", "(float64[:, :, ::1], uint8[:, :, ::1])"]
DTYPES = (np.float32, np.float64)

_lock = threading.Lock()
_loaded = False
_kernel: Callable[[np.ndarray, np.ndarray], bool] | None = None


def load() -> Callable[[np.ndarray, np.ndarray], bool] | None:
    """The compiled kernel ``kernel(values, out) -> has_nan``, or None without numba.

    ``values`` is a C-contiguous ``(N, C, P)`` float32 or float64 array, ``out`` a C-contiguous
    ``(N, P, ceil(C / 8))`` uint8 array that the kernel fills: bit ``k`` of byte ``b`` at ``[i, j]`` is
    ``values[i, 8 b + k, j] > 0`` (NaN is off, padding bits are 0). Returns whether any value is NaN.
    The first call compiles (a few seconds, once per machine: numba caches the code on disk); later
    calls return at once.
    """
    global _loaded, _kernel
    if _loaded:
        return _kernel
    with _lock:
        if not _loaded:
            try:
                _kernel = _compile(cache=True)
            except ImportError as exc:  # a dependency of actpat: its absence is an install to mend
                log.warning(
                    "actpat: numba cannot be imported (%s); channel patterns are packed with numpy (same "
                    "bits, 2-3x slower). `pip install numba` restores the compiled packing.", exc,
                )
            except Exception:  # noqa: BLE001 - e.g. no writable cache directory: compile without one
                try:
                    _kernel = _compile(cache=False)
                except Exception as exc:  # noqa: BLE001 - any compile failure leaves the numpy path
                    log.warning(
                        "actpat: the compiled packing kernel is unavailable (%s: %s); channel patterns are "
                        "packed with numpy (same bits, slower).", type(exc).__name__, exc,
                    )
            _loaded = True
    return _kernel


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Pack with numpy inside this block, on every thread: for comparisons (benchmarks, tests)."""
    global _loaded, _kernel
    with _lock:
        saved = _loaded, _kernel
        _loaded, _kernel = True, None
    try:
        yield
    finally:
        with _lock:
            _loaded, _kernel = saved


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
