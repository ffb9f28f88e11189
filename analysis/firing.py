"""Per-unit firing rates of every site at every recorded step of a run, streamed chunk by chunk."""

from __future__ import annotations

import os

import numpy as np

from actpat.analysis.units import UnitStats, unit_stats
from actpat.recorder.reader import Run, open_run

__all__ = ["firing_rates"]


def firing_rates(
    run_or_path: Run | str | os.PathLike, split: str | None = None, *, max_rows: int = 1_000_000
) -> dict[str, dict[int, np.ndarray]]:
    """Fraction of observations in which each unit is on, per site and step.

    Parameters
    ----------
    run_or_path : Run or path
        A run, or the directory to open.
    split : str or None, default None
        Recorded split; None means the run's only split (a run with several must name one).
    max_rows : int, default 1_000_000
        Rows read at a time; memory stays bounded by it whatever the size of a step.

    Returns
    -------
    dict
        ``{site: {step: rates}}`` with ``rates`` of shape ``(n_units,)`` in [0, 1], sites in forward
        order, steps ascending (the input of :func:`actpat.analysis.to_tensorboard`'s ``unit_rates``).

    Examples
    --------
    >>> import tempfile
    >>> from actpat.recorder.shards import Record, ShardWriter, SiteMeta
    >>> with tempfile.TemporaryDirectory() as out:
    ...     writer = ShardWriter(out)
    ...     writer.start()
    ...     bits = np.array([[1], [3], [1], [0]], dtype=np.uint8)  # unit 0 on 3 times, unit 1 once
    ...     _ = writer.put(Record(SiteMeta("fc", 0, "ReLU", (2,), 2, "flat"), 5, 0, "probe", bits, 1, 4, 0))
    ...     writer.close()
    ...     firing_rates(out)["fc"][5].tolist()
    [0.75, 0.25]
    """
    run = run_or_path if isinstance(run_or_path, Run) else open_run(run_or_path)
    split = run.resolve_split(split)
    rates: dict[str, dict[int, np.ndarray]] = {}
    for site in run.sites:
        per_step: dict[int, UnitStats] = {}
        for chunk in run.iter_chunks(site, split, max_rows=max_rows):
            stats = unit_stats(chunk.bits, chunk.n_units)
            per_step[chunk.step] = per_step[chunk.step] + stats if chunk.step in per_step else stats
        rates[site] = {step: stats.firing_rate for step, stats in per_step.items()}
    return rates
