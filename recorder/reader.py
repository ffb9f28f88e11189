"""Read a run directory of activation-pattern shards (torch-free: the analysis package imports it).

Every record read back is either exact or reported missing: a record of a shard of version 3 or later
is checked against its CRC-32 before it is returned; one that fails, or whose records-table row points
outside its data, is skipped with a warning naming the file, site and step and listed in
:attr:`Run.losses`, as is a step of version 4 or later whose records stop before the one that ends it.
Everything the reader allocates is bounded by what the file actually stores.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import math
import os
import threading
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import h5py
import numpy as np

from actpat.recorder import schema
from actpat.recorder.observations import Patterns
from actpat.recorder.schema import ShardFormatError

log = logging.getLogger(__name__)

# Bounds on what a shard may declare before anything is allocated from it.
_MAX_UNITS = 1 << 32
_INDEX_SLICE = 1 << 16  # records-table rows read at a time
_VERIFY_ROWS = 1 << 20  # rows per slice when a record is verified without holding it whole
_READ_AHEAD = 1 << 20  # bytes per read-ahead slab
_SLABS = 16  # read-ahead slabs kept (at most 16 MiB)
_PARTS = np.dtype([("split", "<i8"), ("step", "<i8"), ("part", "<i8"), ("ends_step", "u1"), ("shard", "<i8")])
# Why a step is incomplete: its records stop before the one that ends it, or miss one in between.
_CUT_SHORT = ("recording stopped in the middle of the step (the process was killed, or an error or interrupt stopped "
              "recording: see `stop_reasons`)")
_DROPPED = "dropped under backpressure, or lost"


@dataclass(frozen=True)
class Loss:
    """Records of a run that cannot be read back exactly (skipped, never returned).

    Attributes
    ----------
    path : Path
        The shard (or the missing shard's expected name).
    reason : str
        What is wrong, in words.
    rank, shard_index : int
        Which writer's which shard.
    site, split, step : optional
        Where the lost records belong, as far as the file still says (None: unknown).
    records : int or None
        How many records are lost (None: unknown, e.g. a shard that cannot be opened).
    kind : str
        ``"corrupt"`` (a record failed its checksum or bounds), ``"unwritten"`` (rows of an
        unfinalized shard that never reached the disk), ``"unreadable"`` (a shard or site that cannot be
        read at all), ``"missing"`` (a gap in a rank's shard numbering, or steps a closed writer session
        queued past its shards on disk) or ``"incomplete"`` (a step whose records stop before its last one,
        or miss one between: a writer killed in the middle of a probe, records dropped under backpressure;
        format 4 and later).
    steps : (int or None, int or None) or None
        For records whose records-table row cannot be trusted (its checksum fails, or it never reached
        the disk): the steps it may belong to, from the sound rows around it (None: unbounded). ``step``
        and ``split`` are then None. Reads of those steps count the record in ``lost_records``. (A shard
        missing or a site group that cannot be read is listed without steps; reads count it likewise for
        the steps between the rank's records of the site around it.)
    """

    path: Path
    reason: str
    rank: int
    shard_index: int
    site: str | None = None
    split: str | None = None
    step: int | None = None
    records: int | None = None
    kind: str = "corrupt"
    steps: tuple[int | None, int | None] | None = None

    def may_hold(self, site: str, split: str, step: int) -> bool:
        """Whether the lost records may be records of ``site`` at ``step`` in ``split``."""
        if self.site != site or self.split not in (None, split):
            return False
        if self.step is not None:
            return self.step == step
        if self.steps is None:
            return False
        lo, hi = self.steps
        return (lo is None or lo <= step) and (hi is None or step <= hi)


@dataclass(frozen=True)
class StopReason:
    """Why a writer stopped recording before the end (stored by ``ShardWriter.record_stop``)."""

    rank: int
    path: Path
    reason: str


@dataclass(frozen=True)
class ShardInfo:
    """What a run directory's shard says about itself.

    ``finalized`` is False for a ``.partial`` shard (a crash, or a writer still running);
    ``checksummed`` is False for format versions before 3, whose records are read unverified.
    """

    path: Path
    rank: int
    index: int
    format_version: int
    finalized: bool
    compression: str
    dropped_records: int

    @property
    def checksummed(self) -> bool:
        return self.format_version >= schema.CHECKSUM_VERSION


@dataclass(frozen=True, slots=True)
class _Entry:
    shard: int  # index into Run._shards
    key: str
    split: str
    step: int
    epoch: int
    row_start: int
    row_count: int
    sample_start: int
    sample_count: int
    obs_start: int
    n_positions: int
    nan_count: int
    value_start: int
    row_crc: int  # the verified row_crc32 the record checksum starts from
    crc: int  # -1: the shard's version has no checksums


class _Shard:
    """A shard file as indexed; ``path`` follows a ``.partial`` file that was finalized meanwhile."""

    def __init__(self, path: Path, rank: int, index: int, version: int, partial: bool, codec: str) -> None:
        self.path, self.rank, self.index, self.version, self.partial, self.codec = path, rank, index, version, partial, codec
        self.last_steps: dict[tuple[str, str], int] = {}  # (site, split) -> the last step it holds a record of


def _queued_here(rank: int, mark: int, steps: str, rows: str) -> str:
    return (f"rank {rank} queued its records of {steps}, which never reached the disk (its writer was killed or is "
            f"still running): {rows} only the other ranks' batches")


def _missing_after(rank: int, mark: int, steps: str, rows: str) -> str:
    return (f"rank {rank} queued its records of {steps} and closed, but they are not on disk (a shard after its last "
            f"one on disk is missing, deleted or not copied, or its last records were dropped): {rows} only the other "
            "ranks' batches")


def _stopped_before(rank: int, mark: int, steps: str, rows: str) -> str:
    return (f"rank {rank} stopped before {steps} (the last it queued in the split is {mark}) while other ranks "
            f"recording beside it went on: {rows} only their batches")


def open_run(path: str | os.PathLike, *, max_open: int = 8, warn: bool = True) -> "Run":
    """Open a run directory written by :class:`~actpat.recorder.ActivationRecorder`.

    Finalized shards (``*.h5``) of every rank are read; so is, with a warning, every record of an
    unfinalized shard (``*.h5.partial``, left by a crash or a writer still running) that verifies.
    Use as a context manager (``with open_run(p) as run:``) or call :meth:`Run.close` to release
    the open files; a :class:`Run` can be pickled and reopens its files lazily in another process.

    Parameters
    ----------
    path : path
        The run directory.
    max_open : int, default 8
        Shard files kept open at once (least recently used are closed).
    warn : bool, default True
        Log a warning for each loss found (they are listed in :attr:`Run.losses` either way). False where
        another process warns of the same run: the ranks but one of a data-parallel fit.

    Raises
    ------
    FileNotFoundError
        The directory does not exist.
    NotADirectoryError
        The path is a file (a shard file: the error names its folder).
    ShardFormatError
        A ``*.h5`` file is not an actpat shard, a shard was written by a newer format version, two
        shards describe one site differently, or ``path`` holds no shard but directories below it do
        (a folder above the run, such as a Lightning log version folder).
    """
    return Run(path, max_open=max_open, warn=warn)


class Run:
    """Index of all records in a run directory; data is read lazily, through a few open files."""

    def __init__(self, path: str | os.PathLike, *, max_open: int = 8, warn: bool = True) -> None:
        # Absolute: a copy sent to another process (a pool or Dask worker) may run in another working directory.
        self.path = Path(os.path.abspath(path))
        self._warns = warn
        if not self.path.is_dir():
            raise not_a_run_dir(self.path)
        if max_open < 1:
            raise ValueError(f"Expected `max_open` to be at least 1, but got {max_open}.")
        self.max_open = int(max_open)
        self.dropped_records = 0
        self.losses: list[Loss] = []
        self.stop_reasons: list[StopReason] = []
        self._shards: list[_Shard] = []
        self._shard_infos: list[ShardInfo] = []
        self._info: dict[str, dict] = {}
        self._info_source: dict[str, Path] = {}
        self._entries: dict[tuple[str, str], list[_Entry]] = defaultdict(list)
        self._lost_entries: set[_Entry] = set()
        self._index_losses: dict[str, list[Loss]] = defaultdict(list)  # lost before any read, by site
        # While indexing: (site, rank) -> _PARTS arrays of the sound rows written with step tracking, and
        # the codes their splits are stored as
        self._step_parts: dict[tuple[str, int], list[np.ndarray]] = defaultdict(list)
        self._split_codes: dict[bytes, int] = {}
        # (path, rank, index, loss or None) of unfinalized shards, reported once the stop files are read
        self._unfinalized: list[tuple[Path, int, int, Loss | None]] = []
        self._crashed: set[int] = set()  # ranks that left an unfinalized shard, readable or not
        # rank -> [(first shard index, path, marks or None if unreadable)] of its writer sessions
        self._sessions: dict[int, list[tuple[int, Path, schema.Marks | None]]] = defaultdict(list)
        self._steps_cache: dict[tuple[str, str], list[int]] = {}
        self._held_cache: dict | None = None  # while indexing: see _held
        self._init_handles()
        names = os.listdir(self.path)
        if not any(schema.parse_shard_name(n) for n in names):
            _refuse_a_folder_above_runs(self.path)
        # Marks first, then the shards listed again: a session closes its marks after finalizing its last shard,
        # so a writer that closed while this listed the run has that shard in the second listing.
        marks_texts = {name: schema.read_marks_text(self.path / name)
                       for name in names if schema.parse_marks_name(name)}
        if marks_texts:
            names = os.listdir(self.path)
        finals = {n for n in names if n.endswith(schema.SHARD_SUFFIX)}
        for name in sorted(names, key=_shard_order):
            if name.endswith(schema.PARTIAL_SUFFIX) and name[: -len(".partial")] in finals:
                continue  # finalized between link and unlink: the same file under its final name
            if name.endswith((schema.SHARD_SUFFIX, schema.PARTIAL_SUFFIX)):
                self._index_shard(self.path / name)
            elif schema.parse_stop_name(name) is not None:
                self._read_stop_file(self.path / name)
            elif (session := schema.parse_marks_name(name)) is not None:
                text = marks_texts[name] if name in marks_texts else schema.read_marks_text(self.path / name)
                marks = schema.parse_marks(text) if text else None
                if marks is None and text != b"":  # (empty: a writer creating it this instant)
                    self._warn("actpat: cannot read the marks file %s (damaged?): the steps its writer session may "
                               "have lost at its end are judged from the shards alone.", self.path / name)
                self._sessions[session[0]].append((session[1], self.path / name, marks))
        self._report_unfinalized()
        self._find_numbering_gaps()
        self._bound_lost_shards()
        self._find_incomplete_steps()
        self._find_steps_missing_a_rank()
        self._held_cache = None
        for entries in self._entries.values():
            entries.sort(key=lambda e: e.step)  # stable: shard order kept within a step
        self._close_handles()

    # ------------------------------------------------------------------ open files
    def _init_handles(self) -> None:
        self._handles: OrderedDict[int, h5py.File] = OrderedDict()
        self._datasets: dict[tuple[int, str, str], h5py.Dataset] = {}
        self._slabs: OrderedDict[tuple[int, str, str], tuple[int, np.ndarray]] = OrderedDict()
        self._handles_lock = threading.RLock()

    def _handle(self, shard_id: int) -> h5py.File:
        """The open file of a shard (least recently used files beyond ``max_open`` are closed)."""
        with self._handles_lock:
            handle = self._handles.get(shard_id)
            if handle is not None:
                self._handles.move_to_end(shard_id)
                return handle
            shard = self._shards[shard_id]
            if shard.codec in schema.PLUGIN_CODECS:
                schema.load_plugins(f"Shard {shard.path} (compressed with {shard.codec!r})")
            try:
                handle = schema.open_for_reading(shard.path)
            except FileNotFoundError:
                final = _finalized_since(shard.path)
                if final is None:
                    raise
                shard.path, shard.partial = final, False
                handle = schema.open_for_reading(shard.path)
            self._handles[shard_id] = handle
            while len(self._handles) > self.max_open:
                old_id, old = self._handles.popitem(last=False)
                self._forget(old_id)
                old.close()
            return handle

    def _forget(self, shard_id: int) -> None:
        for cache in (self._datasets, self._slabs):
            for key in [k for k in cache if k[0] == shard_id]:
                del cache[key]

    def _rows(self, shard_id: int, key: str, name: str, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo:hi`` of a site's dataset, through a small read-ahead cache.

        A pass over a site's steps reads its records one after the other: one read of about
        :data:`_READ_AHEAD` bytes serves many small records. Larger reads go to the file directly.
        """
        with self._handles_lock:
            slab_key = (shard_id, key, name)
            slab = self._slabs.get(slab_key)
            if slab is not None and slab[0] <= lo and hi <= slab[0] + len(slab[1]):
                self._slabs.move_to_end(slab_key)
                return slab[1][lo - slab[0] : hi - slab[0]].copy()
            dataset = self._datasets.get(slab_key)
            if dataset is None:
                dataset = self._datasets[slab_key] = self._handle(shard_id)[schema.SITES_GROUP][key][name]
            else:
                self._handle(shard_id)  # keep the file most recently used
            row_bytes = dataset.dtype.itemsize * int(np.prod(dataset.shape[1:]))
            ahead = max(1, _READ_AHEAD // max(1, row_bytes))
            if hi - lo >= ahead // 2:
                return dataset[lo:hi]
            end = min(dataset.shape[0], lo + ahead)
            rows = dataset[lo:end]
            self._slabs[slab_key] = (lo, rows)
            while len(self._slabs) > _SLABS:
                self._slabs.popitem(last=False)
            return rows[: hi - lo].copy()

    def _close_handles(self) -> None:
        with self._handles_lock:
            self._datasets.clear()
            self._slabs.clear()
            while self._handles:
                _, handle = self._handles.popitem()
                try:
                    handle.close()
                except Exception:  # noqa: BLE001 - closing a read-only file cannot lose data
                    pass

    def close(self) -> None:
        """Close the open shard files (a later read reopens them)."""
        self._close_handles()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_handles", None):
            self._close_handles()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for name in ("_handles", "_datasets", "_slabs", "_handles_lock"):
            del state[name]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_handles()

    # ------------------------------------------------------------------ index
    def _warn(self, message: str, *args: Any) -> None:
        if self._warns:
            log.warning(message, *args)

    def _lose(self, loss: Loss, warn: bool = True) -> None:
        self.losses.append(loss)
        if not warn:
            return
        where = "".join(
            f", {name} {value!r}" for name, value in (("site", loss.site), ("split", loss.split), ("step", loss.step))
            if value is not None
        )
        if loss.steps is not None:
            where += ", one of steps {}..{}".format(*("?" if b is None else b for b in loss.steps))
        count = "" if loss.records is None else f" ({loss.records} record{'s' * (loss.records != 1)})"
        self._warn("actpat: skipping records of %s%s%s: %s.", loss.path, where, count, loss.reason)

    def _index_shard(self, path: Path) -> None:
        """Index one file: damage to a finalized shard as a whole is an error naming it; an unfinalized
        one (a crash) is skipped with a warning and listed in :attr:`losses`."""
        parsed = schema.parse_shard_name(path.name)
        rank, index, partial = parsed if parsed else (-1, -1, path.name.endswith(schema.PARTIAL_SUFFIX))
        if partial and _is_empty(path):
            reason = "it is empty: no block reached the disk (its writer still runs, or stopped before one did)"
            self._unfinalized.append((path, rank, index, Loss(path, reason, rank, index, kind="unwritten")))
            return
        try:
            handle = schema.open_for_reading(path)
        except OSError as exc:
            final = _finalized_since(path) if isinstance(exc, FileNotFoundError) else None
            if final is not None:
                self._index_shard(final)
                return
            self._damaged(path, rank, index, partial, f"it cannot be opened ({_short(exc)})", exc)
            return
        try:
            with handle:
                self._index_file(handle, path, rank, index, partial, named=parsed is not None)
        except (ShardFormatError, ImportError):  # a newer version, a foreign file, a codec to install
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged file: whatever HDF5 raises, name the file
            self._damaged(path, rank, index, partial, _short(exc), exc)

    def _damaged(self, path: Path, rank: int, index: int, partial: bool, what: str, exc: BaseException) -> None:
        if partial:
            loss = Loss(path, f"the file is damaged: {what}", rank, index, kind="unreadable")
            self._unfinalized.append((path, rank, index, loss))
            return
        raise ShardFormatError(
            f"Expected {path} to be a readable actpat shard, but {what}. Move the file out of the run directory "
            "if it does not belong there; a damaged shard cannot be repaired."
        ) from exc

    def _index_file(self, handle: h5py.File, path: Path, rank: int, index: int, partial: bool, named: bool) -> None:
        attrs = handle.attrs
        if _attr(attrs, "format", str) != schema.FORMAT_NAME:
            if partial:  # an unfinalized file of a crashed writer: skipped like any damaged one
                raise ValueError(f"it is not an actpat shard (no format={schema.FORMAT_NAME!r} attribute)")
            raise ShardFormatError(
                f"Expected {path} to be an actpat shard (attribute format={schema.FORMAT_NAME!r}), but it is not. "
                "Move it out of the run directory."
            )
        version = _attr(attrs, "format_version", int)
        if version is None or version < 1:
            raise ValueError(f"its format_version attribute is {attrs.get('format_version')!r}")
        if version > schema.FORMAT_VERSION:
            raise ShardFormatError(
                f"Expected shard format version <= {schema.FORMAT_VERSION}, but {path} has version {version}. "
                "Upgrade actpat to read it."
            )
        own_rank, own_index = _attr(attrs, "rank", int, -1), _attr(attrs, "shard_index", int, -1)
        if not named:
            rank, index = own_rank, own_index
        finalized = attrs.get("finalized", False)
        if not isinstance(finalized, (bool, np.bool_)):
            raise ValueError(f"its attribute 'finalized' is {finalized!r}, not a bool")
        codec = _attr(attrs, "compression", str, "none")
        if codec in schema.PLUGIN_CODECS:
            schema.load_plugins(f"Shard {path} (compressed with {codec!r})")
        finalized = bool(finalized) and not partial
        shard = _Shard(path, rank, index, version, not finalized, codec)
        shard_id = len(self._shards)
        # Index the whole file before keeping anything of it, so a failure leaves no half shard.
        infos, entries, losses, parts = {}, [], [], []
        if schema.SITES_GROUP not in handle:
            raise ValueError(f"it has no {schema.SITES_GROUP!r} group")
        try:
            sites = handle[schema.SITES_GROUP]
        except Exception as exc:  # noqa: BLE001 - HDF5's reason (a failed metadata checksum, typically)
            raise ValueError(f"its {schema.SITES_GROUP!r} group cannot be read ({_short(exc)})") from exc
        if not isinstance(sites, h5py.Group):
            raise ValueError(f"its {schema.SITES_GROUP!r} is not a group")
        for key in sites:
            try:
                self._index_site(sites[key], key, shard, shard_id, infos, entries, losses, parts)
            except Exception as exc:  # noqa: BLE001 - one damaged site loses its own records only
                losses.append(Loss(path, f"site group {key!r} cannot be read ({_short(exc)})", rank, index,
                                   site=_unescape(key), kind="unreadable"))  # fmt: skip
        dropped = _attr(attrs, "dropped_records", int, 0)
        if not finalized:
            self._unfinalized.append((path, rank, index, None))
        for site, info in infos.items():
            self._check_site_consistency(site, info, path)
        self._shards.append(shard)
        self._shard_infos.append(ShardInfo(path, rank, index, version, finalized, codec, max(0, dropped or 0)))
        self.dropped_records += max(0, dropped or 0)
        stop = _attr(attrs, "stop_reason", str)
        if stop:
            self.stop_reasons.extend(StopReason(rank, path, line) for line in stop.splitlines())
        for loss in losses:
            if loss.site is not None and (loss.step is not None or loss.steps is not None):
                self._lose_step(loss)
            else:
                self._lose(loss)
        for site, entry in entries:
            self._entries[(site, entry.split)].append(entry)
        for site, rows in parts:
            rows["shard"] = shard_id
            self._step_parts[(site, rank)].append(rows)

    def _check_site_consistency(self, site: str, info: dict, path: Path) -> None:
        known = self._info.get(site)
        if known is None:
            self._info[site], self._info_source[site] = info, path
            return
        for name in ("n_units", "pattern"):
            if known[name] != info[name]:
                raise ShardFormatError(
                    f"Expected every shard of {self.path} to describe site {site!r} alike, but "
                    f"{self._info_source[site].name} has {name}={known[name]!r} and {path.name} has {info[name]!r}: "
                    "shards of different runs share the directory. Move one run's shards to their own directory."
                )
        if known["value_units"] is None and info["value_units"] is not None:
            known["value_units"] = info["value_units"]

    def _index_site(self, group: Any, key: str, shard: _Shard, shard_id: int, infos: dict, entries: list,
                    losses: list, parts: list) -> None:  # fmt: skip
        if not isinstance(group, h5py.Group):
            raise ValueError("it is not a group")
        meta = _site_meta(group)
        site = meta["site"]
        loss = lambda reason, kind="corrupt", **kw: Loss(shard.path, reason, shard.rank, shard.index, site=site,
                                                          kind=kind, **kw)  # noqa: E731 # fmt: skip
        columns = {name: group.get(name) for name in (schema.BITS, *schema.SAMPLE_COLUMNS, *schema.OPTIONAL_COLUMNS)}
        _check_column(columns[schema.BITS], schema.BITS, 2, (meta["n_units"] + 7) // 8)
        for name in schema.SAMPLE_COLUMNS:
            _check_column(columns[name], name, 1)
        if columns[schema.OBS_INDEX] is not None:
            _check_column(columns[schema.OBS_INDEX], schema.OBS_INDEX, 1)
        if columns[schema.VALUES] is not None:
            if meta["value_units"] is None:
                raise ValueError("it has values but no value_units attribute")
            _check_column(columns[schema.VALUES], schema.VALUES, 2, len(meta["value_units"]))
        extents = {name: _stored_rows(ds) if ds is not None else 0 for name, ds in columns.items()}
        records = group.get(schema.RECORDS)
        if not isinstance(records, h5py.Dataset) or records.ndim != 1 or records.dtype.names is None:
            raise ValueError("its records table is missing or not a one-dimensional compound dataset")
        fields, dtype = schema.RECORD_FIELDS[shard.version], records.dtype  # h5py builds a dtype per access
        missing = [f for f in fields if f not in dtype.names]
        wrong = [f for f in fields if f in dtype.names and f != "split" and dtype[f].kind not in "iu"]
        if missing or wrong or dtype["split"].kind != "S":
            raise ValueError(f"its records table has fields {dtype.names} (missing {missing}, not integer {wrong})")
        stored = _stored_rows(records)
        sound_at: list[np.ndarray] = []  # (index in the table, step) of the rows indexed
        untrusted: list[tuple[int, str, str]] = []  # (index, reason, kind) of rows whose step is not known
        if stored < records.shape[0]:
            untrusted.append((stored, "records-table rows never reached the disk",
                              "unwritten" if shard.partial else "corrupt"))  # fmt: skip
        infos[site] = meta
        checksummed = shard.version >= schema.CHECKSUM_VERSION
        headers = {False: schema.site_header(site, meta["pattern"], meta["n_units"], None)}
        if meta["value_units"] is not None:
            headers[True] = schema.site_header(site, meta["pattern"], meta["n_units"], meta["value_units"])
        for lo in range(0, stored, _INDEX_SLICE):
            table = records[lo : min(stored, lo + _INDEX_SLICE)]
            has_values = shard.version >= 2
            if checksummed:  # a row is trusted as an index entry only once its own checksum matches
                row_crcs = schema.row_crcs(table, headers[False], headers.get(True), shard.version)
                sound = row_crcs == table["row_crc32"].astype(np.int64)
            else:
                row_crcs = np.full(len(table), -1, dtype=np.int64)
                sound = np.ones(len(table), dtype=bool)
            ok = sound & _valid_rows(table, extents, meta["value_units"] is not None)
            sound_at.append(np.stack([np.flatnonzero(sound) + lo, table["step"][sound].astype(np.int64)], axis=1))
            if shard.version >= schema.STEP_PARTS_VERSION:
                parts.append((site, self._tracked_parts(table[sound & (table["part"] >= 0)])))
            kind = "unwritten" if shard.partial else "corrupt"
            for i in np.flatnonzero(~ok):
                if shard.partial:
                    reason = "it never fully reached the disk"
                elif sound[i]:
                    reason = "its records-table row points outside the data"
                else:
                    reason = "its records-table row fails its checksum"
                if sound[i]:
                    losses.append(loss(reason, kind, step=int(table[i]["step"]), split=_split(table[i]), records=1))
                else:  # nothing in the row can be trusted, its step and split included
                    untrusted.append((lo + int(i), reason, kind))
            for row, row_checksum in zip(table[ok], row_crcs[ok]):
                entries.append((site, _Entry(
                    shard_id, key, _split(row), int(row["step"]), int(row["epoch"]), int(row["row_start"]),
                    int(row["row_count"]), int(row["sample_start"]), int(row["sample_count"]),
                    int(row["obs_start"]), int(row["n_positions"]), int(row["nan_count"]),
                    int(row["value_start"]) if has_values else -1, int(row_checksum),
                    int(row["crc32"]) if checksummed else -1,
                )))  # fmt: skip
            kept = table[ok]
            for split in np.unique(kept["split"]):
                last, step = (site, bytes(split).decode(errors="replace")), int(kept["step"][kept["split"] == split].max())
                shard.last_steps[last] = max(step, shard.last_steps.get(last, step))
        if untrusted:
            known = np.concatenate(sound_at) if sound_at else np.zeros((0, 2), dtype=np.int64)
            for index, reason, kind in untrusted:
                losses.append(loss(reason, kind, records=records.shape[0] - stored if index == stored else 1,
                                   steps=_step_bracket(known, index)))  # fmt: skip

    def _read_stop_file(self, path: Path) -> None:
        rank, _ = schema.parse_stop_name(path.name)
        try:
            with open(path, encoding="utf-8") as handle:
                lines = [line.strip() for line in handle if line.strip()]
            for line in lines:
                try:
                    reason = str(json.loads(line))
                except ValueError:
                    reason = line
                self.stop_reasons.append(StopReason(rank, path, reason))
            if not lines:  # created, but the reason could not be written (a full disk, typically)
                self.stop_reasons.append(StopReason(rank, path, "unknown: the writer could not store why"))
        except OSError as exc:
            self._warn("actpat: cannot read %s (why recording stopped): %s", path, exc)

    def _tracked_parts(self, rows: np.ndarray) -> np.ndarray:
        """The ``part`` and ``ends_step`` of records-table ``rows``, with their step and split (as a code)."""
        out = np.zeros(len(rows), dtype=_PARTS)
        splits, inverse = np.unique(rows["split"], return_inverse=True)
        codes = [self._split_codes.setdefault(bytes(split), len(self._split_codes)) for split in splits]
        out["split"] = np.asarray(codes, dtype=np.int64)[inverse]
        for name in ("step", "part", "ends_step"):
            out[name] = rows[name]
        return out

    def _find_incomplete_steps(self) -> None:
        """Lose the steps whose records, as numbered by their writer, stop before the one that ends the
        step or miss one in between: what a kill in the middle of a probe, or a drop, leaves."""
        names = {code: split.decode(errors="replace") for split, code in self._split_codes.items()}
        # One warning per split and cause: a run that dropped records under backpressure has many such steps.
        lost: dict[tuple[str, str], list[tuple[str, int, int]]] = defaultdict(list)
        for (site, rank), arrays in self._step_parts.items():
            rows = np.concatenate(arrays)
            unusual = (rows["part"] > 0) | (rows["ends_step"] == 0)
            if not unusual.any():  # every step one record that ends it: the usual batch-mode run
                continue
            order = np.lexsort((rows["part"], rows["step"], rows["split"]))
            rows, unusual = rows[order], unusual[order]
            first = np.r_[True, (np.diff(rows["split"]) != 0) | (np.diff(rows["step"]) != 0)]  # of a step
            bounds, group = np.r_[np.flatnonzero(first), len(rows)], np.cumsum(first) - 1
            for g in np.unique(group[unusual]):
                loss = self._check_step(site, rank, names, rows[bounds[g] : bounds[g + 1]])
                if loss is not None:
                    cause = _DROPPED if loss.records else _CUT_SHORT
                    lost[(loss.split, cause)].append((site, rank, loss.step))
        self._step_parts.clear()
        self._split_codes.clear()
        for (split, cause), where in sorted(lost.items()):
            steps, sites = sorted({step for _, _, step in where}), sorted({site for site, _, _ in where})
            self._warn("actpat: records lost in split %r, %d incomplete step(s) from %d to %d, %d site(s) (%s), rank(s) "
                       "%s (each in `losses`, left out of the analysis): %s.", split, len(steps), steps[0], steps[-1],
                       len(sites), ", ".join(sites[:3]) + (", ..." if len(sites) > 3 else ""),
                       ", ".join(map(str, sorted({r for _, r, _ in where}))), cause)

    def _check_step(self, site: str, rank: int, names: dict[int, str], rows: np.ndarray) -> Loss | None:
        """Lose the step of ``rows`` (one site, rank, split and step, sorted by part) if it is incomplete (the loss,
        not warned of one by one)."""
        present = np.unique(rows["part"])
        last = int(present[-1])
        missing = last + 1 - len(present)
        ended = bool(rows["ends_step"][rows["part"] == last].any())
        if ended and not missing:
            return None
        reasons = [] if ended else [f"no record ends it (the last on disk is its part {last}, parts counting from 0): "
                                    + _CUT_SHORT]
        if missing:
            reasons.append(f"{missing} of its first {last + 1} records are missing ({_DROPPED})")
        shard = self._shards[int(rows["shard"][-1])]
        loss = Loss(shard.path, "the step is incomplete: " + "; ".join(reasons), rank, shard.index, site,
                    names[int(rows["split"][0])], int(rows["step"][0]), missing if ended else None, "incomplete")
        self._lose_step(loss, warn=False)
        return loss

    def _find_steps_missing_a_rank(self) -> None:
        """Mark the steps of a split that hold only some ranks' batches: the ranks of a data-parallel fit record
        the same steps, and a rank killed before its last records reached the disk left those steps to the others.

        Each writer session stores the last step of each split it queued (its marks file): a session that never
        closed lost its steps after the last one it wrote, up to that mark, for each site; so did a closed one
        whose shards on disk end before its mark (a last shard deleted or not copied, its last records dropped),
        compared per site where its marks name the last step of each site (stored at close). Such a step, held by
        other ranks and never by this one, is lost (``Loss.kind`` "incomplete", naming the rank), whether the
        other ranks' shards were finalized or not. Runs written before marks files existed fall back to
        :meth:`_find_steps_missing_a_rank_unmarked`. Any rank's unwritten steps, up to its marks, are listed in
        :attr:`losses` too (kind "unwritten", a range of steps per site), so that a read of one names them."""
        several = len({shard.rank for shard in self._shards} | self._crashed | set(self._sessions)) > 1
        cut, marked = [], set()  # (rank, marks path, past, end, closed) of sessions that lost their last steps
        for rank, sessions in self._sessions.items():
            sessions.sort(key=lambda session: session[0])
            starts = [first for first, _, _ in sessions] + [math.inf]
            for (first, path, marks), end in zip(sessions, starts[1:]):
                if marks is None:
                    continue  # unreadable: this rank is checked as runs without marks are
                marked.add(rank)
                # Closed: all it queued was written, unless a shard was lost since: its last step on disk tells.
                past = self._marks_past_disk(rank, first, end, marks) if marks.closed else {
                    (None, split): step for split, step in marks.queued.items()}
                if past:
                    cut.append((rank, path, past, end, marks.closed))
        if not several and not cut:
            return  # one rank that closed, its shards all there: the usual run, no pass over every entry at each open
        held = self._held()
        for rank, path, past, end, closed in cut:
            self._lose_unwritten_steps(rank, path, past, end, held, closed)
        if several:
            self._find_steps_missing_a_rank_unmarked(held, skip=marked)

    def _held(self) -> dict[tuple[str, str], dict[int, list[tuple[int, int]]]]:
        """(site, split) -> rank -> the (shard index, step) of each of its records, in shard order: built once,
        on first use while indexing (a damaged or multi-rank run), for the checks that bound what is lost."""
        if self._held_cache is None:
            held: dict = defaultdict(lambda: defaultdict(list))
            for (site, split), entries in self._entries.items():
                for e in entries:
                    shard = self._shards[e.shard]
                    held[(site, split)][shard.rank].append((shard.index, e.step))
            self._held_cache = held
        return self._held_cache

    def _marks_past_disk(self, rank: int, first: int, end: float, marks: schema.Marks) -> dict[tuple[str | None, str], int]:
        """The last steps queued in ``marks`` past the last step on disk of the closed writer session of ``rank``
        whose shards are numbered from ``first`` to before ``end``: per ``(site, split)`` where the marks name
        sites, else per ``(None, split)`` (marks of earlier versions: the last step of any site)."""
        last: dict[tuple[str | None, str], int] = {}
        for shard in self._shards:
            if shard.rank == rank and first <= shard.index < end:
                for (site, split), step in shard.last_steps.items():
                    key = (site, split) if marks.sites is not None else (None, split)
                    last[key] = max(step, last.get(key, step))
        if marks.sites is not None:
            queued = marks.sites
        else:
            queued = {(None, split): step for split, step in marks.queued.items()}
        return {key: mark for key, mark in queued.items() if last.get(key, -1) < mark}

    def _lose_unwritten_steps(self, rank: int, path: Path, marks: dict[tuple[str | None, str], int], end: float,
                              held: dict, closed: bool) -> None:
        """Lose what a session of ``rank`` queued and never wrote (it never closed), or wrote and no longer has on
        disk (it closed: a shard lost after its last one on disk): per site, the steps after its last one on disk
        (in shards before ``end``, the next session's first) up to its mark (``marks``: per ``(site, split)``, or
        per ``(None, split)`` for every site), and those that other ranks hold and this rank does not. One warning
        per cause and split, not one per step and site."""
        lost: dict[tuple[str, str], list[tuple[str, int]]] = defaultdict(list)  # (reason, split) -> (site, step)
        ranges: dict[tuple[str, str], list[tuple[str, int, int]]] = defaultdict(list)  # ... -> (site, first, last)
        for site, split in sorted(set(held) | {key for key in marks if key[0] is not None}):
            mark = marks.get((site, split), marks.get((None, split)))
            if mark is None:
                continue
            by_rank = held.get((site, split), {})
            own = by_rank.get(rank, [])
            last = max((step for index, step in own if index < end), default=-1)
            # A group of the site that cannot be read, in a shard of this session after its last record on disk,
            # stands for the steps after it already (its loss bounded there: see _bound_lost_shards).
            last_shard = max((index for index, step in own if index < end and step == last), default=-1)
            if any(loss.kind == "unreadable" and loss.rank == rank and loss.split in (None, split)
                   and last_shard < loss.shard_index < end for loss in self._index_losses.get(site, ())):
                continue
            # A later session of the rank (a fit resumed from a checkpoint) recorded its steps from here on anew.
            again = min((step for index, step in own if index >= end and step > last), default=mark + 1)
            upto = min(mark, again - 1)
            if last < upto:
                loss = self._lose_unwritten(path, rank, mark, closed, site, split, last + 1, upto)
                ranges[(loss.reason, split)].append((site, last + 1, upto))
            mine = {step for _, step in own}
            theirs = {step for other, rows in by_rank.items() if other != rank for _, step in rows}
            # Each loss names its step; the warning that sums a cause up names its steps.
            # A session that closed stopped by choice: other ranks may well go on.
            beside = set() if closed else self._steps_beside(rank, mark, by_rank) - mine
            for why, steps in ((_missing_after if closed else _queued_here, {t for t in theirs - mine if last < t <= mark}),
                               (_stopped_before, beside)):
                for step in sorted(steps):
                    reason = why(rank, mark, "this step", "the step's rows are")
                    self._lose_incomplete(path, rank, site, split, step, reason, warn=False)
                    lost[(why(rank, mark, "these steps", "their rows are"), split)].append((site, step))
        # A split of which no site is known (no shard of any rank names one: the writer killed before its first
        # shard reached the disk): lost as a whole, with no site.
        named = {split for site, split in held} | {split for site, split in marks if site is not None}
        for (site, split), mark in marks.items():
            if site is None and split not in named:
                self._lose_unwritten(path, rank, mark, closed, None, split, None, mark, warn=True)
        for (reason, split), where in ranges.items():
            self._warn("actpat: records lost in split %r, steps %d to %d, %d site(s) (by %s; each in `losses`): %s.",
                       split, min(lo for _, lo, _ in where), max(hi for _, _, hi in where), len(where), path, reason)
        for (reason, split), where in lost.items():
            steps = sorted({step for _, step in where})
            self._warn("actpat: records lost in split %r, %d step(s) from %d to %d, %d site(s) (by %s; each in "
                        "`losses`, left out of the analysis): %s.", split, len(steps), steps[0], steps[-1],
                        len({site for site, _ in where}), path, reason)

    def _lose_unwritten(self, path: Path, rank: int, mark: int, closed: bool, site: str | None, split: str,
                        first: int | None, last: int, warn: bool = False) -> Loss:
        """Lose steps ``first``..``last`` (``first`` None: unknown) of ``site`` (None: every site of the split, of
        which no shard on disk names one) that a writer session of ``rank`` queued up to ``mark``."""
        if closed:
            where = "no shard of it is on disk (deleted, or not copied?)" if site is None else (
                "its shards on disk end before: a shard after its last one is missing (deleted, or not copied?), or its "
                "last records were dropped")
            reason = f"rank {rank} queued records of steps up to {mark} and closed, but {where}"
        else:
            reason = (f"rank {rank} queued records of steps up to {mark} that never reached the disk (its writer was "
                      "killed or failed, or is still running)")
        loss = Loss(path, reason, rank, -1, site, split, kind="missing" if closed else "unwritten", steps=(first, last))
        self._lose(loss, warn)
        return loss

    def _steps_beside(self, rank: int, mark: int, by_rank: dict[int, list[tuple[int, int]]]) -> set[int]:
        """Steps after ``mark`` that other ranks recorded in a writer session of theirs that also recorded a step
        up to ``mark``: one that ran beside the stopped session of ``rank`` (in lockstep data parallelism, the
        step the others began when it died). Later sessions (a fit resumed on fewer ranks) are not beside it."""
        after = set()
        for other, rows in by_rank.items():
            if other == rank or other not in self._sessions:
                continue
            starts = [first for first, _, _ in self._sessions[other]]
            by_session: dict[int, list[int]] = defaultdict(list)
            for index, step in rows:
                by_session[bisect.bisect_right(starts, index)].append(step)
            for steps in by_session.values():
                if min(steps) <= mark:
                    after.update(step for step in steps if step > mark)
        return after

    def _lose_incomplete(self, path: Path, rank: int, site: str, split: str, step: int, reason: str,
                         warn: bool = True) -> None:
        self._lose_step(Loss(path, reason, rank, -1, site, split, step, None, "incomplete"), warn)

    def _lose_step(self, loss: Loss, warn: bool = True) -> None:
        """Lose the records of one site's step(s): also where reads and the reference checks look them up."""
        self._lose(loss, warn)
        self._index_losses[loss.site].append(loss)

    def _find_steps_missing_a_rank_unmarked(self, held: dict, skip: set[int]) -> None:
        """For ranks without a marks file (runs of earlier versions): lose the steps of a split, after a rank's
        first one, that the rank has no record of while another rank has them in an unfinalized shard, where
        the rank left an unfinalized shard too (the same crash, or writers still running). Steps in finalized
        shards are taken as whole. A rank with no record at all has no first step: a warning instead."""
        crashed = self._crashed - skip
        if not crashed:
            return
        partial = {(shard.rank, shard.index) for shard in self._shards if shard.partial}
        by_split: dict[str, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
        in_partial: dict[str, set[int]] = defaultdict(set)
        for (site, split), by_rank in held.items():
            for rank, rows in by_rank.items():
                for index, step in rows:
                    by_split[split][rank].add(step)
                    if (rank, index) in partial:
                        in_partial[split].add(step)
        mute = sorted(crashed - {rank for ranks in by_split.values() for rank in ranks})
        unfinalized = sorted(set().union(*in_partial.values()))
        if mute and unfinalized:
            self._warn(
                "actpat: rank(s) %s left unfinalized shards with no record on disk (killed before their first block "
                "was written?). Where they record the same steps as the other ranks (batch mode under data "
                "parallelism), steps %d..%d of the other ranks' unfinalized shards hold only those ranks' batches.",
                ", ".join(map(str, mute)), unfinalized[0], unfinalized[-1],
            )
        last_shard = {shard.rank: shard for shard in sorted(self._shards, key=lambda shard: shard.index)}
        for (site, split), by_rank in sorted(held.items()):
            ranks = by_split[split]
            if len(ranks) < 2:
                continue
            steps_here = {step for rows in by_rank.values() for _, step in rows}
            for rank in sorted(crashed & set(ranks)):
                first = min(ranks[rank])
                for step in sorted(s for s in (in_partial[split] & steps_here) - ranks[rank] if s > first):
                    self._lose_incomplete(last_shard[rank].path, rank, site, split, step, f"the step has no record "
                                          f"of rank {rank}, which records this split, while other ranks have: its rows "
                                          f"are only some ranks' batches (rank {rank}'s records of the step are not on "
                                          "disk: a process killed before its last block was written, or a writer "
                                          "still running)")

    def _report_unfinalized(self) -> None:
        """Warn of each unfinalized shard (and lose it whole where it is empty or damaged) with the reason its
        writer stored in the shard's stop file, if any: a full disk reads as such, not as a crash."""
        stopped = defaultdict(list)
        for stop in self.stop_reasons:
            parsed = schema.parse_stop_name(stop.path.name)
            if parsed is not None:
                stopped[parsed].append(stop.reason)
        for path, rank, index, loss in self._unfinalized:
            self._crashed.add(rank)
            why = "; ".join(stopped[(rank, index)])
            if loss is None:
                self._warn("actpat: reading the records that verify of unfinalized shard %s (%s).", path,
                            f"recording stopped: {why}" if why else "left by a crash?")
            else:
                self._lose(dataclasses.replace(loss, reason=loss.reason + (f" (recording stopped: {why})" if why else "")))
        self._unfinalized.clear()

    def _find_numbering_gaps(self) -> None:
        by_rank: dict[int, set[int]] = defaultdict(set)
        for name in os.listdir(self.path):
            parsed = schema.parse_shard_name(name) or schema.parse_stop_name(name)
            if parsed is not None:
                by_rank[parsed[0]].add(parsed[1])
        # A session that died before queuing anything leaves its marks file alone at its first index, which the
        # next session's writer then numbers after: no shard is missing there.
        for rank, sessions in self._sessions.items():
            unused = {first for first, _, marks in sessions if marks is not None and not marks.queued}
            if unused:  # (a rank whose only session has queued steps and no shard yet holds no index here)
                by_rank[rank] |= unused
        for rank, indices in sorted(by_rank.items()):
            for index in sorted(set(range(max(indices) + 1)) - indices):
                path = self.path / schema.shard_name(rank, index)
                self._lose(Loss(path, "the shard is missing (deleted?)", rank, index, kind="missing"))

    def _bound_lost_shards(self) -> None:
        """Bound the steps of a shard lost whole (missing) or of one site's group of it (unreadable), which the loss
        cannot name: reads of those steps count it in ``lost_records``, where the rows of the other ranks would
        otherwise read as the whole step. Only splits the rank has records of are bounded."""
        lost = [loss for loss in self.losses if loss.shard_index >= 0 and loss.step is None and loss.steps is None
                and (loss.kind == "missing" or (loss.kind == "unreadable" and loss.site is not None))]
        if not lost:
            return
        # (site, split, rank) -> shard indices and steps of its records, in index order
        around = {(site, split, rank): np.array(sorted(rows), dtype=np.int64).reshape(-1, 2)
                  for (site, split), by_rank in self._held().items() for rank, rows in by_rank.items()}
        splits = defaultdict(set)
        for _, split, rank in around:
            splits[rank].add(split)
        indices = np.array([shard.index for shard in self._shards], dtype=np.int64)
        final: dict[tuple[str, int], bool] = {}
        for loss in lost:
            for site in [loss.site] if loss.site is not None else list(self._info):
                for split in sorted(splits[loss.rank]):
                    rows = around.get((site, split, loss.rank), np.zeros((0, 2), dtype=np.int64))
                    steps = self._steps_around(loss, site, split, rows, indices, final)
                    if steps is not None:
                        self._index_losses[site].append(dataclasses.replace(loss, site=site, split=split, steps=steps))

    def _steps_around(self, loss: Loss, site: str, split: str, rows: np.ndarray, indices: np.ndarray,
                      final: dict[tuple[str, int], bool]) -> tuple[int | None, int | None] | None:
        """The steps of ``site`` in ``split`` that the shard of ``loss`` may have held (None: none), from ``rows``,
        the rank's ``(shard index, step)`` of the site and split in index order. A rank writes a site's records of
        a split in step order, parts in order: from its last step in the shards before to its first in those after
        (None: none), each left out where step tracking shows that the lost shard held no part of it (the part
        before ends the step, the part after begins it, or the two are consecutive parts of one step; a part lost
        in the middle of a step is found by :meth:`_find_incomplete_steps` as well)."""
        cut = np.searchsorted(rows[:, 0], loss.shard_index)
        after = np.searchsorted(rows[:, 0], loss.shard_index, side="right")
        lo = int(rows[:cut, 1].max()) if cut else None
        hi = int(rows[after:, 1].min()) if after < len(rows) else None
        code = self._split_codes.get(split.encode())
        if code is None or not self._step_parts.get((site, loss.rank)):
            return lo, hi
        parts = np.concatenate(self._step_parts[(site, loss.rank)])
        parts, index = parts[parts["split"] == code], indices[parts["shard"][parts["split"] == code]]
        last = parts[(parts["step"] == lo) & (index < loss.shard_index)] if lo is not None else parts[:0]
        first = parts[(parts["step"] == hi) & (index > loss.shard_index)] if hi is not None else parts[:0]
        if lo == hi and len(last) and len(first) and first["part"].min() == last["part"].max() + 1:
            return None
        if last["ends_step"].any():
            if (site, code) not in final:
                final[(site, code)] = self._ends_are_final(site, code)
            lo += final[(site, code)]
        if (first["part"] == 0).any():
            hi -= 1
        return (lo, hi) if lo is None or hi is None or lo <= hi else None

    def _ends_are_final(self, site: str, code: int) -> bool:
        """Whether no rank's records of ``site`` in the split (as a code) have a part after one that ends its step:
        a step captured again after a capture that ended it (``ends_step=True``, the default, given to both) makes
        an end no proof that nothing of the step follows."""
        for (other, _), arrays in self._step_parts.items():
            if other != site:
                continue
            rows = np.concatenate(arrays)
            rows = rows[rows["split"] == code]
            steps, inverse = np.unique(rows["step"], return_inverse=True)
            top = np.full(len(steps), -1, dtype=np.int64)
            np.maximum.at(top, inverse, rows["part"])
            ended = rows["ends_step"] == 1
            if (rows["part"][ended] < top[inverse[ended]]).any():
                return False
        return True

    # ------------------------------------------------------------------ queries
    @property
    def shards(self) -> list[Path]:
        """Paths of the indexed shards (a ``.partial`` one is replaced by its final name once finalized)."""
        return [shard.path for shard in self._shards]

    @property
    def shard_infos(self) -> list[ShardInfo]:
        """Per indexed shard: rank, index, format version, finalized, codec, dropped records."""
        return list(self._shard_infos)

    @property
    def format_versions(self) -> dict[Path, int]:
        """Format version of each indexed shard (a run may mix versions after an upgrade)."""
        return {info.path: info.format_version for info in self._shard_infos}

    @property
    def format_version(self) -> int:
        """Newest format version among the shards (the library's own if there are none)."""
        return max(self.format_versions.values(), default=schema.FORMAT_VERSION)

    @property
    def corrupt_records(self) -> int:
        """Records skipped because they failed their checksum or bounds (known so far: reading verifies;
        :meth:`verify` checks every record)."""
        return sum(loss.records or 0 for loss in self.losses if loss.kind == "corrupt")

    @property
    def sites(self) -> list[str]:
        """Site names in forward order."""
        return sorted(self._info, key=lambda s: self._info[s]["site_index"])

    @property
    def splits(self) -> list[str]:
        """Names of the recorded splits, sorted."""
        return sorted({split for _, split in self._entries})

    def resolve_split(self, split: str | None = None, *, name: str = "`split`") -> str:
        """The split a query means: ``None`` is the run's only split; a named split must be recorded.

        ``name`` is what messages call the argument (the command line says ``--split``).

        Raises
        ------
        ValueError
            ``split`` is None and the run has several splits (or none), or ``split`` was not recorded.
        """
        splits = self.splits
        if split is None:
            if len(splits) == 1:
                return splits[0]
            if not splits:
                raise ValueError(
                    f"Expected a run with at least one recorded split, but {self.path} has no records.{self._all_lost()}"
                )
            example = f"{name} {splits[0]}" if name.startswith("--") else f"{name.strip('`')}={splits[0]!r}"
            raise ValueError(
                f"Expected {name} to name one of the recorded splits {splits}, but got None "
                f"(the run has several splits: pass {example}, for example)."
            )
        if not isinstance(split, str):
            raise ValueError(f"Expected {name} to be a str or None, but got {split!r}.")
        if split not in splits:
            lost = self._all_lost() if not splits else ""
            raise ValueError(f"Expected {name} to be one of the recorded splits {splits}, but got {split!r}.{lost}")
        return split

    def _all_lost(self) -> str:
        """For a run without records: that its records are lost, naming the first loss; "" if none is known."""
        if not self.losses:
            return ""
        first = self.losses[0]
        return (f" Every record it held is lost: {len(self.losses)} loss(es), the first: {first.path.name} "
                f"({first.reason}); `actpat info` lists them.")

    def site_info(self, site: str) -> dict:
        """``module_type``, ``shape`` (without batch), ``n_units``, ``pattern``, ``site_index`` and
        ``value_units`` (units with stored float16 values, or None) of a site."""
        self._check_site(site)
        return dict(self._info[site])

    def steps(self, site: str, split: str | None = None) -> np.ndarray:
        """Sorted distinct steps recorded for ``site`` in ``split`` (see :meth:`resolve_split`)."""
        split = self.resolve_split(split)
        self._check_site(site)
        return np.unique(np.array([e.step for e in self._entries.get((site, split), [])], dtype=np.int64))

    def n_observations(self, site: str, split: str | None = None) -> int:
        """Total observations (rows) of ``site`` in ``split``, as indexed (before verification)."""
        split = self.resolve_split(split)
        self._check_site(site)
        return sum(e.row_count for e in self._entries.get((site, split), []))

    def step_observations(self, site: str, split: str | None = None) -> dict[int, int]:
        """Observations (rows) of ``site`` at each recorded step of ``split``, as indexed (no data read), for
        the steps no known loss may touch: what :meth:`read` returns for them unless verification fails."""
        split = self.resolve_split(split)
        self._check_site(site)
        rows: dict[int, int] = {}
        for e in self._entries.get((site, split), []):
            rows[e.step] = rows.get(e.step, 0) + e.row_count
        return {step: n for step, n in rows.items() if not self._index_losses_at(site, split, step)}

    def read(self, site: str, step: int, split: str | None = None) -> Patterns:
        """All observations of ``site`` at ``step`` in ``split``, from every shard and rank.

        Records that fail verification are left out, with a warning (see :attr:`losses`), and counted
        in the result's ``lost_records``, as are records lost before reading that may belong to this step
        (a records-table row that fails its checksum counts for every step between its sound
        neighbours'; a record listed twice, as in a lost shard and as its step cut short, counts once); if
        none verifies the result has no rows.
        """
        split = self.resolve_split(split)
        self._check_site(site)
        entries = self._step_entries(site, split, step)
        if not entries:
            raise KeyError(
                f"Expected a recorded step of site {site!r} in split {split!r}, but step {step} has no record; "
                f"recorded steps: {self.steps(site, split).tolist()}."
                + self._damage_note(site, lambda loss: loss.may_hold(site, split, step)
                                    or (loss.split in (None, split) and loss.step is loss.steps is None))
            )
        parts = [p for p in (self._read_entry(site, e) for e in entries) if p is not None]
        patterns = _concat(parts) if parts else self._empty(site, entries[0])
        lost = len(entries) - len(parts)
        lost += _count_lost(self._index_losses_at(site, split, step))
        return dataclasses.replace(patterns, lost_records=lost) if lost else patterns

    def _index_losses_at(self, site: str, split: str, step: int) -> list[Loss]:
        """The losses found while indexing that may hold records of ``site`` at ``step`` of ``split``."""
        return [loss for loss in self._index_losses.get(site, ()) if loss.may_hold(site, split, step)]

    def iter_chunks(self, site: str, split: str | None = None, max_rows: int = 1_000_000) -> Iterator[Patterns]:
        """Yield the observations of ``site`` in step order, at most ``max_rows`` rows at a time.

        Each chunk belongs to one step; a step may span several chunks. Memory is proportional to
        ``max_rows`` whatever the size of the run: a record larger than that is verified in a first
        pass of ``max_rows``-row slices, then read again chunk by chunk.
        """
        split = self.resolve_split(split)
        self._check_site(site)
        if max_rows < 1:
            raise ValueError(f"Expected `max_rows` to be at least 1, but got {max_rows}.")
        for entry in self._entries.get((site, split), []):
            if entry.row_count <= max_rows:
                part = self._read_entry(site, entry)
                if part is not None:
                    yield part
                continue
            if not self._verify_entry(site, entry, max_rows):
                continue
            for start in range(0, entry.row_count, max_rows):
                part = self._guarded_load(site, entry, start, min(start + max_rows, entry.row_count))
                if part is None:
                    break
                yield part

    def verify(self, progress: bool = False) -> list[Loss]:
        """Check every record against its checksum (bounded memory); returns :attr:`losses`.

        Parameters
        ----------
        progress : bool, default False
            Show a progress bar over records.
        """
        from tqdm.auto import tqdm

        work = [(site, e) for (site, _), entries in self._entries.items() for e in entries]
        for site, entry in tqdm(work, disable=not progress, desc="actpat verify", unit="record"):
            self._verify_entry(site, entry, _VERIFY_ROWS)
        return self.losses

    def start_lost(self, site: str, split: str | None = None) -> list[Loss]:
        """Losses that may hold the first record of ``site`` in ``split`` (e.g. an ``init`` probe).

        Empty when the first recorded step is readable and nothing lost can precede it: a lost record
        of the same site and split with a step at or before it, or a lost shard (or site group) of a
        rank that had not yet recorded this site and split in an earlier shard. The first step's
        records are read to verify them.
        """
        split = self.resolve_split(split)
        self._check_site(site)
        entries = self._entries.get((site, split), [])
        first = None
        for step in dict.fromkeys(e.step for e in entries):
            if len(self.read(site, step, split)):
                first = step
                break
        earliest: dict[int, int] = {}
        for e in entries:
            if e not in self._lost_entries:
                rank, index = self._shards[e.shard].rank, self._shards[e.shard].index
                earliest[rank] = min(earliest.get(rank, index), index)
        lost = []
        for loss in self.losses:
            if loss.site not in (None, site) or loss.split not in (None, split):
                continue
            if loss.step is not None:
                if first is None or loss.step <= first:
                    lost.append(loss)
            elif loss.steps is not None:
                if loss.steps[0] is None or first is None or loss.steps[0] <= first:
                    lost.append(loss)
            elif earliest.get(loss.rank, loss.shard_index + 1) >= loss.shard_index:
                lost.append(loss)
        return lost

    def _step_entries(self, site: str, split: str, step: int) -> list[_Entry]:
        entries = self._entries.get((site, split), [])
        steps = self._steps_cache.get((site, split))
        if steps is None:
            steps = self._steps_cache[(site, split)] = [e.step for e in entries]
        return entries[bisect.bisect_left(steps, step) : bisect.bisect_right(steps, step)]

    def _check_site(self, site: str) -> None:
        if site not in self._info:
            raise KeyError(
                f"Expected one of the recorded sites {self.sites}, but got {site!r}."
                + self._damage_note(site, lambda loss: True)
            )

    def _damage_note(self, site: str, may_hold: Callable[[Loss], bool]) -> str:
        """Where records asked for may have been lost: losses of ``site`` that ``may_hold`` them, else
        shards that cannot be read, are missing or were never written (any site's records may have been
        there); "" if none."""
        named = [loss for loss in self.losses if loss.site == site and may_hold(loss)]
        if named:
            return (f" Records of {site!r} may be in damaged parts of the run: {len(named)} loss(es), the first "
                    f"{named[0].path.name}: {named[0].reason}. See `losses` (or `actpat info --verify`).")
        unknown = [loss for loss in self.losses if loss.site is None and loss.kind != "corrupt"]
        if unknown:
            return (f" {len(unknown)} shard(s) of the run cannot be read, are missing or never reached the disk "
                    f"(the first {unknown[0].path.name}: {unknown[0].reason}); records of {site!r} may have been "
                    "there. See `losses` (or `actpat info --verify`).")
        return ""

    # ------------------------------------------------------------------ reading records
    def _empty(self, site: str, e: _Entry) -> Patterns:
        n_bytes = (self._info[site]["n_units"] + 7) // 8
        empty = np.zeros(0, dtype=np.int64)
        values = self._info[site]["value_units"]
        return Patterns(
            site=site, step=e.step, epoch=e.epoch, split=e.split, n_units=self._info[site]["n_units"],
            bits=np.zeros((0, n_bytes), dtype=np.uint8), labels=empty, sample_ids=empty.copy(), positions=empty.copy(),
            nan_count=0, values=None if values is None or e.value_start < 0 else np.zeros((0, len(values)), np.float16),
        )  # fmt: skip

    def _read_entry(self, site: str, e: _Entry) -> Patterns | None:
        """A whole record, verified; None (after a warning) if it fails."""
        if e in self._lost_entries:
            return None
        try:
            patterns, crc = self._load(site, e, 0, e.row_count, with_crc=e.crc >= 0)
        except Exception as exc:  # noqa: BLE001 - whatever a damaged file raises: the record is lost
            self._lose_entry(site, e, f"it cannot be read ({_short(exc)})")
            return None
        if e.crc >= 0 and crc != e.crc:
            self._lose_entry(site, e, "it fails its checksum")
            return None
        return patterns

    def _guarded_load(self, site: str, e: _Entry, lo: int, hi: int) -> Patterns | None:
        try:
            return self._load(site, e, lo, hi, with_crc=False)[0]
        except Exception as exc:  # noqa: BLE001
            self._lose_entry(site, e, f"it cannot be read ({_short(exc)})")
            return None

    def _verify_entry(self, site: str, e: _Entry, max_rows: int) -> bool:
        """Check a record's checksum reading at most ``max_rows`` rows at a time."""
        if e in self._lost_entries:
            return False
        if e.crc < 0:
            return True
        try:
            crc = e.row_crc
            for name, start, count in self._columns_of(e):
                for lo in range(0, count, max_rows):
                    crc = schema.crc_update(crc, self._rows(e.shard, e.key, name, start + lo, start + min(count, lo + max_rows)))
        except Exception as exc:  # noqa: BLE001
            self._lose_entry(site, e, f"it cannot be read ({_short(exc)})")
            return False
        if crc != e.crc:
            self._lose_entry(site, e, "it fails its checksum")
            return False
        return True

    def _lose_entry(self, site: str, e: _Entry, reason: str) -> None:
        self._lost_entries.add(e)
        shard = self._shards[e.shard]
        self._lose(Loss(shard.path, reason, shard.rank, shard.index, site, e.split, e.step, 1, "corrupt"))

    def _columns_of(self, e: _Entry) -> list[tuple[str, int, int]]:
        """``(dataset, start, count)`` of a record's data in checksum order."""
        columns = [(schema.BITS, e.row_start, e.row_count), (schema.SAMPLE_IDS, e.sample_start, e.sample_count),
                   (schema.LABELS, e.sample_start, e.sample_count)]  # fmt: skip
        if e.obs_start >= 0:
            columns.append((schema.OBS_INDEX, e.obs_start, e.row_count))
        if e.value_start >= 0:
            columns.append((schema.VALUES, e.value_start, e.row_count))
        return columns

    def _load(self, site: str, e: _Entry, lo: int, hi: int, with_crc: bool) -> tuple[Patterns, int]:
        rows = lambda name, start, a, b: self._rows(e.shard, e.key, name, start + a, start + b)  # noqa: E731
        bits = rows(schema.BITS, e.row_start, lo, hi)
        obs = np.arange(lo, hi, dtype=np.int64) if e.obs_start < 0 else rows(schema.OBS_INDEX, e.obs_start, lo, hi)
        values = None if e.value_start < 0 else rows(schema.VALUES, e.value_start, lo, hi)
        crc = 0
        if with_crc:  # the whole record: all of its per-sample arrays are needed anyway
            sample_lo, sample_hi = 0, e.sample_count
        elif len(obs):  # rows are sample-major (obs_index is sorted): only the samples they touch
            sample_lo, sample_hi = int(obs[0]) // e.n_positions, int(obs[-1]) // e.n_positions + 1
        else:
            sample_lo = sample_hi = 0
        labels = rows(schema.LABELS, e.sample_start, sample_lo, sample_hi)
        sample_ids = rows(schema.SAMPLE_IDS, e.sample_start, sample_lo, sample_hi)
        if with_crc:
            columns = [bits, sample_ids, labels] + [a for a, present in ((obs, e.obs_start >= 0),
                                                                         (values, e.value_start >= 0)) if present]
            crc = schema.record_crc(e.row_crc, columns)
        sample_row = obs // e.n_positions - sample_lo
        if len(sample_row) and (sample_row.min() < 0 or sample_row.max() >= len(labels)):
            raise ValueError(f"obs_index points outside the record's {e.sample_count} samples")
        patterns = Patterns(
            site=site, step=e.step, epoch=e.epoch, split=e.split, n_units=self._info[site]["n_units"],
            bits=bits, labels=labels[sample_row], sample_ids=sample_ids[sample_row],
            positions=obs % e.n_positions, nan_count=e.nan_count if lo == 0 else 0, values=values,
        )  # fmt: skip
        return patterns, crc


def _concat(parts: list[Patterns]) -> Patterns:
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    return Patterns(
        site=first.site, step=first.step, epoch=first.epoch, split=first.split, n_units=first.n_units,
        bits=np.concatenate([p.bits for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        sample_ids=np.concatenate([p.sample_ids for p in parts]),
        positions=np.concatenate([p.positions for p in parts]),
        nan_count=sum(p.nan_count for p in parts),
        values=None if any(p.values is None for p in parts) else np.concatenate([p.values for p in parts]),
    )


# ---------------------------------------------------------------------- validation helpers
def _attr(attrs: Any, name: str, kind: type, default: Any = None) -> Any:
    """An attribute converted to ``kind``, or ``default`` if absent; a wrong type raises ValueError."""
    if name not in attrs:
        return default
    value = attrs[name]
    if kind is str:
        if isinstance(value, bytes):
            value = value.decode()
        if not isinstance(value, str):
            raise ValueError(f"its attribute {name!r} is {value!r}, not a string")
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"its attribute {name!r} is {value!r}, not an integer")
    return int(value)


def _site_meta(group: Any) -> dict:
    attrs = dict(group.attrs.items())  # one read of each attribute (h5py reads again on every lookup)
    site = _attr(attrs, "site", str)
    if site is None:
        raise ValueError("it has no 'site' attribute")
    n_units = _attr(attrs, "n_units", int)
    if n_units is None or not 1 <= n_units <= _MAX_UNITS:
        raise ValueError(f"its n_units is {attrs.get('n_units')!r}, not between 1 and {_MAX_UNITS}")
    pattern = _attr(attrs, "pattern", str)
    if pattern not in schema.PATTERN_KINDS:
        raise ValueError(f"its pattern is {pattern!r}, not one of {schema.PATTERN_KINDS}")
    shape = np.asarray(attrs.get("shape", ()))
    if shape.ndim != 1 or shape.dtype.kind not in "iu" or len(shape) > 32:
        raise ValueError(f"its shape attribute is {shape!r}")
    value_units = None
    if "value_units" in attrs:
        units = np.asarray(attrs["value_units"])
        if units.ndim != 1 or units.dtype.kind not in "iu" or not len(units) or units.min() < 0 or units.max() >= n_units:
            raise ValueError(f"its value_units attribute is not a list of units below n_units={n_units}")
        value_units = tuple(int(u) for u in units)
    return {
        "site": site,
        "module_type": _attr(attrs, "module_type", str, "?"),
        "shape": tuple(int(s) for s in shape),
        "n_units": n_units,
        "pattern": pattern,
        "site_index": _attr(attrs, "site_index", int, 0),
        "value_units": value_units,
    }


def _check_column(dataset: Any, name: str, ndim: int, width: int | None = None) -> None:
    if not isinstance(dataset, h5py.Dataset):
        raise ValueError(f"its {name!r} dataset is missing")
    expected = schema.COLUMN_DTYPES[name]
    if dataset.ndim != ndim or dataset.dtype.kind != expected.kind or dataset.dtype.itemsize != expected.itemsize:
        raise ValueError(f"its {name!r} dataset has shape {dataset.shape} and dtype {dataset.dtype}")
    if width is not None and dataset.shape[1] != width:
        raise ValueError(f"its {name!r} dataset is {dataset.shape[1]} wide where {width} was expected")


def _stored_rows(dataset: Any) -> int:
    """Leading rows of ``dataset`` backed by chunks that exist in the file.

    A crash or a crafted file can leave a dataset's declared extent ahead of its stored chunks; rows
    past the stored ones would read as fill values, so nothing past them is read or allocated.
    """
    n = dataset.shape[0]
    if n == 0:
        return 0
    chunks = dataset.chunks
    if chunks is None:  # contiguous or compact: stored whole, as large as declared
        return n if dataset.id.get_storage_size() >= dataset.size * dataset.dtype.itemsize else 0
    chunk_rows = chunks[0]
    needed = -(-n // chunk_rows)
    stored = dataset.id.get_num_chunks()
    if stored >= needed and all(c == s for c, s in zip(chunks[1:], dataset.shape[1:])):
        return n
    present = set()
    for i in range(stored):
        offset = dataset.id.get_chunk_info(i).chunk_offset
        if all(o == 0 for o in offset[1:]):
            present.add(offset[0] // chunk_rows)
    leading = 0
    while leading in present:
        leading += 1
    return min(n, leading * chunk_rows)


def not_a_run_dir(path: Path) -> OSError:
    """The error for a run path that is no directory: ``NotADirectoryError`` for a file (a shard file: its folder
    named), ``FileNotFoundError`` for a path that does not exist."""
    expected = f"Expected a run directory of actpat shards, but {str(path)!r}"
    fix = "Pass the `out_dir` given to the recorder or callback."
    if not path.exists():
        return FileNotFoundError(f"{expected} does not exist. {fix}")
    if schema.parse_shard_name(path.name) is not None:
        fix = f"Pass the folder that holds it and the run's other shards, {str(path.parent)!r}."
        return NotADirectoryError(f"{expected} is a shard file. {fix}")
    return NotADirectoryError(f"{expected} is a file, not a directory. {fix}")


def find_runs(path: str | os.PathLike, depth: int = 4) -> list[Path]:
    """Run directories (directories holding shards) at most ``depth`` levels below ``path``, itself included.

    A run directory holds no other run: the search does not descend below one. Sorted by path.
    """
    path, found = Path(path), []
    for dirpath, dirnames, filenames in os.walk(path):
        if any(schema.parse_shard_name(name) for name in filenames):
            found.append(Path(dirpath))
            dirnames.clear()
        elif len(Path(dirpath).relative_to(path).parts) >= depth:
            dirnames.clear()
        dirnames.sort()
    return found


def _refuse_a_folder_above_runs(path: Path) -> None:
    """A directory without shards whose subdirectories hold runs (e.g. a Lightning log folder) is an error
    that names them: reading it as an empty run would be a silent empty result."""
    found = [run for run in find_runs(path) if run != path]  # shards appearing in `path` meanwhile are its own
    if found:
        raise ShardFormatError(
            f"Expected the shards of a run in {path}, but it holds none; its subdirectories hold "
            f"{'a run' if len(found) == 1 else 'runs'}: {', '.join(map(str, found))}. Pass the run directory itself."
        )


def _step_bracket(known: np.ndarray, index: int) -> tuple[int | None, int | None]:
    """Steps a record at ``index`` of a records table may have: between the sound rows around it.

    ``known`` holds ``(index, step)`` of the table's sound rows, ascending by index. Steps are recorded
    in time order, so the record's step lies between its neighbours' (either bound None where there is
    no neighbour on that side)."""
    at = int(np.searchsorted(known[:, 0], index))
    before = int(known[at - 1, 1]) if at > 0 else None
    after = int(known[at, 1]) if at < len(known) else None
    if before is not None and after is not None and before > after:
        before, after = after, before
    return before, after


def _valid_rows(table: np.ndarray, extents: dict[str, int], has_values: bool) -> np.ndarray:
    """Mask of records-table rows that point inside the stored data (no arithmetic can overflow)."""
    names = table.dtype.names
    rs, rc = table["row_start"].astype(np.int64), table["row_count"].astype(np.int64)
    ss, sc = table["sample_start"].astype(np.int64), table["sample_count"].astype(np.int64)
    os_, npos = table["obs_start"].astype(np.int64), table["n_positions"].astype(np.int64)
    vs = table["value_start"].astype(np.int64) if "value_start" in names else np.full(len(table), -1)
    n_rows, n_samples = extents[schema.BITS], min(extents[schema.SAMPLE_IDS], extents[schema.LABELS])
    n_obs, n_values = extents[schema.OBS_INDEX], extents[schema.VALUES] if has_values else 0
    ok = (rs >= 0) & (rc >= 0) & (rc <= n_rows) & (rs <= n_rows - rc)
    ok &= (ss >= 0) & (sc >= 0) & (sc <= n_samples) & (ss <= n_samples - sc)
    ok &= (npos >= 1) & (table["nan_count"] >= 0)
    safe_npos = np.maximum(npos, 1)
    full = (os_ == -1) & (rc % safe_npos == 0) & (rc // safe_npos == sc)
    sub = (os_ >= 0) & (rc <= n_obs) & (os_ <= n_obs - rc) & ((rc + safe_npos - 1) // safe_npos <= sc)
    ok &= full | sub
    ok &= (vs == -1) | ((vs >= 0) & (rc <= n_values) & (vs <= n_values - rc))
    splits = table["split"]
    ok &= np.array([_decodes(s) for s in splits], dtype=bool) if len(splits) else np.zeros(0, bool)
    return ok


def _finalized_since(path: Path) -> Path | None:
    """The final file of a ``.partial`` shard that its writer finalized since the run listed or indexed it (a run
    read while it trains); None if ``path`` is no ``.partial`` shard or was not finalized."""
    if not path.name.endswith(schema.PARTIAL_SUFFIX):
        return None
    final = path.with_name(path.name[: -len(".partial")])
    return final if final.exists() else None


def _is_empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except OSError:
        return False  # opening it says why


def _decodes(split: bytes) -> bool:
    try:
        split.decode()
    except UnicodeDecodeError:
        return False
    return True


def _split(row: np.void) -> str:
    return bytes(row["split"]).decode(errors="replace")


def _unescape(key: str) -> str:
    return key.replace("%2F", "/").replace("%25", "%")


def _count_lost(losses: list[Loss]) -> int:
    """Records lost at one step, from the ``losses`` that may hold them. Per rank: the losses of its shards (or of
    groups or rows in them) are distinct records; a loss found from step numbering or marks (no shard: a step cut
    short, missing a rank, past the shards on disk) is the same absence seen another way, counted once and not again
    where a lost shard of the rank explains it."""
    by_rank: dict[Any, tuple[int, int]] = {}
    for loss in losses:
        in_shards, seen = by_rank.get(loss.rank, (0, 0))
        n = loss.records or 1
        of_a_shard = loss.shard_index >= 0 and loss.kind != "incomplete"  # (an incomplete step names a shard it is in)
        by_rank[loss.rank] = (in_shards + n, seen) if of_a_shard else (in_shards, max(seen, n))
    return sum(max(in_shards, seen) for in_shards, seen in by_rank.values())


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:300]


def _shard_order(name: str) -> tuple:
    parsed = schema.parse_shard_name(name)
    return (0, parsed[0], parsed[1], name) if parsed else (1, 0, 0, name)


__all__ = ["Loss", "Patterns", "Run", "ShardFormatError", "ShardInfo", "StopReason", "open_run"]
