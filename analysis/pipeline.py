"""Everything offline about a run in one pass over its shards: metric table, information plane, firing rates.

:func:`analyze_run` feeds each (site, step) record, read once, to the consumers of
:func:`~actpat.analysis.summarize`, :func:`~actpat.analysis.information_plane` (binary patterns,
``flat``) and :func:`~actpat.analysis.firing_rates` together (see :mod:`actpat.analysis.driver`). It is
what ``actpat analyze``, ``plot``, ``tensorboard`` and ``report`` run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from actpat.analysis.driver import run_pass
from actpat.analysis.firing import FiringRatesConsumer
from actpat.analysis.information import InformationPlaneConsumer
from actpat.analysis.metrics import REFERENCES
from actpat.analysis.summarize import SummaryConsumer
from actpat.recorder.reader import Run, open_run

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
    per_sample : dict
        Per site, whether its observations are whole samples (``flat`` patterns, or no spatial positions).
    """

    metrics: object
    information_plane: object = None
    firing_rates: dict | None = None
    per_sample: dict = field(default_factory=dict)

    def table(self):
        """The metric table and the information plane as one tidy table (sites forward, steps ascending).

        Both tables name a quantity alike (``mutual_information``, ``saturated``): for a site recorded
        with whole-sample observations (``flat``, or no spatial positions) they are the same numbers, kept
        once. For a ``channel`` site with positions the metric table's are per observation (sample and
        position), the plane's per sample; one name cannot hold both, so the plane of such sites stays in
        :attr:`information_plane` only (figures made by the ``actpat`` commands take it from there).
        """
        import pandas as pd

        plane = self.information_plane
        if plane is None or plane.empty:
            return self.metrics
        plane = plane[plane["site"].map(lambda site: self.per_sample.get(site, False))]
        plane = plane[~plane["metric"].isin(set(self.metrics["metric"]))]
        both = pd.concat([self.metrics, plane], ignore_index=True)
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
    n_classes: int | None = None,
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
    references, threshold, n_classes
        As :func:`~actpat.analysis.summarize`.
    information_plane : bool, default True
        Also compute the binary information plane (``flat`` patterns: ``input_information``, ``mutual_information``, ...). A site whose
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
    >>> wide[["entropy", "input_information", "mutual_information"]].round(3).values.tolist()
    [[1.5, 1.5, 0.5], [1.5, 1.5, 1.0]]
    >>> tmp.cleanup()
    """
    consumers = {"metrics": SummaryConsumer(references, threshold, n_classes)}
    if information_plane:
        consumers["information_plane"] = InformationPlaneConsumer("flat", saturation, "binary", {}, True, strict=False)
    if firing_rates:
        consumers["firing_rates"] = FiringRatesConsumer()
    run = run_or_path if isinstance(run_or_path, Run) else open_run(run_or_path)
    try:
        result = run_pass(run, consumers, split, n_jobs=n_jobs, client=client, progress=progress,
                          desc="actpat analyze")
        infos = {site: run.site_info(site) for site in run.sites}
    finally:
        if run is not run_or_path:
            run.close()
    per_sample = {site: info["pattern"] == "flat" or len(info["shape"]) <= 1 for site, info in infos.items()}
    return RunAnalysis(**result, per_sample=per_sample)
