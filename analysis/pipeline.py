"""Everything offline about a run in one pass over its shards: metric table, information plane, firing rates.

:func:`analyze_run` feeds each (site, step) record, read once, to the consumers of
:func:`~actpat.analysis.summarize`, :func:`~actpat.analysis.information_plane` (binary patterns,
``flat``) and :func:`~actpat.analysis.firing_rates` together (see :mod:`actpat.analysis.driver`). It is
what ``actpat analyze``, ``plot``, ``tensorboard`` and ``report`` run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from actpat.analysis.driver import run_pass
from actpat.analysis.firing import FiringRatesConsumer
from actpat.analysis.information import InformationPlaneConsumer
from actpat.analysis.summarize import REFERENCES, SummaryConsumer
from actpat.recorder.reader import Run

__all__ = ["RunAnalysis", "analyze_run"]


@dataclass
class RunAnalysis:
    """What :func:`analyze_run` computed.

    Attributes
    ----------
    metrics : pandas.DataFrame
        The table of :func:`~actpat.analysis.summarize`.
    information_plane : pandas.DataFrame or None
        The table of :func:`~actpat.analysis.information_plane` (binary, ``flat``), or None if not asked.
    firing_rates : dict or None
        ``{site: {step: rates}}`` of :func:`~actpat.analysis.firing_rates`, or None if not asked.
    """

    metrics: object
    information_plane: object = None
    firing_rates: dict | None = None

    def table(self):
        """The metric table and the information plane as one tidy table (sites forward, steps ascending)."""
        import pandas as pd

        if self.information_plane is None or self.information_plane.empty:
            return self.metrics
        both = pd.concat([self.metrics, self.information_plane], ignore_index=True)
        return both.sort_values(["site_index", "step"], kind="stable", ignore_index=True)


def analyze_run(
    run_or_path: Run | str | os.PathLike,
    split: str | None = None,
    *,
    references=REFERENCES,
    threshold: int = 10,
    information_plane: bool = True,
    firing_rates: bool = True,
    saturation: float = 0.9,
    n_jobs: int = 1,
    client=None,
    progress: bool = True,
) -> RunAnalysis:
    """The metric table, the information plane and the firing rates of a run, reading each record once.

    Parameters
    ----------
    run_or_path : Run or path
        A run, or its directory.
    split : str or None, default None
        Recorded split; None means the run's only split (a run with several must name one).
    references, threshold
        As :func:`~actpat.analysis.summarize`.
    information_plane : bool, default True
        Also compute the binary information plane (``flat`` patterns, ``I_XT``, ``I_TY``, ...). A site whose
        records do not hold complete samples (subsampled observations) is left out of it with a warning
        instead of stopping the pass.
    firing_rates : bool, default True
        Also compute the per-unit firing rates.
    saturation : float, default 0.9
        As :func:`~actpat.analysis.information_plane`.
    n_jobs, client, progress
        As :func:`~actpat.analysis.summarize`: local worker processes, or a Dask cluster.

    Returns
    -------
    RunAnalysis
        Each result exactly as the separate function returns it.

    Examples
    --------
    >>> import tempfile
    >>> from actpat.recorder.shards import Record, ShardWriter, SiteMeta
    >>> tmp = tempfile.TemporaryDirectory()
    >>> writer = ShardWriter(tmp.name)
    >>> writer.start()
    >>> for step, rows in ((0, [[1], [3], [1], [0]]), (1, [[3], [3], [1], [0]])):
    ...     _ = writer.put(Record(SiteMeta("fc", 0, "ReLU", (2,), 2, "flat"), step, 0, "probe",
    ...                           np.array(rows, dtype=np.uint8), 1, 4, 0, labels=np.array([0, 0, 1, 1])))
    >>> writer.close()
    >>> result = analyze_run(tmp.name, progress=False)
    >>> result.firing_rates["fc"][1].tolist()  # unit 0 on in 3 of 4 observations, unit 1 in 2
    [0.75, 0.5]
    >>> wide = result.table().pivot_table(index="step", columns="metric", values="value")
    >>> wide[["entropy", "I_XT", "I_TY"]].round(3).values.tolist()  # I_TY = H(T) - H(T|Y)
    [[1.5, 1.5, 0.5], [1.5, 1.5, 1.0]]
    >>> tmp.cleanup()
    """
    consumers = {"metrics": SummaryConsumer(references, threshold)}
    if information_plane:
        consumers["information_plane"] = InformationPlaneConsumer("flat", saturation, "binary", {}, True, strict=False)
    if firing_rates:
        consumers["firing_rates"] = FiringRatesConsumer()
    result = run_pass(run_or_path, consumers, split, n_jobs=n_jobs, client=client, progress=progress,
                      desc="actpat analyze")
    return RunAnalysis(**result)
