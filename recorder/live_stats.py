"""Live statistics of each probe, computed by one bounded background worker that never blocks training.

The prober hands each probe's records here; the worker turns them into the reader's public
:class:`~actpat.recorder.observations.Patterns` (one per site) and calls the statistics function it was given
(for example :func:`actpat.analysis.live.live_measures`) with the ``init`` and ``last`` references of
the site, in a child process where it can (:mod:`actpat.recorder.stats_process`: no shared
interpreter lock with training), else on a thread. Results come back, in step order, to the thread
that asks for them.

At most :data:`BACKLOG` probes wait for their statistics. A probe that finds the worker that far behind
gets no live statistics (said once); its patterns are in the shards like every other probe's, and the
probe after it gets no ``last`` comparison, since its previous record was not counted. Waiting for the
statistics still to come (at the end of training, or ``poll(wait=True)``) takes at most
:data:`FINAL_WAIT_SECONDS`: those not done by then are dropped (said once), the statistics process is
ended and no more statistics are computed. A function that runs on a thread instead cannot be ended:
when it never returns, its thread keeps the interpreter from exiting.
"""

from __future__ import annotations

import logging
import pickle
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, NamedTuple, Optional

import numpy as np

from actpat.recorder.observations import Patterns
from actpat.recorder import stats_process
from actpat.recorder.stats_process import StatsFunctionError, StatsProcess, StatsProcessError

if TYPE_CHECKING:  # the statistics process imports this module: no h5py there
    from actpat.recorder.shards import Record

log = logging.getLogger(__name__)

#: Probes that may wait for their statistics before a new probe's statistics are skipped.
BACKLOG = 2
#: Seconds that waiting for the statistics still to come (``results(wait=True)``, ``close(wait=True)``) may take.
FINAL_WAIT_SECONDS = 60.0

#: ``stats(patterns, references) -> (summary, metrics)``: ``references`` maps ``"init"``/``"last"`` to
#: the summaries returned for earlier probes of the same site (where they exist), or to None where this
#: probe is that reference itself (``init`` at the first probe).
StatsFunction = Callable[[Patterns, Mapping[str, Any]], tuple[Any, dict[str, float]]]


class LiveStatsError(RuntimeError):
    """The live statistics of a probe failed; the probe's records are in the shards all the same."""


