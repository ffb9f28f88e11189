"""Per-unit firing rates of every site at every recorded step of a run, in one pass over the shards."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from actpat.analysis.driver import run_pass
from actpat.analysis.units import UnitStats, unit_stats
from actpat.recorder.reader import Patterns, Run

__all__ = ["FiringRatesConsumer", "firing_rates"]


@dataclass(frozen=True)
class FiringRatesConsumer:
    """The consumer of :func:`~actpat.analysis.driver.run_pass` behind :func:`firing_rates`."""

    def open_block(self, site: str, info: dict, steps, start: int, load):
        def feed(p: Patterns) -> UnitStats | None:
            # A record without observations has no rate (and TensorBoard takes no NaN histogram); a step
            # with lost records has none either (the reader warned).
            return unit_stats(p.bits, p.n_units, validate_args=False) if len(p) and not p.lost_records else None

        return feed

    def merge(self, results: list, split: str, infos: dict) -> dict[str, dict[int, np.ndarray]]:
        rates: dict[str, dict[int, np.ndarray]] = {site: {} for site in infos}
        for site, step, stats in results:
            rates[site][int(step)] = stats.firing_rate
        return rates


def firing_rates(
    run_or_path: Run | str | os.PathLike,
    split: str | None = None,
    *,
    n_jobs: int = 1,
    client=None,
    progress: bool = False,
) -> dict[str, dict[int, np.ndarray]]:
    """Fraction of observations in which each unit is on, per site and step.

    Parameters
    ----------
    run_or_path : Run or path
        A run, or the directory to open.
    split : str or None, default None
        Recorded split; None means the run's only split (a run with several must name one).
    n_jobs : int, default 1
        Local worker processes (``-1``: every core).
    client : distributed.Client or None, default None
        Compute on a Dask cluster (see :mod:`actpat.analysis.driver`).
    progress : bool, default False
        Show a ``tqdm`` progress bar over the records.

    Returns
    -------
    dict
        ``{site: {step: rates}}`` with ``rates`` of shape ``(n_units,)`` in [0, 1], sites in forward
        order, steps ascending (the input of :func:`actpat.analysis.to_tensorboard`'s ``unit_rates``).
        Records without observations are left out.

    Notes
    -----
    Each record is read once, whole: memory is bounded by the largest record of one site and step. To
    get the rates in the same pass as the metric table, use :func:`~actpat.analysis.analyze_run`.

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
    result = run_pass(
        run_or_path, {"rates": FiringRatesConsumer()}, split, n_jobs=n_jobs, client=client, progress=progress,
        desc="actpat firing rates",
    )
    return result["rates"]
