"""Background writer of pattern records into rolling, checksummed, atomically finalized HDF5 shards.

Promises (tested in ``tests/reliability``): a shard is never overwritten (exclusive creation, a lock
per run directory and rank, a finalize that refuses to replace a file); a write error (full disk,
EIO, quota, file size limit) is seen on the block that caused it, the shard is then left unfinalized
and the process never crashes; a finalized shard was flushed, fsynced and renamed, and its directory
fsynced.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno
import functools
import json
import logging
import math
import operator
import os
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from actpat.recorder import schema
from actpat.recorder.fileobj import FileAt
from actpat.recorder.schema import SiteMeta

try:  # POSIX; elsewhere only writers within one process are kept apart
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

log = logging.getLogger(__name__)

_STOP = object()
# Records are buffered per site and written in blocks: each h5py call holds the GIL, and many small
# appends (and flushes) would slow the training thread. A block's fixed cost is about four appends per
# site and two flushes; 16 MiB blocks wrote 1.7x the MB per CPU second of 4 MiB ones (ResNet-20's
# 19 sites), at 12 MiB more memory.
_WRITE_BYTES = 16 << 20
_WRITE_SECONDS = 1.0
# Having emptied its queue, the writer thread waits this long before it takes records again: a wake-up per
# hand-off (per step) cost a small model's step about 100 us per site (the digits CNN's 3.5 ms steps, 2 cores),
# while the records wait to be written for up to _WRITE_SECONDS anyway. A queue filled past half of
# `max_queue_bytes` ends the wait (a small queue would otherwise block or drop while the writer idles).
_HANDOFF_SECONDS = 0.05
# Under on_backpressure="drop", each dropped record of a numbered step is followed by an empty record that leaves
# the gap a reader reports the step by; at most this many wait in the queue (about 1 kB each), beyond which drops go
# unmarked (said once) so that memory stays bounded whatever the rate of drops.
_MAX_QUEUED_MARKERS = 10_000
# Staging buffers for a block's columns are reused across blocks up to this size; larger columns are
# written record by record rather than concatenated.
_STAGING_BYTES = 8 << 20


def _close_at_exit(ref: "weakref.ref[ShardWriter]") -> None:
    writer = ref()
    if writer is None:
        return
    log.warning("actpat: a shard writer for %s was not closed; closing it at exit.", writer.out_dir)
    try:
        writer.close()
    except RecorderError as exc:  # at exit there is no caller left to raise to
        log.error("actpat: %s", exc)


class RecorderError(RuntimeError):
    """Recording failed; the shards finalized so far stay readable."""


@dataclass
class Record:
    """One recorded call of one site, as handed from a hook to the writer.

    Array fields are numpy arrays (or CPU tensors) of host memory, on CUDA still being filled by a non-blocking
    device copy; ``ready`` (a CUDA event, or None) is waited on by the writer thread, never by the hook. Until the
    hand-off, a hook's record may hold device tensors instead, computed on ``stream``: the recorder
    copies those of a whole capture to the host at once (:func:`actpat.recorder.recorder.to_host`).
    ``part`` numbers a site's records of one step and split (from 0) and ``ends_step`` marks the last of
    them, so that a reader can tell a step cut short; -1 (the default) writes the record untracked.
    ``marks_a_drop``: an empty record the writer queued in place of a dropped one (not counted as written).
    """

    meta: SiteMeta
    step: int
    epoch: int
    split: str
    bits: Any
    n_positions: int
    n_samples: int
    nan_count: Any
    sample_ids: Any = None
    labels: Any = None
    obs_index: Any = None
    values: Any = None
    ready: Any = None
    stream: Any = None
    part: int = -1
    ends_step: bool = False
    marks_a_drop: bool = False
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        arrays = (self.bits, self.sample_ids, self.labels, self.obs_index, self.values)
        self.nbytes = sum(_nbytes(a) for a in arrays)

    @classmethod
    def empty(cls, meta: SiteMeta, step: int, epoch: int, split: str, part: int, *, ends_step: bool,
              n_positions: int = 1, marks_a_drop: bool = False) -> "Record":
        """A record of no rows: it numbers a part of a step, to end the step or mark a dropped record's place."""
        return cls(meta, step, epoch, split, np.zeros((0, meta.n_bytes), np.uint8), n_positions, 0, 0, part=part,
                   ends_step=ends_step, marks_a_drop=marks_a_drop)


def _dropped_marker(record: Record) -> Record:
    """The empty record queued in place of dropped ``record``: numbered after it, ending its step as it would have."""
    return Record.empty(record.meta, record.step, record.epoch, record.split, record.part + 1,
                        ends_step=record.ends_step, n_positions=record.n_positions, marks_a_drop=True)


def _pwrite_whole(fd: int, data: bytes) -> None:
    """Write ``data`` at the start of ``fd``; a short write (a disk that filled part way) raises ENOSPC."""
    if os.pwrite(fd, data, 0) != len(data):
        raise OSError(errno.ENOSPC, "short write (no space left on device?)")


def _nbytes(array: Any) -> int:
    if array is None:
        return 0
    if isinstance(array, np.ndarray):
        return array.nbytes
    return array.numel() * array.element_size()


def _to_numpy(array: Any, dtype: np.dtype) -> np.ndarray | None:
    if array is None:
        return None
    if not isinstance(array, np.ndarray):
        array = array.numpy()
    return np.ascontiguousarray(array, dtype=dtype)


