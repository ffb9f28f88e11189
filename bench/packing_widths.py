"""Packing cost per pattern width: the recorder's CPU packing of channel patterns against a bare comparison.

For each channels-first pre-activation shape (batch 128; widths on and off whole bytes, many and few
positions), the median time of what the recorder does per site call,
:func:`actpat.recorder.packing.pack_and_count_nans` (comparison, packing into the (sample, position) rows
and the NaN count), with the compiled kernel (``pack``, where numba is installed) and with numpy alone
(``numpy``), and of a bare numpy ``z > 0`` over the same values into a ready buffer (the floor: no packing,
no NaN check), interleaved; ``ratio`` is pack / floor, ``numpy_ratio`` numpy / floor.

Prints one JSON line. ``--quick`` runs small shapes for the test suite.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from _report import emit
from overhead import run_arms

from actpat.recorder import kernels
from actpat.recorder.packing import load_kernels, pack_and_count_nans

# channels, spatial: widths of 1-64 bytes and off whole bytes, 1-4096 positions
SHAPES = ((3, (64, 64)), (12, (32, 32)), (16, (32, 32)), (20, (16, 16)), (24, (16, 16)), (64, (16, 16)),
          (100, (8, 8)), (128, (8, 8)), (13, (3, 3)), (512, (4, 4)), (256, (2, 2)), (512, (1, 1)))


def _numpy_only(z: torch.Tensor) -> None:
    with kernels.disabled():
        pack_and_count_nans(z, "channel")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, for the test suite")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    batch, repeats = (8, 3) if args.quick else (128, args.repeats)
    kernel = load_kernels()
    generator = torch.Generator().manual_seed(0)
    rows = []
    for channels, spatial in SHAPES:
        z = torch.randn(batch, channels, *spatial, generator=generator)
        values, out = z.numpy(), np.empty(z.shape, dtype=bool)
        arms = {"pack": lambda: pack_and_count_nans(z, "channel"), "numpy": lambda: _numpy_only(z),
                "floor": lambda: np.greater(values, 0, out=out)}
        clocks = run_arms(arms, repeats, warmup=1)
        pack, numpy_pack, floor = (1e6 * statistics.median(clocks[arm].wall) for arm in arms)
        rows.append({"channels": channels, "positions": int(np.prod(spatial)), "pack_us": round(pack, 1),
                     "numpy_us": round(numpy_pack, 1), "floor_us": round(floor, 1), "ratio": round(pack / floor, 2),
                     "numpy_ratio": round(numpy_pack / floor, 2)})
    emit({"bench": "packing_widths", "quick": args.quick, "batch": batch, "torch_threads": torch.get_num_threads(),
          "kernel": kernel, "max_ratio": max(r["ratio"] for r in rows),
          "max_numpy_ratio": max(r["numpy_ratio"] for r in rows), "shapes": rows})


if __name__ == "__main__":
    main()
