"""Tidy table of every per-site, per-step measure of a recorded run (SPEC sections 3 and 4).

:func:`summarize` reads a run directory with :func:`actpat.recorder.reader.open_run`, counts the
patterns of each site at each recorded step exactly, and returns one row per number in the tidy format
of the contract: columns ``step, epoch, split, site, site_index, metric, value``. The similarity to the
``final`` record is computed here, offline, so no second training run is needed.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from actpat.analysis._validation import NO_LABEL, check_n_classes
from actpat.analysis.counts import PatternCounts
from actpat.analysis.measures import pattern_measures
from actpat.analysis.metrics import REFERENCES
from actpat.analysis.similarity import jaccard, stability, weighted_jaccard
from actpat.analysis.units import unit_stats
from actpat.recorder.reader import Patterns, Run, open_run

__all__ = ["summarize"]

log = logging.getLogger(__name__)

COLUMNS = ("step", "epoch", "split", "site", "site_index", "metric", "value")


@dataclass
class _Step:
    """One step of one site: its observations, exact counts and own measures."""

    patterns: Patterns
    counts: PatternCounts
    metrics: dict


def _check_args(split, references, n_jobs, threshold) -> tuple[str, ...]:
    if split is not None and not isinstance(split, str):
        raise ValueError(f"Expected `split` to be a str or None, but got {split!r}.")
    references = (references,) if isinstance(references, str) else tuple(references)
    unknown = [r for r in references if r not in REFERENCES]
    if unknown:
        raise ValueError(f"Expected `references` to be a subset of {REFERENCES}, but got {unknown}.")
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs == 0 or n_jobs < -1:
        raise ValueError(f"Expected `n_jobs` to be a positive int or -1 (all cores), but got {n_jobs!r}.")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, np.integer)) or threshold < 0:
        raise ValueError(f"Expected `threshold` to be a non-negative int, but got {threshold!r}.")
    return tuple(dict.fromkeys(references))


def _warn_once(warned: set, key, message: str, *args) -> None:
    if key not in warned:
        warned.add(key)
        log.warning(message, *args)


def _own_metrics(p: Patterns, site: str, warned: set, *, n_classes: int | None = None) -> tuple[PatternCounts, dict]:
    """Entropy, label and unit measures of one step."""
    labelled = p.labels != NO_LABEL
    if labelled.any() and not labelled.all():
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


def _row_aligned(a: Patterns, b: Patterns) -> tuple[np.ndarray, np.ndarray] | None:
    """Bits of the observations provably present at both time points, in the same order (None if none).

    Rows are the same observation only by their recorded (sample id, position); the callback's probe
    records the probe-set index as sample id. Without sample ids nothing pairs rows: row ``i`` of two
    shuffled batches are different inputs.
    """
    if (a.sample_ids < 0).any() or (b.sample_ids < 0).any():
        return None
    if len(a) == len(b) and np.array_equal(a.sample_ids, b.sample_ids) and np.array_equal(a.positions, b.positions):
        return a.bits, b.bits  # the same probe rows in the same order
    span = int(max(a.positions.max(initial=0), b.positions.max(initial=0))) + 1
    key_a = a.sample_ids * span + a.positions
    key_b = b.sample_ids * span + b.positions
    if np.unique(key_a).size != key_a.size or np.unique(key_b).size != key_b.size:
        return None
    _, ia, ib = np.intersect1d(key_a, key_b, assume_unique=True, return_indices=True)
    if ia.size == 0:
        return None
    return a.bits[ia], b.bits[ib]


def _similarity_metrics(cur: _Step, ref: _Step, name: str, threshold: int, site: str, warned: set) -> dict:
    m = {
        f"jaccard_{name}": jaccard(cur.counts, ref.counts),
        f"jaccard_t_{name}": jaccard(cur.counts, ref.counts, threshold),
        f"weighted_jaccard_{name}": weighted_jaccard(cur.counts, ref.counts),
    }
    aligned = _row_aligned(cur.patterns, ref.patterns)
    if aligned is None:
        _warn_once(
            warned, ("stability", site, name),
            "actpat: site %r: the observations at step %d and its %r reference are not provably the same inputs "
            "(no shared sample ids); identical_fraction and hamming are left out (record a fixed probe set, or "
            "pass sample_ids to capture()).",
            site, cur.patterns.step, name,
        )
    else:
        s = stability(aligned[0], aligned[1], cur.patterns.n_units, validate_args=False)
        m[f"identical_fraction_{name}"] = s.identical_fraction
        m[f"hamming_{name}"] = s.hamming_per_unit
    m[f"distinct_change_{name}"] = cur.counts.k - ref.counts.k
    m[f"distinct_change_relative_{name}"] = (cur.counts.k - ref.counts.k) / cur.counts.k
    return m


def _summarize_site(
    run: Run, site: str, split: str, references: tuple, threshold: int, tick=None, n_classes: int | None = None
) -> list[tuple]:
    """Rows of one site; ``tick()`` is called after each step."""
    warned: set = set()
    site_index = run.site_info(site)["site_index"]
    steps = [int(s) for s in run.steps(site, split)]
    cache: dict[int, _Step] = {}

    def load(step: int) -> _Step | None:
        if step not in cache:
            p = run.read(site, step, split)
            if len(p) == 0:
                _warn_once(warned, ("empty", site), "actpat: site %r has records without observations; skipped.", site)
                return None
            pc, metrics = _own_metrics(p, site, warned, n_classes=n_classes)
            cache[step] = _Step(p, pc, metrics)
        return cache[step]

    rows: list[tuple] = []
    final = load(steps[-1]) if steps and "final" in references else None
    init = last = None
    for step in steps:
        cur = load(step)
        if cur is None:
            if tick:
                tick()
            continue
        if init is None:
            init = cur
        metrics = dict(cur.metrics)
        for name, ref in (("init", init), ("last", last), ("final", final)):
            if name in references and ref is not None:
                metrics.update(_similarity_metrics(cur, ref, name, threshold, site, warned))
        epoch = int(cur.patterns.epoch)
        rows.extend((step, epoch, split, site, site_index, metric, float(value)) for metric, value in metrics.items())
        # Keep only what later steps may still compare against.
        keep = {id(init), id(cur), id(final)}
        for key in [k for k, v in cache.items() if id(v) not in keep]:
            del cache[key]
        last = cur
        if tick:
            tick()
    return rows


def _summarize_site_in_worker(
    path: str, site: str, split: str, references: tuple, threshold: int, n_classes: int | None
) -> list[tuple]:
    return _summarize_site(open_run(path), site, split, references, threshold, n_classes=n_classes)


def summarize(
    run_or_path,
    split: str | None = None,
    references=("init", "last", "final"),
    progress: bool = True,
    n_jobs: int = 1,
    threshold: int = 10,
    *,
    n_classes: int | None = None,
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
        Show a ``tqdm`` progress bar over the steps.
    n_jobs : int, default 1
        Sites summarized in parallel processes; ``-1`` uses every core.
    threshold : int, default 10
        ``T`` of the thresholded Jaccard index ``jaccard_t_<r>`` (patterns seen more than T times).
    n_classes : int, optional
        The dataset's class count. Adds ``conditional_entropy_nominal`` and
        ``mutual_information_nominal``, the convention of the reference implementation of Hartmann et
        al. (2021), and is the ``C`` of the normalizers of ``conditional_entropy_normalized`` and
        ``mutual_information_normalized`` (default: the classes present at each step).

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
    rows of both steps that share a recorded (sample id, position), which holds for the callback's
    probe (sample id = index in the fixed probe set) and for recorder runs given ``sample_ids``. They
    are left out, with a warning, where sample ids are unknown (training batches recorded without
    them: row ``i`` of two shuffled batches is not the same input) or no observation is shared. Note
    that equal sample ids mean equal inputs only without random augmentation. ``jaccard_t`` is NaN where
    neither step has a pattern seen more than ``T`` times. Memory holds at most four steps of one
    site (current, previous, init and final) per process.

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
    references = _check_args(split, references, n_jobs, threshold)
    if n_classes is not None:
        n_classes = check_n_classes(n_classes, 0)
    run = run_or_path if isinstance(run_or_path, Run) else open_run(run_or_path)
    split = run.resolve_split(split)
    sites = run.sites
    total = sum(len(run.steps(site, split)) for site in sites)
    rows: list[tuple] = []
    with tqdm(total=total, disable=not progress, desc=f"actpat summarize {split}", unit="step") as bar:
        workers = (os.cpu_count() or 1) if n_jobs == -1 else n_jobs
        workers = min(workers, len(sites))
        if workers <= 1:
            for site in sites:
                rows.extend(_summarize_site(
                    run, site, split, references, threshold, tick=lambda: bar.update(1), n_classes=n_classes
                ))
        else:
            by_site: dict[str, list[tuple]] = {}
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
                futures = {
                    pool.submit(
                        _summarize_site_in_worker, str(run.path), site, split, references, threshold, n_classes
                    ): site
                    for site in sites
                }
                for future in as_completed(futures):
                    site = futures[future]
                    by_site[site] = future.result()
                    bar.update(len(run.steps(site, split)))
            for site in sites:
                rows.extend(by_site[site])
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    return table.astype(
        {"step": np.int64, "epoch": np.int64, "split": str, "site": str, "site_index": np.int64, "metric": str,
         "value": np.float64}
    )
