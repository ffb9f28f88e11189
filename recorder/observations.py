"""The observations of one site at one time point, as the reader and the live statistics hand them on.

numpy only: the live-statistics process (:mod:`actpat.recorder.stats_process`) builds them without
importing h5py or the reader, which would add a third to its start. :mod:`actpat.recorder.reader`
exports the same class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Patterns"]


@dataclass
class Patterns:
    """Observations of one site at one time point.

    Attributes
    ----------
    bits : np.ndarray
        ``(n, ceil(n_units / 8))`` uint8, packed little-endian (unit j = bit j % 8 of byte j // 8).
    n_units : int
    labels, sample_ids : np.ndarray
        ``(n,)`` int64 per observation, ``-1`` where unknown.
    positions : np.ndarray
        ``(n,)`` int64 flattened spatial index of each observation (0 for dense layers and ``flat``).
    values : np.ndarray or None
        ``(n, k)`` float16 pre-activations of the site's ``value_units`` where the recorder stored them
        (``store_values``), else None.
    site, step, epoch, split, nan_count
        Where the observations come from; ``nan_count`` counts NaN pre-activations (stored as off).
    lost_records : int
        Records of this site, step and split left out because they failed verification or never reached
        the disk (see :attr:`actpat.recorder.reader.Run.losses`): when > 0 the observations are only part
        of the step, and measures of the whole step cannot be computed from them.
    """

    site: str
    step: int
    epoch: int
    split: str
    n_units: int
    bits: np.ndarray
    labels: np.ndarray
    sample_ids: np.ndarray
    positions: np.ndarray
    nan_count: int
    values: np.ndarray | None = None
    lost_records: int = 0

    def __len__(self) -> int:
        return len(self.bits)

    def unpack(self) -> np.ndarray:
        """``(n, n_units)`` bool matrix of on (True) / off (False) units."""
        return np.unpackbits(self.bits, axis=-1, count=self.n_units, bitorder="little").astype(bool)