class LiveStats:
    """Compute ``stats`` of each probe's patterns in the background: in a child process where it can.

    A picklable ``stats`` (a module-level function such as
    :func:`actpat.analysis.live.live_measures`, or a ``functools.partial`` of one) runs in a
    :class:`~actpat.recorder.stats_process.StatsProcess`, which keeps the references and shares no
    interpreter lock with training; any other ``stats`` (a closure, a lambda, a function of the
    ``__main__`` script or notebook), or one whose process cannot start, runs on a background thread of this process, as do the probes that come while the
    process starts (it then continues from their references). One thread hands the probes on in
    either case, so results come in probe order.

    Parameters
    ----------
    stats : StatsFunction
        Called once per site and probe.
    references : dict, optional
        ``{"init" | "last": {site: summary}}`` to start from (a resumed run re-reads them from its shards).
    notify : callable(key, message)
        Reports a fact once per key (here: that the worker fell behind, or runs on a thread).
    """

    def __init__(
        self, stats: StatsFunction, references: Optional[dict[str, dict[str, Any]]], notify: Callable[[str, str], None]
    ) -> None:
        self._stats = stats
        self._references = references or {}  # touched by the worker only, once started
        self._notify = notify
        self._process = self._start_process(stats)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="actpat-live-stats")
        self._pending: list[tuple[int, Future]] = []
        self._gap = False
        self._handed_over = False  # whether the process holds the references (touched by the worker thread only)
        self._given_up = False  # the wait for the last statistics ran out: nothing more is computed

    @property
    def worker_pid(self) -> Optional[int]:
        """The process id of the statistics process; None when they run on a thread of this process."""
        return None if self._process is None else self._process.pid

    def _start_process(self, stats: StatsFunction) -> Optional[StatsProcess]:
        if not stats_process.SUPPORTED:
            return None
        try:
            pickled = pickle.dumps(stats)
        except Exception:  # noqa: BLE001 - any pickling failure: the thread takes any callable
            return None
        if b"__main__" in pickled:  # defined in a script or notebook, which the child cannot import
            return None
        try:
            return StatsProcess(stats)
        except (OSError, StatsProcessError) as exc:
            self._notify(
                "live-stats-thread",
                f"actpat: the live-statistics process could not start ({exc!r}); the statistics run on a thread of "
                "the training process instead, which slows training more.",
            )
            return None

    def submit(self, step: int, epoch: int, split: str, records: list[Record]) -> bool:
        """Queue one probe's records; False (and nothing queued) when :data:`BACKLOG` probes still wait, or
        after the statistics still to come were dropped (see :data:`FINAL_WAIT_SECONDS`)."""
        if self._given_up:
            return False
        if sum(not future.done() for _, future in self._pending) >= BACKLOG:
            self._gap = True
            self._notify(
                "live-stats-behind",
                f"actpat: the live statistics fell {BACKLOG} probes behind, so the probe at step {step} (and any other "
                "that finds the worker this far behind) gets none, and the probe after it no `last` comparison. "
                "Training does not wait; every probe's patterns are in the shards (`actpat analyze` computes all).",
            )
            return False
        use_last, self._gap = not self._gap, False
        self._pending.append((step, self._executor.submit(self._compute, step, epoch, split, records, use_last)))
        return True

    def results(self, wait: bool) -> Iterator[tuple[int, dict[str, dict[str, float]]]]:
        """Yield ``(step, {site: metrics})`` of finished probes in step order (all of them if ``wait``, within
        :data:`FINAL_WAIT_SECONDS`; those not done by then are dropped)."""
        deadline = time.monotonic() + FINAL_WAIT_SECONDS
        while self._pending and (wait or self._pending[0][1].done()):
            step, future = self._pending[0]
            if not wait_futures([future], timeout=max(0.0, deadline - time.monotonic())).done:
                self._give_up()  # not a TimeoutError of the statistics themselves: those are the probe's failure
                return
            self._pending.pop(0)
            try:
                result = future.result()
            except Exception as exc:
                raise LiveStatsError(
                    f"The live statistics of the probe at step {step} failed with {type(exc).__name__}: {exc}"
                ) from exc
            yield step, result

    def close(self, wait: bool) -> None:
        """Stop the worker; without ``wait``, statistics not yet computed are dropped (with ``wait``, those not
        done within :data:`FINAL_WAIT_SECONDS`)."""
        if wait and wait_futures([future for _, future in self._pending], timeout=FINAL_WAIT_SECONDS).not_done:
            self._give_up()
        wait = wait and not self._given_up
        process = self._process  # the worker thread may drop it (a process that never answered)
        if process is not None and not wait:
            process.close(wait=False)  # unblocks a thread waiting for its answer
        self._executor.shutdown(wait=wait, cancel_futures=not wait)
        if process is not None and wait:
            process.close(wait=True)
        self._pending.clear()

    def _give_up(self) -> None:
        """Drop the statistics still to come and end the process, whose answer the worker thread waits for."""
        steps = [step for step, _ in self._pending]
        self._notify(
            "live-stats-late",
            f"actpat: the live statistics of the probes at steps {steps} were not done after a wait of "
            f"{FINAL_WAIT_SECONDS:g} s (`actpat.recorder.live_stats.FINAL_WAIT_SECONDS`) and are dropped; no more live "
            "statistics are computed in this run. The shards hold every probe: `actpat analyze` computes all.",
        )
        self._given_up = True
        for _, future in self._pending:
            future.cancel()  # those still queued: nothing more is computed (on a thread, the one running goes on)
        self._pending.clear()
        process = self._process
        if process is not None:
            process.close(wait=False)

    def _compute(
        self, step: int, epoch: int, split: str, records: list[Record], use_last: bool
    ) -> dict[str, dict[str, float]]:
        rows = probe_rows(records)  # waits for device copies here, not in training
        process = self._process
        if process is not None:
            try:
                if self._handed_over or process.ready():
                    references = None if self._handed_over else self._references
                    metrics = process.compute(rows, (step, epoch, split), use_last, references)
                    self._handed_over = True
                    return metrics
            except StatsFunctionError:
                raise  # the statistics themselves failed, as they would on a thread
            except StatsProcessError as exc:
                self._process = None
                process.close(wait=False)
                if self._given_up:
                    return {}  # ended by _give_up: nobody waits for this probe any more
                if self._handed_over:
                    # Its references died with it: init only if it came from this side, last from the next probe.
                    self._references = {"init": self._references.get("init", {}), "last": {}}
                    use_last = False
                    lost = ("comparisons with the previous probe resume from the next probe; those with init "
                            + ("continue" if self._references["init"] else "are lost for the rest of the run"))
                else:
                    lost = "nothing is lost"
                self._notify(
                    "live-stats-thread",
                    f"actpat: the live-statistics process failed ({exc}); the statistics run on a thread of the "
                    f"training process from here, which slows training more ({lost}).",
                )
        # On this thread: before the process is ready (it imports for a fraction of a second), or without one.
        return probe_statistics(self._stats, self._references, site_patterns(rows, step, epoch, split), use_last)


