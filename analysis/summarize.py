"""Tidy table of every per-site, per-step measure of a recorded run (SPEC sections 3 and 4).

:func:`summarize` reads a run directory with :func:`actpat.recorder.reader.open_run`, counts the
patterns of each site at each recorded step exactly, and returns one row per number in the tidy format
of the contract: columns ``step, epoch, split, site, site_index, metric, value``. The similarity to the
``final`` record is computed here, offline, so no second training run is needed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from actpat.analysis._validation import NO_LABEL, check_n_classes, check_threshold
from actpat.analysis.counts import PatternCounts
from actpat.analysis.driver import run_pass, tidy_table
from actpat.analysis.measures import pattern_measures
from actpat.analysis.metrics import REFERENCES
from actpat.analysis.similarity import UnpairedRows, aligned_rows, set_similarities, stability
from actpat.analysis.tables import check_references
from actpat.analysis.units import unit_stats
from actpat.recorder.reader import Patterns, Run

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["SummaryConsumer", "summarize"]

log = logging.getLogger(__name__)


@dataclass
class _Step:
    """One step of one site: its observations, exact counts and own measures."""

    patterns: Patterns
    counts: PatternCounts
    metrics: dict


def _warn_once(warned: set, key, message: str, *args) -> None:
    if key not in warned:
        warned.add(key)
        log.warning(message, *args)


def _own_metrics(p: Patterns, site: str, warned: set, *, n_classes: int | None = None) -> tuple[PatternCounts, dict]:
    """Entropy, label and unit measures of one step."""
    labelled = p.labels != NO_LABEL
    if len(p) and not labelled.any():
        _warn_once(
            warned, ("no labels", site),
            "actpat: site %r has steps without any labelled observation (-1); their label measures are left out.",
            site,
        )
    elif labelled.any() and not labelled.all():
        _warn_once(
            warned, ("labels", site),
            "actpat: %d of %d observations of site %r have no label (-1); label measures use the labelled ones.",
            int((~labelled).sum()), len(p), site,
        )
    pc, m = pattern_measures(p.bits, p.n_units, p.labels, n_classes=n_classes)
    us = unit_stats(p.bits, p.n_units, validate_args=False)
    m.update(
        firing_rate_mean=float(us.firing_rate.mean()),
        unit_entropy_mean=float(us.entropy.mean()),
        dead_units=us.n_dead,
        always_on_units=us.n_always_on,
        nan_count=p.nan_count,
    )
    return pc, m


def _similarity_metrics(cur: _Step, ref: _Step, name: str, threshold: int, site: str, warned: set) -> dict:
    m = {f"{measure}_{name}": value for measure, value in set_similarities(cur.counts, ref.counts, threshold).items()}
    try:
        aligned = aligned_rows(cur.patterns, ref.patterns)
    except UnpairedRows as exc:
        _warn_once(
            warned, ("stability", site, name),
            "actpat: site %r: the observations at step %d and its %r reference are not provably the same inputs "
            "(%s); identical_fraction and hamming are left out, and its jaccard and weighted_jaccard compare the "
            "pattern sets of other inputs, which SPEC calls meaningful on the same inputs only (record a fixed "
            "probe set, or pass sample_ids to capture()).",
            site, cur.patterns.step, name, exc.reason,
        )
    else:
        s = stability(aligned[0], aligned[1], cur.patterns.n_units, validate_args=False)
        m[f"identical_fraction_{name}"] = s.identical_fraction
        m[f"hamming_{name}"] = s.hamming_per_unit
    m[f"distinct_change_{name}"] = cur.counts.k - ref.counts.k
    m[f"distinct_change_relative_{name}"] = (cur.counts.k - ref.counts.k) / cur.counts.k
    return m


class _SiteSummary:
    """summarize along one block of one site: its reference records, and the warnings given."""

    def __init__(
        self, site: str, steps: np.ndarray, start: int, load, references: tuple, threshold: int, n_classes: int | None
    ) -> None:
        self.site, self.references, self.threshold, self.n_classes = site, references, threshold, n_classes
        self.warned: set = set()
        self._load = load
        self.init = self.last = self.final = None
        self._last_step = int(steps[-1])
        self.final = self._from_record(load(self._last_step)) if "final" in references else None
        # A block that starts after the site's first step takes its references from the records before it:
        # init is the first record with observations, last the latest one.
        if start > 0 and "init" in references:
            for step in steps[:start]:
                p = load(int(step))
                self._check_init(p)
                self.init = self._from_record(p)
                if self.init is not None or "init" not in self.references:
                    break
        if start > 0 and "last" in references:
            self.last = self._last_before(load, steps[start - 1 :: -1])

    def _last_before(self, load, earlier) -> _Step | None:
        """The latest readable record among ``earlier`` (newest first); None if a lost step comes first:
        the record before the block's first step is then unknown, as in :meth:`__call__`."""
        for step in earlier:
            p = load(int(step))
            if p.lost_records:
                return None
            found = self._from_record(p)
            if found is not None:
                return found
        return None

    def _check_init(self, p: Patterns) -> None:
        """A lost record before any readable one: the site's first record is lost, its init unknown."""
        if p.lost_records and self.init is None and "init" in self.references:
            self.references = tuple(r for r in self.references if r != "init")
            log.warning("actpat: site %r: its first record may be among the lost ones; the *_init measures are "
                        "left out.", self.site)

    def _from_record(self, p: Patterns) -> _Step | None:
        if self.final is not None and p.step == self.final.patterns.step:
            return self.final
        if p.lost_records:
            _warn_once(
                self.warned, ("lost", self.site, p.step),
                "actpat: site %r step %d: records of it are lost (%d counted: failed verification, never reached the "
                "disk, or the step is incomplete; `Run.losses` says which); the step's measures are left out (its "
                "observations are incomplete)%s.", self.site, p.step,
                p.lost_records, ", and so are the *_final measures, whose reference it is"
                if "final" in self.references and self.final is None and p.step == self._last_step else "",
            )
            return None
        if len(p) == 0:
            _warn_once(
                self.warned, ("empty", self.site), "actpat: site %r has records without observations; skipped.",
                self.site,
            )
            return None
        pc, metrics = _own_metrics(p, self.site, self.warned, n_classes=self.n_classes)
        return _Step(p, pc, metrics)

    def __call__(self, p: Patterns) -> tuple[int, dict] | None:
        self._check_init(p)
        cur = self._from_record(p)
        if p.lost_records:
            self.last = None  # the next step's previous record is this incomplete one: no *_last there
        if cur is None:
            return None
        if self.init is None:
            self.init = cur
        metrics = dict(cur.metrics)
        for name, ref in (("init", self.init), ("last", self.last), ("final", self.final)):
            if name in self.references and ref is not None:
                metrics.update(_similarity_metrics(cur, ref, name, self.threshold, self.site, self.warned))
        self.last = cur
        return int(cur.patterns.epoch), metrics