class ShardWriter:
    """Write :class:`Record` objects from a bounded queue on a background thread.

    Parameters
    ----------
    out_dir : path
        Run directory; created if missing. Shards already there are kept and numbering continues.
    rank : int
        Process rank, part of every shard's file name. One live writer per directory and rank: a second
        one gets a :class:`RecorderError` from :meth:`start` naming the process that holds the lock.
    compression : None or str, default None
        Codec of the data columns (:data:`~actpat.recorder.schema.CODECS`): None (fastest, read by
        plain h5py), ``"lzf"``, ``"gzip"``, or with the ``codecs`` extra ``"lz4"``, ``"zstd"``,
        ``"blosc-lz4"``, ``"blosc-zstd"`` (``bench/writer_codecs.py`` measures them).
    max_queue_bytes : int
        Bound on the bytes of records waiting to be written.
    on_backpressure : {"block", "drop"}
        When the queue is full: ``block`` waits for the writer, ``drop`` discards the whole record and
        counts it (shard attribute ``dropped_records`` and one warning).
    max_shard_bytes : int
        A shard is finalized and a new one started once this many bytes were written into it.
    max_shard_seconds : float
        A shard is also finalized once it has been open this long, even while no record arrives. HDF5
        promises nothing about a file whose writer was killed mid-write, so this bounds what a crash
        can lose to the records of the last ``max_shard_seconds`` (the reader still reads every record
        of an unfinalized shard that verifies).

    Notes
    -----
    Memory: records waiting in the queue (at most ``max_queue_bytes``, or one record larger than that),
    the block being written (at most ``16 MiB`` plus one record), one staging buffer that every column
    shares, reused across blocks (at most ``8 MiB``), and HDF5's caches (one ``64 KiB`` chunk per open
    dataset, at most five per site, and up to ``4 MiB`` of file metadata): ``max_queue_bytes + 28 MiB +
    320 KiB`` per site in all, plus
    the largest record. ``bench/writer_rss.py`` measures the resident memory under ``block``
    backpressure against this bound.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        rank: int = 0,
        compression: str | None = None,
        max_queue_bytes: int = 256 << 20,
        on_backpressure: str = "block",
        max_shard_bytes: int = 1 << 30,
        max_shard_seconds: float = 60.0,
    ) -> None:
        self._codec = schema.codec_options(compression)  # an unknown or uninstalled codec fails here
        if on_backpressure not in ("block", "drop"):
            raise ValueError(f"Expected `on_backpressure` to be 'block' or 'drop', but got {on_backpressure!r}.")
        if max_queue_bytes < 1:
            raise ValueError(f"Expected `max_queue_bytes` to be at least 1, but got {max_queue_bytes}.")
        if max_shard_bytes < 1:
            raise ValueError(f"Expected `max_shard_bytes` to be at least 1, but got {max_shard_bytes}.")
        if not max_shard_seconds > 0:
            raise ValueError(f"Expected `max_shard_seconds` to be positive, but got {max_shard_seconds}.")
        if int(rank) < 0:
            raise ValueError(f"Expected `rank` to be at least 0, but got {rank}.")
        self.out_dir = Path(out_dir)
        self.rank = int(rank)
        self.compression = compression
        self.max_queue_bytes = int(max_queue_bytes)
        self.on_backpressure = on_backpressure
        self.max_shard_bytes = int(max_shard_bytes)
        self.max_shard_seconds = float(max_shard_seconds)
        self.dropped_records = 0
        self.written_records = 0
        self.finalized: list[Path] = []
        #: Keys of the warnings given about this run and rank, by any recorder sharing this writer (a model's
        #: and its probe copy's): a warning about a site is given once per run, not once per recorder.
        self.warned: set[str] = set()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._queued_bytes = 0
        self._queued_markers = 0  # empty records queued in place of dropped ones (their bound: _MAX_QUEUED_MARKERS)
        self._space = threading.Condition()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._finished, self._stopping = threading.Event(), False  # the thread's end; a stop was queued
        self._wake = threading.Event()  # ends the writer thread's wait between hand-offs (a filling queue, close)
        self._closing = threading.Lock()
        self._lock: _RunLock | None = None
        self._shard: _Shard | None = None
        self._file_dropped = 0
        self._sites: dict[str, SiteMeta] = {}
        self._sites_lock = threading.Lock()
        self._stops: list[str] = []  # reasons waiting for the next finalized shard
        self._stop_lock = threading.Lock()
        self._held: list[list[Record]] | None = None  # records handed over while held (see hold())
        self._stop_file: Path | None = None
        self._marks: dict[str, int] = {}  # split -> last step queued in this session
        self._site_marks: dict[tuple[str, str], int] = {}  # (site, split) -> last step queued, stored at close
        self._marks_fd: int | None = None
        self._splits_seen: set[str] = set()
        self._io_failed = False
        self._pending: dict[str, list[_Buffered]] = {}
        #: Last step of each split this rank had recorded in ``out_dir`` before :meth:`start` (a run
        #: continued into the same directory), for recorders to refuse steps that would be pooled with it.
        self.recorded_before: dict[str, int] = {}
        self._sites_on_disk: dict[str, tuple[int, str, str]] = {}  # site -> (n_units, pattern, shard)
        self._pending_bytes = 0
        self._pending_since = 0.0
        self._next_index = 0
        self._staging = np.empty(0, dtype=np.uint8)

    # ------------------------------------------------------------------ producer side
    def start(self) -> None:
        """Take the run directory's lock for this rank and start the writer thread.

        Raises
        ------
        RecorderError
            Another live writer (in this or another process) holds the lock of this directory and rank.
        """
        if self._thread is not None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._lock = _RunLock.acquire(self.out_dir, self.rank)
        try:
            self._error = None
            self._io_failed = False
            self._stop_file = None
            self._next_index = self._first_free_index()
            self._open_marks()
            self.recorded_before, self._sites_on_disk = scan_existing(self.out_dir, self.rank)
            # Nothing an interrupted close left behind.
            self._queue, self._queued_bytes, self._queued_markers = queue.SimpleQueue(), 0, 0
            self._finished, self._stopping = threading.Event(), False
            self._wake = threading.Event()
            thread = threading.Thread(target=self._run, name="actpat-shard-writer", daemon=True)
            thread.start()
        except BaseException:  # no writer: nothing may hold the lock
            self._close_marks(closed=True)
            self._lock.release()
            self._lock = None
            raise
        self._thread = thread
        # A writer never closed would be stopped mid-write by the interpreter's exit (h5py then crashes
        # or hangs): close it at exit instead, which finalizes what was recorded.
        self._at_exit = functools.partial(_close_at_exit, weakref.ref(self))
        atexit.register(self._at_exit)

    def put(self, record: Record) -> bool:
        """Queue a record; returns False if it was dropped under backpressure.

        Raises
        ------
        RecorderError
            The writer failed earlier, or is not running.
        ValueError
            Another recorder sharing this writer described the same site differently (see
            :meth:`register_site`), the record's ``split`` is longer than 32 bytes (UTF-8), or its ``step``
            is negative.
        TypeError
            The record's ``step`` is not an integer (numpy integers are taken as ints).
        """
        return self.put_many([record]) == 1

    def put_many(self, records: list[Record]) -> int:
        """Queue records as one item (one wake-up of the writer thread); returns how many were queued.

        Under ``on_backpressure="drop"`` the records that do not fit are dropped, each counted. Raises
        as :meth:`put` does.
        """
        self.raise_if_failed()
        if self._thread is None or self._stopping:
            raise RecorderError("The shard writer is not running (or closing): call `start()` (or enter the recorder) "
                                "first, or `close()` again after an interrupted close.")
        for record in records:
            self.register_site(record.meta)
            self._check_step_and_split(record)
        if self._held is not None:
            self._held.append(list(records))
            return len(records)
        self._mark(records)
        batch: list[Record] = []
        n_queued = 0
        with self._space:
            for record in records:
                # A record larger than the whole budget still passes once the queue is empty; an empty one (a step's
                # end, a drop's marker) costs no memory and always passes.
                while record.nbytes and self._queued_bytes and self._queued_bytes + record.nbytes > self.max_queue_bytes:
                    self._wake.set()
                    if self.on_backpressure == "drop":
                        break
                    if batch:  # the writer can only free what is in the queue
                        self._queue.put(batch)
                        batch = []
                    self._space.wait(timeout=1.0)
                    self.raise_if_failed()
                else:
                    self._queued_bytes += record.nbytes
                    batch.append(record)
                    n_queued += 1
                    continue
                self._count_drop()
                if record.part >= 0 and self._queued_markers < _MAX_QUEUED_MARKERS:
                    # An empty record numbered after the dropped one: the gap it leaves in the step's parts is what a
                    # reader reports the step by (otherwise a step's only record, dropped, leaves no trace, and in a
                    # data-parallel run the other ranks' rows would read as the whole step).
                    self._queued_markers += 1
                    batch.append(_dropped_marker(record))
                elif record.part >= 0 and "unmarked drops" not in self.warned:
                    self.warned.add("unmarked drops")
                    log.warning("actpat: %d markers of dropped records are waiting to be written; further drops are "
                                "counted but not marked, so a reader may read such a step as whole.", _MAX_QUEUED_MARKERS)
            if batch:
                self._queue.put(batch)
            if 2 * self._queued_bytes > self.max_queue_bytes:
                self._wake.set()
        return n_queued

    def hold(self) -> None:
        """Keep the records handed over from now on in memory, neither queued nor marked as queued, until
        :meth:`release` queues them or :meth:`discard_held` drops them (:meth:`close` releases them): the records
        of a fit until its first training batch is done, so that a fit failing before (a setup mistake) leaves
        ``out_dir`` as it was."""
        if self._held is None:
            self._held = []

    def release(self) -> None:
        """Queue the records held since :meth:`hold`, in the order they were handed over, and stop holding."""
        held, self._held = self._held, None
        for records in held or ():
            self.put_many(records)

    def discard_held(self) -> int:
        """Drop the records held since :meth:`hold` and stop holding; returns how many were dropped."""
        held, self._held = self._held, None
        return sum(map(len, held or ()))

    def _check_step_and_split(self, record: Record) -> None:
        if record.split not in self._splits_seen:
            schema.check_split(record.split, "a record's `split`")
            self._splits_seen.add(record.split)
        if type(record.step) is not int:
            try:
                if isinstance(record.step, bool):
                    raise TypeError
                record.step = operator.index(record.step)  # a numpy integer, say
            except TypeError:
                raise TypeError(f"Expected a record's `step` to be an integer, but got {record.step!r}.") from None
        if record.step < 0:
            raise ValueError(f"Expected a record's `step` to be at least 0, but got {record.step}: count steps from 0.")

    def register_site(self, meta: SiteMeta) -> SiteMeta:
        """Check ``meta`` against what this writer already records under the same site name.

        A site is identified by its name within a run: the shards already in ``out_dir`` when the writer
        started fix its ``n_units`` and ``pattern``. Recorders sharing a writer (a model and its
        probe copy) must agree on a site's ``n_units`` and ``pattern``, and on ``value_units`` where both
        store values; records without values may be mixed with records with values. The first
        description of a site (its ``site_index``, ``module_type``, ``shape``) is written in every shard.

        Returns
        -------
        SiteMeta
            The site as the shards describe it.
        """
        on_disk = self._sites_on_disk.get(meta.site)
        if on_disk is not None and on_disk[:2] != (meta.n_units, meta.pattern):
            raise ValueError(
                f"Expected site {meta.site!r} to be recorded as the shards already in {self.out_dir} describe it, "
                f"with {on_disk[0]} units ({on_disk[1]!r} patterns, {on_disk[2]}), but got {meta.n_units} units "
                f"({meta.pattern!r} patterns): the directory would no longer open as one run. Record into a new "
                "`out_dir`."
            )
        with self._sites_lock:
            known = self._sites.get(meta.site)
            if known is None or known is meta:
                self._sites[meta.site] = known = known or meta
                return known
            if (known.n_units, known.pattern) != (meta.n_units, meta.pattern):
                raise ValueError(
                    f"Expected every recorder writing {self.out_dir} (rank {self.rank}) to describe site "
                    f"{meta.site!r} alike, but one records {known.n_units} units ({known.pattern!r} patterns) and "
                    f"another {meta.n_units} ({meta.pattern!r}): two models with the same site names share one "
                    "writer. Record them into separate `out_dir`s, or select distinct sites with `sites=`."
                )
            if meta.value_units is not None and known.value_units != meta.value_units:
                if known.value_units is not None:
                    raise ValueError(
                        f"Expected every recorder writing {self.out_dir} (rank {self.rank}) to store the values "
                        f"of the same units of site {meta.site!r}, but one stores {list(known.value_units)} and "
                        f"another {list(meta.value_units)}. Give both the same `store_values` and `seed`, or "
                        "separate `out_dir`s."
                    )
                self._sites[meta.site] = known = dataclasses.replace(known, value_units=meta.value_units)
            return known

    def record_stop(self, reason: str) -> None:
        """Store in the run why recording stopped before the end (best effort; never raises).

        While the writer is healthy the reason goes into the ``stop_reason`` attribute of the shard it
        finalizes next (at :meth:`close` at the latest). After a write failure, or once closed, it goes
        into a small side file ``patterns-rank{RANK}-{INDEX}.stop.txt`` (one JSON string per line);
        the writer records its own failures there itself. :attr:`actpat.recorder.Run.stop_reasons`
        reads both.
        """
        reason = str(reason)
        with self._stop_lock:
            if self._thread is not None and self._error is None:
                self._stops.append(reason)
                return
        self._write_stop_file([reason])

    def close(self) -> None:
        """Write everything queued, finalize the open shard, stop the thread and release the lock.

        Interrupted (Ctrl-C), the writer goes on writing and keeps the lock: call it again to wait for the end."""
        if self._thread is None:
            return
        if self._held is not None and not self._stopping:
            with contextlib.suppress(RecorderError):  # a failed writer: raised below, as at any close
                self.release()
        if not self._stopping:
            self._queue.put(_STOP)
            self._stopping = True
            self._wake.set()
        # Its own event, not join(): a join that Ctrl-C interrupted returns at once when called again (CPython
        # 3.11), the thread still writing, and the lock would be released under it.
        self._finished.wait()
        with self._closing:  # one caller releases (close() from two threads at once)
            if self._thread is None:
                return
            self._thread.join()
            self._thread = None
            atexit.unregister(self._at_exit)
            try:
                self._close_marks(closed=self._error is None)
            finally:
                if self._lock is not None:
                    self._lock.release()
                    self._lock = None
        self.raise_if_failed()

    def raise_if_failed(self) -> None:
        """Re-raise, in the caller's thread, an error the writer thread met."""
        if self._error is not None:
            raise RecorderError(
                f"Writing activation patterns to {self.out_dir} failed: {self._error}. Recording stopped; the "
                f"{len(self.finalized)} shard(s) finalized before stay readable, and so do the records of the "
                "unfinalized one that reached the disk before the error (`actpat info` lists what was lost)."
            ) from self._error

    @property
    def queued_bytes(self) -> int:
        """Bytes of records waiting to be written."""
        return self._queued_bytes

    def _count_drop(self) -> None:
        self.dropped_records += 1
        self._file_dropped += 1
        if self.dropped_records == 1:
            log.warning(
                "actpat: the shard writer cannot keep up; records are being dropped (on_backpressure='drop'). "
                "The count is stored in each shard's `dropped_records` attribute. Record less often, "
                "set `max_observations`, or raise `max_queue_bytes`."
            )

    # ------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        try:
            while True:
                try:
                    records = self._queue.get(timeout=self._seconds_to_next_deadline())
                except queue.Empty:
                    self._meet_deadlines()
                    continue
                if records is _STOP:
                    break
                for record in records:
                    try:
                        if self._error is None:
                            self._buffer(record)
                    finally:
                        with self._space:
                            self._queued_bytes -= record.nbytes
                            self._queued_markers -= record.marks_a_drop
                            self._space.notify_all()
                    self._meet_deadlines()
                if self._queue.empty():
                    self._wake.wait(_HANDOFF_SECONDS)  # the hand-offs meanwhile wake no one
                    self._wake.clear()  # (a wake-up lost here only ends a wait that get() would not begin)
        except BaseException as exc:  # noqa: BLE001 - handed to the producer thread
            with self._stop_lock:
                self._error = exc
                if not self._io_failed:  # the shard is sound: its finalize carries the reason
                    self._stops.append(f"the shard writer failed: {exc!r}")
            self._drain()
        finally:
            try:
                self._end()
            finally:
                self._finished.set()  # close() waits for this, whatever happened

    def _end(self) -> None:
        """Finalize the open shard (or one that carries drops and stop reasons); else store the reasons in a stop file."""
        try:
            if self._shard is None and (self._file_dropped or self._stops) and not self._io_failed:
                self._open()  # an empty shard that only carries the last drop count or stop reason
            if self._shard is not None:
                self._finalize()
        except BaseException as exc:  # noqa: BLE001
            with self._stop_lock:
                self._error = self._error or exc
        with self._stop_lock:
            stops, self._stops = self._stops, []
        if stops:  # not written into a shard: the last one failed
            self._write_stop_file(stops)

    def _seconds_to_next_deadline(self) -> float | None:
        deadlines = []
        if self._shard is not None:
            deadlines.append(self._shard.opened + self.max_shard_seconds)
        if self._pending:
            deadlines.append(self._pending_since + _WRITE_SECONDS)
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _meet_deadlines(self) -> None:
        now = time.monotonic()
        if self._pending and (self._pending_bytes >= _WRITE_BYTES or now >= self._pending_since + _WRITE_SECONDS):
            self._write_pending()
        shard = self._shard
        if shard is not None and (shard.bytes >= self.max_shard_bytes or now >= shard.opened + self.max_shard_seconds):
            self._finalize()

    def _drain(self) -> None:
        # After a failure, keep emptying the queue so producers never wait on a dead writer.
        while True:
            records = self._queue.get()
            if records is _STOP:
                return
            with self._space:
                self._queued_bytes -= sum(record.nbytes for record in records)
                self._queued_markers -= sum(record.marks_a_drop for record in records)
                self._space.notify_all()

    @property
    def _marks_path(self) -> Path:
        return self.out_dir / schema.marks_name(self.rank, self._marks_index)

    def _open_marks(self) -> None:
        """Start this session's marks file (:func:`actpat.recorder.schema.marks_name`), named by its first shard."""
        self._marks, self._site_marks, self._marks_index = {}, {}, self._next_index
        path = self._marks_path
        try:
            self._marks_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            self._marks_fd = None
            log.warning("actpat: could not create %s (%s); a reader cannot tell which steps of this rank a "
                        "crash would lose.", path, exc)
            return
        try:
            _pwrite_whole(self._marks_fd, schema.marks_text({}, closed=False))
        except OSError as exc:  # a file cut short would read as damaged: it goes
            log.warning("actpat: could not write %s (%s); removing it: a reader cannot tell which steps of this "
                        "rank a crash would lose.", path, exc)
            self._drop_marks(remove=True)

    def _mark(self, records: list[Record]) -> None:
        """Store the last step of each split queued, before the records can reach the disk: after a kill, a
        reader knows which steps this rank had recorded that never did."""
        changed = False
        for record in records:
            key, step = (record.meta.site, record.split), record.step
            if step > self._site_marks.get(key, -1):
                self._site_marks[key] = step
            if step > self._marks.get(record.split, -1):
                self._marks[record.split] = step
                changed = True
        if changed and self._marks_fd is not None:
            self._write_marks(closed=False)

    def _write_marks(self, closed: bool) -> None:
        try:
            if closed:
                self._write_closing_marks()
            else:
                _pwrite_whole(self._marks_fd, schema.marks_text(self._marks, closed))
        except OSError as exc:  # never a reason to stop training
            # A stale mark would bound a crash's losses too early: without the file, a reader checks this rank
            # by what its shards say, as for runs without marks.
            log.warning("actpat: could not update this rank's marks file (%s); removing it.", exc)
            self._drop_marks(remove=True)

    def _write_closing_marks(self) -> None:
        """The closed session's marks with its last step per site (a last shard lost later that held only some
        sites' records of a step shows there), or without them where the disk has no room for a longer file.

        Marks longer than the file's padding go into a new file that replaces it, whole: written in place, a reader
        could read them cut short, part written (then taken as damaged)."""
        text = schema.marks_text(self._marks, True, self._site_marks)
        if len(text) > schema.MARKS_BYTES:
            if self._replace_marks(text):
                return
            text = schema.marks_text(self._marks, True)
        _pwrite_whole(self._marks_fd, text)
        os.ftruncate(self._marks_fd, len(text))

    def _replace_marks(self, text: bytes) -> bool:
        """Replace this session's marks file by one holding ``text``; False (nothing changed) where that fails."""
        path = self._marks_path
        new = path.with_name(path.name + ".new")
        try:
            fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _pwrite_whole(fd, text)
            finally:
                os.close(fd)
            os.replace(new, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(new)
            return False
        return True

    def _drop_marks(self, remove: bool) -> None:
        """Close this session's marks file, and remove it where ``remove``; an error closing it (a network file
        system's failed write-back) removes it too, with a warning: never a reason to stop training."""
        fd, self._marks_fd = self._marks_fd, None
        try:
            os.close(fd)
        except OSError as exc:
            if not remove:
                log.warning("actpat: closing this rank's marks file failed (%s); removing it.", exc)
                remove = True
        if remove:
            with contextlib.suppress(OSError):
                os.unlink(self._marks_path)

    def _close_marks(self, closed: bool) -> None:
        if self._marks_fd is None:
            return
        if closed and not self._marks:  # a session that queued nothing leaves nothing behind
            self._drop_marks(remove=True)
            return
        self._write_marks(closed)
        if self._marks_fd is not None:
            self._drop_marks(remove=False)

    def _first_free_index(self) -> int:
        taken = [-1]
        for name in os.listdir(self.out_dir):
            parsed = schema.parse_shard_name(name) or schema.parse_stop_name(name) or schema.parse_marks_name(name)
            if parsed is not None and parsed[0] == self.rank:
                taken.append(parsed[1])
        return max(taken) + 1

    def _open(self) -> None:
        while True:
            index = self._next_index
            self._next_index += 1
            final = self.out_dir / schema.shard_name(self.rank, index)
            if final.exists():
                continue
            partial = self.out_dir / schema.shard_name(self.rank, index, partial=True)
            try:
                shard = _Shard.create(partial, index)
            except FileExistsError:
                continue
            except BaseException as exc:
                self._io_failed = True
                self._stop_file = self.out_dir / schema.stop_name(self.rank, index)
                self._write_stop_file([f"creating {partial.name} failed: {exc}"])
                raise
            break
        try:
            handle = shard.handle
            handle.attrs["format"] = schema.FORMAT_NAME
            handle.attrs["format_version"] = schema.FORMAT_VERSION
            handle.attrs["rank"] = self.rank
            handle.attrs["shard_index"] = index
            handle.attrs["finalized"] = False
            handle.attrs["dropped_records"] = 0
            handle.attrs["compression"] = self.compression or "none"
            handle.create_group(schema.SITES_GROUP)
            shard.check("creating")
        except BaseException as exc:
            self._abandon(shard, exc)
            raise
        self._shard = shard

    def _finalize(self) -> None:
        shard = self._shard
        if shard is None:
            return
        self._write_pending()
        # Drops are counted by producers, possibly while no shard is open: each shard takes the drops
        # since the previous one was finalized, so that the shards' sum is the writer's total.
        with self._space:
            dropped, self._file_dropped = self._file_dropped, 0
        with self._stop_lock:
            stops, self._stops = self._stops, []
        try:
            shard.handle.attrs["dropped_records"] = dropped
            if stops:
                shard.handle.attrs["stop_reason"] = "\n".join(stops)
            shard.handle.attrs["finalized"] = True
            final = shard.finish()
        except BaseException as exc:
            with self._space:
                self._file_dropped += dropped
            with self._stop_lock:
                self._stops[:0] = stops
            self._abandon(shard, exc)
            raise
        self._shard = None
        self.finalized.append(final)

    def _abandon(self, shard: _Shard, exc: BaseException) -> None:
        """Leave a shard whose file failed unfinalized (``.partial``), and say why in a stop file."""
        self._shard = None
        self._io_failed = True
        self._pending.clear()
        self._pending_bytes = 0
        shard.abort()
        self._stop_file = self.out_dir / schema.stop_name(self.rank, shard.index)
        self._write_stop_file([f"writing {shard.path.name} failed: {exc}"])

    def _write_stop_file(self, reasons: list[str]) -> None:
        """Store why recording stopped in this session's stop file; never raises (the reasons are logged instead)."""
        path = self._stop_file
        try:
            if path is None:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                index = max(self._next_index, self._first_free_index())
                self._next_index = index + 1
                path = self._stop_file = self.out_dir / schema.stop_name(self.rank, index)
            with open(path, "a", encoding="utf-8") as handle:
                handle.writelines(json.dumps(reason) + "\n" for reason in reasons)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            log.warning("actpat: could not store why recording stopped (%s) in %s: %s", "; ".join(reasons), path, exc)

    def _buffer(self, record: Record) -> None:
        if record.ready is not None:
            record.ready.synchronize()
        n_samples = record.n_samples
        sample_ids = _to_numpy(record.sample_ids, np.int64)
        labels = _to_numpy(record.labels, np.int64)
        buffered = _Buffered(
            record=record,
            bits=_to_numpy(record.bits, np.uint8),
            sample_ids=np.full(n_samples, -1, dtype=np.int64) if sample_ids is None else sample_ids,
            labels=np.full(n_samples, -1, dtype=np.int64) if labels is None else labels,
            obs_index=_to_numpy(record.obs_index, np.int64),
            values=_to_numpy(record.values, np.float16),
            nan_count=int(record.nan_count if isinstance(record.nan_count, int) else record.nan_count.item()),
        )
        if self._shard is None:
            self._open()
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending.setdefault(record.meta.site, []).append(buffered)
        self._pending_bytes += record.nbytes
        self._shard.bytes += record.nbytes

    def _write_pending(self) -> None:
        if not self._pending:
            return
        shard = self._shard
        try:
            blocks = [self._write_site_data(shard, items) for items in self._pending.values()]
            # Two flushes: a record row reaches the file only after all its data did, so a process
            # killed at any point leaves no row pointing at data that was never written.
            shard.flush("writing a block of patterns")
            for records, entries in blocks:
                records.append(entries)
            shard.flush("writing a block of records")
        except BaseException as exc:
            self._abandon(shard, exc)
            raise
        self.written_records += sum(not item.record.marks_a_drop for items in self._pending.values() for item in items)
        self._pending.clear()
        self._pending_bytes = 0

    def _write_site_data(self, shard: _Shard, items: list[_Buffered]) -> tuple[_Column, np.ndarray]:
        """Append one site's block of data columns; returns its records table and the rows to append."""
        meta = self._sites[items[0].record.meta.site]
        columns = {
            schema.BITS: [item.bits for item in items],
            schema.SAMPLE_IDS: [item.sample_ids for item in items],
            schema.LABELS: [item.labels for item in items],
            schema.OBS_INDEX: [item.obs_index for item in items if item.obs_index is not None],
            schema.VALUES: [item.values for item in items if item.values is not None],
        }
        # Optional columns are created by the first record that carries them, in every shard.
        targets = {name: shard.column(meta, name, self._codec) for name, parts in columns.items()
                   if parts or name not in schema.OPTIONAL_COLUMNS}  # fmt: skip
        for name, target in targets.items():
            if any(len(part) for part in columns[name]):  # a column that gets no row keeps its place
                target.begin_block()
        row, sample, obs, value = (
            targets[name].next_row if name in targets else 0
            for name in (schema.BITS, schema.SAMPLE_IDS, schema.OBS_INDEX, schema.VALUES)
        )
        records = [item.record for item in items]
        rows = [len(item.bits) for item in items]
        samples = [rec.n_samples for rec in records]
        has_obs = [item.obs_index is not None for item in items]
        has_values = [item.values is not None for item in items]
        # From each array's own length: a record whose arrays disagree fails its own checksum only.
        obs_rows = [len(item.obs_index) if present else 0 for item, present in zip(items, has_obs)]
        value_rows = [len(item.values) if present else 0 for item, present in zip(items, has_values)]
        entries = np.zeros(len(items), dtype=schema.RECORD_DTYPE)
        entries["step"] = [rec.step for rec in records]
        entries["epoch"] = [rec.epoch for rec in records]
        entries["split"] = [rec.split.encode() for rec in records]
        entries["row_start"], entries["row_count"] = _starts(row, rows), rows
        entries["sample_start"], entries["sample_count"] = _starts(sample, samples), samples
        entries["obs_start"] = _starts(obs, obs_rows, has_obs)
        entries["value_start"] = _starts(value, value_rows, has_values)
        entries["n_positions"] = [rec.n_positions for rec in records]
        entries["nan_count"] = [item.nan_count for item in items]
        entries["part"] = [rec.part for rec in records]
        entries["ends_step"] = [rec.ends_step for rec in records]
        row_crcs = schema.row_crcs(
            entries,
            schema.site_header(meta.site, meta.pattern, meta.n_units, None),
            schema.site_header(meta.site, meta.pattern, meta.n_units, meta.value_units) if any(has_values) else None,
        )
        entries["row_crc32"] = row_crcs
        entries["crc32"] = [
            schema.record_crc(row_crc, [item.bits, item.sample_ids, item.labels]
                              + [a for a in (item.obs_index, item.values) if a is not None])  # fmt: skip
            for row_crc, item in zip(row_crcs.tolist(), items)
        ]
        for name, target in targets.items():
            self._append_parts(target, columns[name])
        return shard.column(meta, schema.RECORDS, self._codec), entries

    def _append_parts(self, target: _Column, parts: list[np.ndarray]) -> None:
        first = parts[0]
        total = sum(len(part) for part in parts)
        nbytes = total * first.dtype.itemsize * math.prod(first.shape[1:])
        if len(parts) == 1 or nbytes > _STAGING_BYTES:
            for part in parts:
                target.append(part)
            return
        # Concatenated in one byte buffer that every column shares and that is kept across blocks: no
        # fresh multi-megabyte allocation per block, and at most _STAGING_BYTES of staging in all.
        if self._staging.size < nbytes:
            self._staging = np.empty(max(nbytes, 1 << 16), dtype=np.uint8)
        staged = self._staging[:nbytes].view(first.dtype).reshape((total, *first.shape[1:]))
        np.concatenate(parts, out=staged)
        target.append(staged)


class _Shard:
    """One shard file being written through a :class:`_GuardedFile`, and its open datasets."""

    def __init__(self, path: Path, index: int, guarded: _GuardedFile, handle: h5py.File) -> None:
        self.path, self.index, self.guarded, self.handle = path, index, guarded, handle
        self.opened = time.monotonic()
        self.bytes = 0
        self._columns: dict[tuple[str, str], _Column] = {}

    @classmethod
    def create(cls, path: Path, index: int) -> _Shard:
        guarded = _GuardedFile(path)  # O_EXCL: FileExistsError if the name is taken
        try:
            # One chunk per dataset cached: appends fill the open chunk in memory, never re-read it.
            handle = h5py.File(guarded, "w", libver=schema.LIBVER, rdcc_nbytes=schema.CHUNK_BYTES + 4096)
        except BaseException:
            guarded.abort()
            raise
        return cls(path, index, guarded, handle)

    def column(self, meta: SiteMeta, name: str, codec: dict[str, Any]) -> _Column:
        """The dataset ``name`` of a site, creating the site group and the dataset on first use."""
        key = (meta.site, name)
        column = self._columns.get(key)
        if column is None:
            sites = self.handle[schema.SITES_GROUP]
            group_name = schema.site_key(meta.site)
            if group_name in sites:
                group = sites[group_name]
            else:
                group = sites.create_group(group_name)
                schema.write_site_attrs(group, meta)
                for required in (schema.BITS, *schema.SAMPLE_COLUMNS, schema.RECORDS):
                    self._columns[(meta.site, required)] = _Column(schema.create_column(group, required, meta, codec))
            column = self._columns.get(key) or _Column(schema.create_column(group, name, meta, codec))
            self._columns[key] = column
        return column

    def flush(self, what: str) -> None:
        self.handle.flush()
        self.check(what)

    def check(self, what: str) -> None:
        """Raise the first I/O error of the file, which HDF5 may have reported nowhere else."""
        if self.guarded.error is not None:
            raise OSError(self.guarded.error.errno, f"{what} in {self.path.name}: {self.guarded.error.strerror}")

    def finish(self) -> Path:
        """Close, fsync, then link to the final name (never replacing a file) and fsync the directory."""
        self.handle.flush()
        self.check("finalizing")
        self._columns.clear()
        self.handle.close()
        self.check("closing")
        self.guarded.sync_and_close()
        final = self.path.with_name(self.path.name[: -len(".partial")])
        _move_no_replace(self.path, final)
        _fsync_dir(self.path.parent)
        return final

    def abort(self) -> None:
        """Close the handle without writing anything more: the file stays as the last good flush left it."""
        self.guarded.discard = True
        self._columns.clear()
        try:
            self.handle.close()
        except Exception:  # noqa: BLE001 - nothing more can reach the file
            log.debug("actpat: closing the failed shard %s", self.path, exc_info=True)
        self.guarded.abort()


class _GuardedFile(FileAt):
    """The file object h5py writes a shard through (its ``fileobj`` driver).

    HDF5 reports some write errors only through its close, or as "Exception ignored" when a handle is
    released, and then crashes the process at exit. Here every write and truncate goes through
    ``os.pwrite``/``os.ftruncate``; the first ``OSError`` is kept in :attr:`error` (checked after every
    block) and every later write is discarded, so HDF5 itself never sees an error and closing is safe.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644))
        self.path = path
        self.error: OSError | None = None
        self.discard = False

    def write(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self.error is None and not self.discard:
            try:
                done = 0
                while done < len(view):
                    done += os.pwrite(self.fd, view[done:], self.pos + done)
            except OSError as exc:
                self.error = exc
        self.pos += len(view)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else size
        if self.error is None and not self.discard:
            try:
                os.ftruncate(self.fd, size)
            except OSError as exc:
                self.error = exc
        return size

    def flush(self) -> None:
        pass

    def sync_and_close(self) -> None:
        try:
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
            self.fd = -1

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _RunLock:
    """``patterns-rank{RANK}.lock`` in a run directory, held (``flock``) by the live writer of a rank.

    The kernel releases it when its process dies, however it dies, so the file a killed writer left
    behind is simply taken over; it keeps the holder's pid for the message a second writer gets, and
    is removed when its writer closes.
    """

    _held: set[tuple[str, int]] = set()
    _held_lock = threading.Lock()

    def __init__(self, key: tuple[str, int], path: Path, fd: int) -> None:
        self.key, self.path, self.fd = key, path, fd

    @classmethod
    def acquire(cls, out_dir: Path, rank: int) -> _RunLock:
        path = out_dir / schema.lock_name(rank)
        key = (os.path.realpath(out_dir), rank)
        with cls._held_lock:
            if key in cls._held:
                raise RecorderError(cls._message(out_dir, rank, path, f"this process ({os.getpid()})"))
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
                if fcntl is None:
                    break
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise
                    raise RecorderError(cls._message(out_dir, rank, path, f"process {holder}")) from None
                try:  # the holder we waited on may have removed the file: lock the one that has the name
                    if os.stat(path).st_ino == os.fstat(fd).st_ino:
                        break
                except FileNotFoundError:
                    pass
                os.close(fd)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            cls._held.add(key)
        return cls(key, path, fd)

    @staticmethod
    def _message(out_dir: Path, rank: int, path: Path, holder: str) -> str:
        return (
            f"Expected to be the only writer of rank {rank} in {out_dir}, but {holder} holds {path.name}: two "
            "writers would interleave their shards. Give each run its own `out_dir` (or each process its own "
            "`rank`), or close the other recorder first."
        )

    def release(self) -> None:
        """Remove the lock file (while still holding it, so no one locks a removed file) and unlock."""
        with self._held_lock:
            self._held.discard(self.key)
            if self.fd >= 0:
                try:
                    os.unlink(self.path)
                except OSError:
                    pass  # a stale file is taken over by the next writer
                os.close(self.fd)  # releases the flock
                self.fd = -1


def shard_ranks(out_dir: Path) -> set[int]:
    """The ranks whose shard files ``out_dir`` holds (none where it does not exist)."""
    if not out_dir.is_dir():
        return set()
    return {parsed[0] for name in os.listdir(out_dir) if (parsed := schema.parse_shard_name(name)) is not None}


def scan_existing(out_dir: Path, rank: int) -> tuple[dict[str, int], dict[str, tuple[int, str, str]]]:
    """What earlier writers left in ``out_dir``: the last step per split of ``rank``'s records, and each
    site's ``(n_units, pattern, shard name)`` in any rank's shards (records-table rows and attributes as
    stored; a shard that cannot be read is the reader's to report)."""
    last: dict[str, int] = {}
    sites: dict[str, tuple[int, str, str]] = {}
    for name in os.listdir(out_dir):
        parsed = schema.parse_shard_name(name)
        if parsed is None:
            continue
        try:
            with schema.open_for_reading(out_dir / name) as handle:
                for group in handle[schema.SITES_GROUP].values():
                    attrs = group.attrs
                    sites.setdefault(str(attrs["site"]), (int(attrs["n_units"]), str(attrs["pattern"]), name))
                    if parsed[0] != rank:
                        continue
                    rows = group[schema.RECORDS].fields(["step", "split"])[:]
                    for split in np.unique(rows["split"]):
                        step = int(rows["step"][rows["split"] == split].max())
                        key = split.decode(errors="replace")
                        last[key] = max(last.get(key, step), step)
        except Exception:  # noqa: BLE001 - damaged: reading it is the reader's business, not the writer's
            continue
    return last, sites


def _move_no_replace(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``, failing if ``target`` exists (never replacing it)."""
    message = f"Refusing to finalize {source.name}: {target} already exists, and a shard is never replaced."
    try:
        os.link(source, target)
    except FileExistsError:
        raise RecorderError(message) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        # No hard links on this file system: rename, after checking (the run lock keeps writers out).
        if target.exists():
            raise RecorderError(message) from None
        os.rename(source, target)
        return
    os.unlink(source)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


@dataclass
class _Buffered:
    """A record moved to host numpy arrays, waiting for the next block write."""

    record: Record
    bits: np.ndarray
    sample_ids: np.ndarray
    labels: np.ndarray
    obs_index: np.ndarray | None
    values: np.ndarray | None
    nan_count: int


def _starts(first: int, counts: list[int], present: list[bool] | None = None) -> np.ndarray:
    """The first row (int64, one per record) of consecutive runs of ``counts`` rows appended from row
    ``first`` on; -1 where not ``present``."""
    offsets = first + np.cumsum([0] + counts[:-1], dtype=np.int64)
    return offsets if present is None else np.where(present, offsets, -1)


class _Column:
    """An extensible dataset of an open shard, appended to along axis 0 with h5py's low-level calls.

    The high-level ``resize`` and ``dataset[a:b] = values`` took about 0.4 ms of Python per call, and
    even the low-level calls cost 10-15 us each for what never changes between appends (the length,
    the file's type and dataspace), which at four columns per site per block was most of the writer's
    CPU time: those are kept here. The file's own type is given as the memory type (the layouts are
    equal): HDF5 then skips its conversion, which for the records table's compound rows took 2.5x the
    rest of the write.
    """

    def __init__(self, dataset: h5py.Dataset) -> None:
        self._id = dataset.id
        self._space = self._id.get_space()
        self._type = self._id.get_type()
        self._dtype = dataset.dtype
        self._max_shape = self._space.get_simple_extent_dims(True)
        compressed = self._id.get_create_plist().get_nfilters() > 0
        self._chunk_rows = dataset.chunks[0] if compressed else 1
        #: The row the next append starts at.
        self.next_row = self._space.get_simple_extent_dims()[0]

    def begin_block(self) -> None:
        """Start the next block on a fresh chunk where the column is compressed.

        HDF5 writes a compressed chunk that an append extends to a new place, and may reuse the old one
        before the index that points there is rewritten: a kill in between would lose the records
        already in it. A block that starts on a fresh chunk never touches a chunk an earlier block wrote;
        the rows it skips belong to no record and compress to almost nothing.
        """
        self.next_row = -(-self.next_row // self._chunk_rows) * self._chunk_rows

    def append(self, values: np.ndarray) -> None:
        """Append ``values`` (the dataset's row shape; any dtype h5py converts) at :attr:`next_row`."""
        if not len(values):
            return
        values = np.ascontiguousarray(values)
        start, stop = self.next_row, self.next_row + len(values)
        shape = (stop, *values.shape[1:])
        self._id.set_extent(shape)
        self._space.set_extent_simple(shape, self._max_shape)
        self._space.select_hyperslab((start,) + (0,) * (values.ndim - 1), values.shape)
        memory_type = self._type if values.dtype == self._dtype else None
        self._id.write(h5py.h5s.create_simple(values.shape), self._space, values, mtype=memory_type)
        self.next_row = stop


__all__ = ["Record", "RecorderError", "ShardWriter", "SiteMeta"]