def probe_statistics(
    stats: StatsFunction, references: dict[str, dict[str, Any]], patterns: dict[str, Patterns], use_last: bool
) -> dict[str, dict[str, float]]:
    """``stats`` of each site of one probe against its references; updates ``references`` for the next probe.

    ``references`` is ``{"init" | "last": {site: summary}}``; the first probe of a fresh run (no ``init``
    yet) is ``init``. ``use_last=False`` after a gap: the previous probe was not counted.
    """
    first = "init" not in references
    init = references.setdefault("init", {})
    last = references.get("last", {}) if use_last else {}
    current, metrics = {}, {}
    for site, site_patterns_ in patterns.items():
        refs = {name: ref[site] for name, ref in (("init", init), ("last", last)) if site in ref}
        if first:
            refs["init"] = None
        current[site], metrics[site] = stats(site_patterns_, refs)
        if first:
            init[site] = current[site]
    references["last"] = current
    return metrics


class ProbeRows(NamedTuple):
    """One record of a probe as the statistics need it: its packed rows, and labels and ids per sample.

    What the statistics process receives: per-row labels, ids and positions (eight bytes each per row,
    where a row's bits take a few) are made there, not pickled.
    """

    site: str
    n_units: int
    bits: np.ndarray
    n_positions: int
    obs_index: Optional[np.ndarray]
    labels: Optional[np.ndarray]
    sample_ids: Optional[np.ndarray]
    nan_count: int


def probe_rows(records: list[Record]) -> list[ProbeRows]:
    """The records of one probe as :class:`ProbeRows` (waits for their device copies first)."""
    rows = []
    for record in records:
        if record.ready is not None:
            record.ready.synchronize()
        rows.append(ProbeRows(
            record.meta.site, record.meta.n_units, np.asarray(record.bits), record.n_positions,
            None if record.obs_index is None else np.asarray(record.obs_index),
            None if record.labels is None else np.asarray(record.labels, dtype=np.int64),
            None if record.sample_ids is None else np.asarray(record.sample_ids, dtype=np.int64),
            int(record.nan_count),
        ))
    return rows


def site_patterns(rows: list[ProbeRows], step: int, epoch: int, split: str) -> dict[str, Patterns]:
    """The records of one probe as one :class:`Patterns` per site, rows in record order (as the reader gives)."""
    parts: dict[str, list[ProbeRows]] = {}
    for part in rows:
        parts.setdefault(part.site, []).append(part)
    return {site: _patterns(site, site_rows, step, epoch, split) for site, site_rows in parts.items()}


def _patterns(site: str, parts: list[ProbeRows], step: int, epoch: int, split: str) -> Patterns:
    bits, labels, ids, positions = [], [], [], []
    for part in parts:
        rows = np.arange(len(part.bits)) if part.obs_index is None else part.obs_index
        sample_row = rows // part.n_positions
        bits.append(part.bits)
        labels.append(_per_row(part.labels, sample_row))
        ids.append(_per_row(part.sample_ids, sample_row))
        positions.append(rows % part.n_positions)
    return Patterns(
        site=site, step=step, epoch=epoch, split=split, n_units=parts[0].n_units, bits=np.concatenate(bits),
        labels=np.concatenate(labels), sample_ids=np.concatenate(ids), positions=np.concatenate(positions),
        nan_count=sum(part.nan_count for part in parts),
    )


def _per_row(per_sample: Optional[np.ndarray], sample_row: np.ndarray) -> np.ndarray:
    if per_sample is None:
        return np.full(len(sample_row), -1, dtype=np.int64)
    return per_sample[sample_row]
