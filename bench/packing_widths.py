"""Packing cost per pattern width: the recorder's CPU packing of channel patterns against a bare comparison.

For each channels-first pre-activation shape (batch 128; widths on and off whole bytes, many and few
positions), the median time of :func:`actpat.recorder.packing.pack_patterns` (comparison and packing into
the (sample, position) rows) and of a bare numpy ``z > 0`` over the same values into a ready buffer (the
floor: no packing at all), interleaved; ``ratio`` is pack / floor. Widths that are not a multiple of 8 are
padded with off units; before, they took numpy's packbits of many short rows (9-24x the floor here).

Prints one JSON line. ``--quick`` runs small shapes for the test suite.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from _report import emit
from overhead import run_arms

from actpat.recorder.packing import pack_patterns

# channels, spatial: widths of 1-16 bytes and off whole bytes, 64-4096 positions and 9 (transposing path)
SHAPES = ((3, (64, 64)), (12, (32, 32)), (16, (32, 32)), (20, (16, 16)), (24, (16, 16)), (64, (16, 16)),
          (100, (8, 8)), (128, (8, 8)), (13, (3, 3)), (512, (4, 4)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, for the test suite")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    batch, repeats = (8, 3) if args.quick else (128, args.repeats)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for channels, spatial in SHAPES:
        z = torch.randn(batch, channels, *spatial, generator=generator)
        values, out = z.numpy(), np.empty(z.shape, dtype=bool)
        clocks = run_arms({"pack": lambda: pack_patterns(z, "channel"), "floor": lambda: np.greater(values, 0, out=out)},
                          repeats, warmup=1)
        pack, floor = (1e6 * statistics.median(clocks[arm].wall) for arm in ("pack", "floor"))
        rows.append({"channels": channels, "positions": int(np.prod(spatial)), "pack_us": round(pack, 1),
                     "floor_us": round(floor, 1), "ratio": round(pack / floor, 2)})
    emit({"bench": "packing_widths", "quick": args.quick, "batch": batch, "torch_threads": torch.get_num_threads(),
          "max_ratio": max(r["ratio"] for r in rows), "shapes": rows})


if __name__ == "__main__":
    main()