@dataclass(frozen=True)
class SummaryConsumer:
    """The consumer of :func:`~actpat.analysis.driver.run_pass` behind :func:`summarize`.

    ``references``, ``threshold`` and ``n_classes`` as :func:`summarize`; validated here.
    ``lost_init`` names the sites whose first record may have been lost (set by :meth:`prepare`): they
    get no ``*_init`` measures, since their first readable record is not their first record.
    """

    references: tuple = REFERENCES
    threshold: int = 10
    n_classes: int | None = None
    lost_init: frozenset = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "references", check_references(self.references))
        object.__setattr__(self, "threshold", check_threshold(self.threshold))
        if self.n_classes is not None:
            object.__setattr__(self, "n_classes", check_n_classes(self.n_classes, 0))

    def prepare(self, run: Run, split: str, sites) -> SummaryConsumer:
        """Find the sites whose first record is among the losses known before reading (unreadable or
        missing shards, unwritten rows), and warn about each. Records that fail their checksum when
        read are handled by the pass itself."""
        if "init" not in self.references or not run.losses:
            return self
        lost = set()
        for site in sites:
            losses = run.start_lost(site, split)
            if losses:
                lost.add(site)
                log.warning(
                    "actpat: site %r (%s): its first record may be among the lost ones (%s); the *_init measures "
                    "are left out.",
                    site, split, "; ".join(sorted({loss.reason for loss in losses})),
                )
        return dataclasses.replace(self, lost_init=frozenset(lost)) if lost else self

    def open_block(self, site: str, info: dict, steps: np.ndarray, start: int, load) -> _SiteSummary:
        references = tuple(r for r in self.references if not (r == "init" and site in self.lost_init))
        return _SiteSummary(site, steps, start, load, references, self.threshold, self.n_classes)

    def merge(self, results: list, split: str, infos: dict):
        return tidy_table(results, split, infos)


