"""Background writer of pattern records into rolling, atomically finalized HDF5 shards."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from actpat.recorder import schema

log = logging.getLogger(__name__)

_STOP = object()
# Records are buffered per site and written in blocks: each h5py call holds the GIL, and many small
# appends (and flushes, which compress partly filled chunks again) would slow the training thread.
_WRITE_BYTES = 4 << 20
_WRITE_SECONDS = 1.0


class RecorderError(RuntimeError):
    """Recording failed; the shards finalized so far stay readable."""


@dataclass(frozen=True)
class SiteMeta:
    """What a shard stores about one activation site."""

    site: str
    site_index: int
    module_type: str
    shape: tuple[int, ...]
    n_units: int
    pattern: str
    # Units whose float16 pre-activations are stored alongside the bits (None: values not stored).
    value_units: tuple[int, ...] | None = None


@dataclass
class Record:
    """One recorded call of one site, as handed from a hook to the writer.

    Array fields are numpy arrays or CPU tensors still being filled by a non-blocking device copy;
    ``ready`` (a CUDA event, or None) is waited on by the writer thread, never by the hook.
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
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        arrays = (self.bits, self.sample_ids, self.labels, self.obs_index, self.values)
        self.nbytes = sum(_nbytes(a) for a in arrays)


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
        Process rank, part of every shard's file name so that no two processes share a file.
    compression : {"lzf", "gzip", None}
        HDF5 filter of the pattern datasets.
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
        can lose to the records of the last ``max_shard_seconds``.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        rank: int = 0,
        compression: str | None = "lzf",
        max_queue_bytes: int = 256 << 20,
        on_backpressure: str = "block",
        max_shard_bytes: int = 1 << 30,
        max_shard_seconds: float = 60.0,
    ) -> None:
        if compression not in ("lzf", "gzip", None):
            raise ValueError(f"Expected `compression` to be 'lzf', 'gzip' or None, but got {compression!r}.")
        if on_backpressure not in ("block", "drop"):
            raise ValueError(f"Expected `on_backpressure` to be 'block' or 'drop', but got {on_backpressure!r}.")
        if max_queue_bytes < 1:
            raise ValueError(f"Expected `max_queue_bytes` to be at least 1, but got {max_queue_bytes}.")
        if max_shard_bytes < 1:
            raise ValueError(f"Expected `max_shard_bytes` to be at least 1, but got {max_shard_bytes}.")
        if not max_shard_seconds > 0:
            raise ValueError(f"Expected `max_shard_seconds` to be positive, but got {max_shard_seconds}.")
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
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._queued_bytes = 0
        self._space = threading.Condition()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._file: h5py.File | None = None
        self._file_bytes = 0
        self._file_dropped = 0
        self._file_opened = 0.0
        self._pending: dict[str, list[_Buffered]] = {}
        self._datasets: dict[str, dict[str, h5py.Dataset]] = {}  # of the open shard, by site
        self._pending_bytes = 0
        self._pending_since = 0.0
        self._next_index = 0

    # ------------------------------------------------------------------ producer side
    def start(self) -> None:
        """Create the run directory and start the writer thread."""
        if self._thread is not None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._next_index = self._first_free_index()
        self._thread = threading.Thread(target=self._run, name="actpat-shard-writer", daemon=True)
        self._thread.start()

    def put(self, record: Record) -> bool:
        """Queue a record; returns False if it was dropped under backpressure."""
        return self.put_many([record]) == 1

    def put_many(self, records: list[Record]) -> int:
        """Queue records as one item (one wake-up of the writer thread); returns how many were queued.

        Under ``on_backpressure="drop"`` the records that do not fit are dropped, each counted.
        """
        self.raise_if_failed()
        if self._thread is None:
            raise RecorderError("The shard writer is not running: call `start()` (or enter the recorder) first.")
        batch: list[Record] = []
        n_queued = 0
        with self._space:
            for record in records:
                # A record larger than the whole budget still passes once the queue is empty.
                while self._queued_bytes and self._queued_bytes + record.nbytes > self.max_queue_bytes:
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
            if batch:
                self._queue.put(batch)
        return n_queued

    def close(self) -> None:
        """Write everything queued, finalize the open shard and stop the thread."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join()
        self._thread = None
        self.raise_if_failed()

    def raise_if_failed(self) -> None:
        """Re-raise, in the caller's thread, an error the writer thread met."""
        if self._error is not None:
            raise RecorderError(f"Writing activation patterns to {self.out_dir} failed: {self._error!r}") from self._error

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
                            self._space.notify_all()
                    self._meet_deadlines()
        except BaseException as exc:  # noqa: BLE001 - handed to the producer thread
            self._error = exc
            self._drain()
        finally:
            try:
                if self._file is None and self._file_dropped:
                    self._file = self._open()  # an empty shard that only carries the last drop count
                self._finalize()
            except BaseException as exc:  # noqa: BLE001
                self._error = self._error or exc

    def _seconds_to_next_deadline(self) -> float | None:
        deadlines = []
        if self._file is not None:
            deadlines.append(self._file_opened + self.max_shard_seconds)
        if self._pending:
            deadlines.append(self._pending_since + _WRITE_SECONDS)
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _meet_deadlines(self) -> None:
        now = time.monotonic()
        if self._pending and (self._pending_bytes >= _WRITE_BYTES or now >= self._pending_since + _WRITE_SECONDS):
            self._write_pending()
        if self._file is not None and (
            self._file_bytes >= self.max_shard_bytes or now >= self._file_opened + self.max_shard_seconds
        ):
            self._finalize()

    def _drain(self) -> None:
        # After a failure, keep emptying the queue so producers never wait on a dead writer.
        while True:
            records = self._queue.get()
            if records is _STOP:
                return
            with self._space:
                self._queued_bytes -= sum(record.nbytes for record in records)
                self._space.notify_all()

    def _first_free_index(self) -> int:
        taken = [
            parsed[1]
            for parsed in map(schema.parse_shard_name, os.listdir(self.out_dir))
            if parsed is not None and parsed[0] == self.rank
        ]
        return max(taken, default=-1) + 1

    def _open(self) -> h5py.File:
        path = self.out_dir / schema.shard_name(self.rank, self._next_index, partial=True)
        handle = h5py.File(path, "w")
        handle.attrs["format"] = schema.FORMAT_NAME
        handle.attrs["format_version"] = schema.FORMAT_VERSION
        handle.attrs["rank"] = self.rank
        handle.attrs["shard_index"] = self._next_index
        handle.attrs["finalized"] = False
        handle.attrs["dropped_records"] = 0
        handle.create_group(schema.SITES_GROUP)
        self._file_bytes = 0
        self._file_opened = time.monotonic()
        self._next_index += 1
        return handle

    def _finalize(self) -> None:
        if self._file is None:
            return
        self._write_pending()
        handle, self._file = self._file, None
        self._datasets.clear()
        # Drops are counted by producers, possibly while no shard is open: each shard takes the drops
        # since the previous one was finalized, so that the shards' sum is the writer's total.
        with self._space:
            dropped, self._file_dropped = self._file_dropped, 0
        handle.attrs["dropped_records"] = dropped
        handle.attrs["finalized"] = True
        partial = Path(handle.filename)
        handle.close()
        final = partial.with_name(partial.name[: -len(".partial")])
        os.replace(partial, final)
        self.finalized.append(final)

    def _site_datasets(self, meta: SiteMeta) -> dict[str, h5py.Dataset]:
        # Each h5py lookup builds a new object (~0.3 ms of the writer's GIL-holding time): once per site and shard.
        datasets = self._datasets.get(meta.site)
        if datasets is None:
            group = self._site_group(meta)
            datasets = self._datasets[meta.site] = {name: group[name] for name in group}
        return datasets

    def _site_group(self, meta: SiteMeta) -> h5py.Group:
        sites = self._file[schema.SITES_GROUP]
        key = schema.site_key(meta.site)
        if key in sites:
            return sites[key]
        group = sites.create_group(key)
        group.attrs["site"] = meta.site
        group.attrs["site_index"] = meta.site_index
        group.attrs["module_type"] = meta.module_type
        group.attrs["shape"] = np.asarray(meta.shape, dtype=np.int64)
        group.attrs["n_units"] = meta.n_units
        group.attrs["pattern"] = meta.pattern
        group.attrs["bit_order"] = schema.BIT_ORDER
        if meta.value_units is not None:
            group.attrs["value_units"] = np.asarray(meta.value_units, dtype=np.int64)
            k = len(meta.value_units)
            group.create_dataset(
                schema.VALUES, shape=(0, k), maxshape=(None, k), dtype=np.float16,
                chunks=(max(1, min(1 << 14, (1 << 20) // (2 * k))), k), compression=self.compression,
            )
        n_bytes = (meta.n_units + 7) // 8
        row_chunk = max(1, min(1 << 16, (1 << 20) // n_bytes))
        group.create_dataset(
            schema.BITS, shape=(0, n_bytes), maxshape=(None, n_bytes), dtype=np.uint8,
            chunks=(row_chunk, n_bytes), compression=self.compression,
        )
        for name in (schema.SAMPLE_IDS, schema.LABELS, schema.OBS_INDEX):
            group.create_dataset(
                name, shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(1 << 14,), compression=self.compression
            )
        group.create_dataset(schema.RECORDS, shape=(0,), maxshape=(None,), dtype=schema.RECORD_DTYPE, chunks=(256,))
        return group

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
        if self._file is None:
            self._file = self._open()
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending.setdefault(record.meta.site, []).append(buffered)
        self._pending_bytes += record.nbytes
        self._file_bytes += record.nbytes

    def _write_pending(self) -> None:
        for items in self._pending.values():
            group = self._site_datasets(items[0].record.meta)
            entries = np.zeros(len(items), dtype=schema.RECORD_DTYPE)
            row, sample = group[schema.BITS].shape[0], group[schema.SAMPLE_IDS].shape[0]
            obs, value = group[schema.OBS_INDEX].shape[0], group[schema.VALUES].shape[0] if schema.VALUES in group else 0
            for entry, item in zip(entries, items):
                rec = item.record
                entry["step"], entry["epoch"], entry["split"] = rec.step, rec.epoch, rec.split.encode()
                entry["row_start"], entry["row_count"] = row, len(item.bits)
                entry["sample_start"], entry["sample_count"] = sample, rec.n_samples
                entry["obs_start"] = -1 if item.obs_index is None else obs
                entry["value_start"] = -1 if item.values is None else value
                entry["n_positions"], entry["nan_count"] = rec.n_positions, item.nan_count
                row, sample = row + len(item.bits), sample + rec.n_samples
                obs += 0 if item.obs_index is None else len(item.obs_index)
                value += 0 if item.values is None else len(item.values)
            columns = {
                schema.BITS: [item.bits for item in items],
                schema.SAMPLE_IDS: [item.sample_ids for item in items],
                schema.LABELS: [item.labels for item in items],
                schema.OBS_INDEX: [item.obs_index for item in items if item.obs_index is not None],
                schema.VALUES: [item.values for item in items if item.values is not None],
            }
            for name, parts in columns.items():
                if parts:
                    _append(group[name], np.concatenate(parts))
            # The record rows go last: a reader never sees a record whose rows are missing.
            _append(group[schema.RECORDS], entries)
            self.written_records += len(items)
        if self._pending:
            self._file.flush()
        self._pending.clear()
        self._pending_bytes = 0


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


def _append(dataset: h5py.Dataset, values: np.ndarray) -> int:
    start = dataset.shape[0]
    dataset.resize(start + len(values), axis=0)
    if len(values):
        dataset[start:] = values
    return start
