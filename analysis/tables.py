"""The tidy table every per-step measure of a run goes into, and the checks its builders share.

One row per number: ``step, epoch, split, site, site_index, metric, value``. Tables built by
:func:`~actpat.analysis.summarize`, :func:`~actpat.analysis.width.width_controlled_table` and
:func:`~actpat.analysis.regions.region_table` have these columns and concatenate.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from actpat.analysis.metrics import REFERENCES
from actpat.recorder.reader import Run

__all__ = ["COLUMNS", "check_references", "recorded_sites", "tidy_frame"]

#: Columns of the tidy table, in order.
COLUMNS = ("step", "epoch", "split", "site", "site_index", "metric", "value")
_DTYPES = {"step": np.int64, "epoch": np.int64, "split": str, "site": str, "site_index": np.int64, "metric": str,
           "value": np.float64}


def tidy_frame(rows: Iterable[tuple]) -> pd.DataFrame:
    """A tidy table from ``(step, epoch, split, site, site_index, metric, value)`` tuples, typed.

    Examples
    --------
    >>> tidy_frame([(0, 0, "probe", "fc", 0, "entropy", 1)]).dtypes["value"]
    dtype('float64')
    """
    return pd.DataFrame(list(rows), columns=list(COLUMNS)).astype(_DTYPES)


def check_references(references: str | Sequence[str]) -> tuple[str, ...]:
    """``references`` as a tuple without repeats; a clear error for a name not in ``init, last, final``."""
    references = (references,) if isinstance(references, str) else tuple(dict.fromkeys(references))
    unknown = [r for r in references if r not in REFERENCES]
    if unknown:
        raise ValueError(f"Expected `references` to be a subset of {REFERENCES}, but got {unknown}.")
    return references


def recorded_sites(run: Run, split: str, sites: str | Sequence[str] | None = None) -> list[str]:
    """The sites of ``run`` with records in ``split`` (in forward order), or the chosen ones, checked.

    ``split`` is a recorded split, resolved beforehand with :meth:`~actpat.recorder.reader.Run.resolve_split`.
    """
    recorded = [s for s in run.sites if len(run.steps(s, split))]
    if sites is None:
        return recorded
    chosen = [sites] if isinstance(sites, str) else list(sites)
    unknown = [s for s in chosen if s not in recorded]
    if unknown or not chosen:
        raise ValueError(
            f"Expected `sites` among the sites recorded in {split!r}, {recorded}, but got {unknown or chosen}."
        )
    return chosen