def summarize(
    run_or_path: Run | str | os.PathLike,
    split: str | None = None,
    references=("init", "last", "final"),
    progress: bool = True,
    n_jobs: int = 1,
    threshold: int = 10,
    *,
    n_classes: int | None = None,
    client=None,
) -> pd.DataFrame:
    """Every measure of every site at every recorded step of ``split``, as a tidy table.

    Parameters
    ----------
    run_or_path : Run or path
        A :class:`~actpat.recorder.reader.Run` or the run directory to open.
    split : str or None, default None
        Which recorded split to summarize (``run.splits`` lists them); None means the run's only split,
        and a run with several splits (e.g. ``"probe"`` and ``"train"``) must name one.
    references : sequence of {"init", "last", "final"}, default all three
        Time points to compare each step with: the first recorded step (``init``), the previous record
        (``last``; absent at the first step) and the last record of the run (``final``).
    progress : bool, default True
        Show a ``tqdm`` progress bar over the records (site and step).
    n_jobs : int, default 1
        Local worker processes; ``-1`` uses every core. Parallel pays from a few seconds of work on
        (the README's benchmark measures the crossover).
    threshold : int, default 10
        ``T`` of the thresholded Jaccard index ``jaccard_t_<r>`` (patterns seen more than T times).
    n_classes : int, optional
        The dataset's class count. Adds ``conditional_entropy_nominal`` and
        ``mutual_information_nominal``, the convention of the reference implementation of Hartmann et
        al. (2021), and is the ``C`` of the normalizers of ``conditional_entropy_normalized`` and
        ``mutual_information_normalized`` (default: the classes present at each step).
    client : distributed.Client or None, default None
        Summarize on a Dask cluster: each block of steps is a task on the workers, the table is merged
        here. The run directory must be readable at the same path on every worker (a shared filesystem);
        see :mod:`actpat.analysis.driver`. The table is identical to the one of a single process.

    Returns
    -------
    pandas.DataFrame
        Columns ``step`` (int), ``epoch`` (int, -1 unknown), ``split`` (str), ``site`` (str),
        ``site_index`` (int), ``metric`` (str), ``value`` (float); one row per number, sites in forward
        order, then steps ascending. Metrics are those of :mod:`actpat.analysis.metrics` (units and
        meanings there; entropies and informations in **bits**): ``n_observations, n_units, entropy,
        entropy_mm, entropy_max, normalized_entropy, distinct, distinct_fraction, top_count, top_mass,
        saturated``; with labels ``label_entropy, joint_entropy, conditional_entropy,
        mutual_information, label_conditional_entropy`` (empirical prior),
        ``conditional_entropy_normalized, mutual_information_normalized`` and, with ``n_classes``,
        ``conditional_entropy_nominal, mutual_information_nominal``; ``firing_rate_mean,
        unit_entropy_mean, dead_units, always_on_units, nan_count``; per reference ``r``:
        ``jaccard_r, jaccard_t_r, weighted_jaccard_r, distinct_change_r`` (``K_t - K_r``),
        ``distinct_change_relative_r`` (``(K_t - K_r) / K_t``) and, only where both steps hold the same
        observations (see Notes), ``identical_fraction_r, hamming_r``.

    Raises
    ------
    ValueError
        If ``split`` was not recorded (or is None in a run with several splits), or an argument is out
        of range.

    Notes
    -----
    Label measures use the observations with a label (``>= 0``), with a warning when some have none;
    they are left out where none has one. ``identical_fraction`` and ``hamming`` compare each
    observation with itself, so they exist only where rows are provably the same observations: the
    rows of both steps that share a recorded (sample id, position) (the k-th occurrence of an id repeated
    in a step pairs with its k-th occurrence in the other), which holds for the callback's
    probe (sample id = index in the fixed probe set) and for recorder runs given ``sample_ids``. They
    are left out, with a warning, where sample ids are unknown (training batches recorded without
    them: row ``i`` of two shuffled batches is not the same input) or no observation is shared. Note
    that equal sample ids mean equal inputs only without random augmentation. ``jaccard_t`` is NaN where
    neither step has a pattern seen more than ``T`` times. Where the run's losses (``run.losses``:
    corrupt or unreadable records) may hold a site's first record, its first readable step is not its
    init: the site gets no ``*_init`` measures, with a warning. Memory holds at most four records of
    one site (current, previous, init and final) per process. To get the information plane and the
    firing rates from the same pass over the shards, use :func:`~actpat.analysis.analyze_run`.

    References
    ----------
    Hartmann, Franzen & Brodehl (2021). Studying the evolution of neural activation patterns during
    training of feed-forward ReLU networks. Frontiers in Artificial Intelligence 4.

    Examples
    --------
    >>> import tempfile
    >>> from actpat.recorder.shards import Record, ShardWriter, SiteMeta
    >>> meta = SiteMeta("fc", 0, "ReLU", (2,), 2, "flat")
    >>> with tempfile.TemporaryDirectory() as out:
    ...     writer = ShardWriter(out)
    ...     writer.start()
    ...     for step, rows in ((0, [[1], [1], [2], [3]]), (1, [[1], [2], [2], [3]])):
    ...         _ = writer.put(Record(meta, step, 0, "probe", np.array(rows, dtype=np.uint8), 1, 4, 0,
    ...                               sample_ids=np.arange(4), labels=np.array([0, 0, 1, 1])))
    ...     writer.close()
    ...     table = summarize(out, progress=False)
    >>> table.set_index(["step", "metric"]).loc[1, "value"][["distinct", "entropy", "hamming_init"]].tolist()
    [3.0, 1.5, 0.25]
    """
    consumers = {"summary": SummaryConsumer(references, threshold, n_classes)}
    result = run_pass(run_or_path, consumers, split, n_jobs=n_jobs, client=client, progress=progress,
                      desc="actpat summarize")
    return result["summary"]
