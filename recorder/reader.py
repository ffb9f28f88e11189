"""Read a run directory of activation-pattern shards (torch-free: the analysis package imports it)."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from actpat.recorder import schema

log = logging.getLogger(__name__)


class ShardFormatError(ValueError):
    """A file in a run directory is not a readable actpat shard of a known format version."""


@dataclass
class Patterns:
    """Observations of one site at one time point.

    Attributes
    ----------
    bits : np.ndarray
        ``(n, ceil(n_units / 8))`` uint8, packed little-endian (unit j = bit j % 8 of byte j // 8).
    n_units : int
    labels, sample_ids : np.ndarray
        ``(n,)`` int64 per observation, ``-1`` where unknown.
    positions : np.ndarray
        ``(n,)`` int64 flattened spatial index of each observation (0 for dense layers and ``flat``).
    values : np.ndarray or None
        ``(n, k)`` float16 pre-activations of the site's ``value_units`` where the recorder stored them
        (``store_values``), else None.
    site, step, epoch, split, nan_count
        Where the observations come from; ``nan_count`` counts NaN pre-activations (stored as off).
    """

    site: str
    step: int
    epoch: int
    split: str
    n_units: int
    bits: np.ndarray
    labels: np.ndarray
    sample_ids: np.ndarray
    positions: np.ndarray
    nan_count: int
    values: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.bits)

    def unpack(self) -> np.ndarray:
        """``(n, n_units)`` bool matrix of on (True) / off (False) units."""
        return np.unpackbits(self.bits, axis=-1, count=self.n_units, bitorder="little").astype(bool)


@dataclass(frozen=True)
class _Entry:
    path: Path
    key: str
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


def open_run(path: str | os.PathLike) -> "Run":
    """Open a run directory written by :class:`~actpat.recorder.ActivationRecorder`.

    Finalized shards (``*.h5``) of every rank are read; the flushed part of an unfinalized shard
    (``*.h5.partial``, left by a crash or a run still writing) is read with a warning.

    Raises
    ------
    FileNotFoundError
        The directory does not exist.
    ShardFormatError
        A shard is not an actpat shard or was written by a newer format version.
    """
    return Run(path)


class Run:
    """Index of all records in a run directory; data is read lazily, shard by shard."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(
                f"Expected a run directory of actpat shards, but {str(self.path)!r} does not exist or is not a "
                "directory. Pass the `out_dir` given to the recorder or callback."
            )
        self.shards: list[Path] = []
        self.dropped_records = 0
        self.format_version = schema.FORMAT_VERSION
        self._info: dict[str, dict] = {}
        self._entries: dict[tuple[str, str], list[_Entry]] = defaultdict(list)
        for name in sorted(os.listdir(self.path), key=_shard_order):
            if name.endswith((schema.SHARD_SUFFIX, schema.PARTIAL_SUFFIX)):
                self._index_shard(self.path / name, partial=name.endswith(schema.PARTIAL_SUFFIX))
        for entries in self._entries.values():
            entries.sort(key=lambda e: e.step)  # stable: shard order kept within a step

    # ------------------------------------------------------------------ index
    def _index_shard(self, path: Path, partial: bool) -> None:
        if not partial:
            self._index_file(path, partial=False)
            return
        # An unfinalized shard may be damaged anywhere (a process killed mid-write): whatever fails
        # while indexing it skips the whole file with a warning, never raises.
        try:
            self._index_file(path, partial=True)
        except Exception as exc:  # noqa: BLE001
            log.warning("actpat: skipping unfinalized shard %s: it cannot be read (%s).", path, exc)

    def _index_file(self, path: Path, partial: bool) -> None:
        try:
            handle = h5py.File(path, "r", locking=False)
        except OSError as exc:
            if partial:
                raise
            raise ShardFormatError(
                f"Expected {path} to be an HDF5 actpat shard, but it cannot be opened ({exc}). Move the file "
                "out of the run directory if it does not belong there; a damaged shard cannot be repaired."
            ) from exc
        with handle:
            if handle.attrs.get("format") != schema.FORMAT_NAME:
                raise ShardFormatError(
                    f"Expected {path} to be an actpat shard (attribute format={schema.FORMAT_NAME!r}), but it "
                    "is not. Move it out of the run directory."
                )
            version = int(handle.attrs.get("format_version", -1))
            if version > schema.FORMAT_VERSION:
                raise ShardFormatError(
                    f"Expected shard format version <= {schema.FORMAT_VERSION}, but {path} has version {version}. "
                    "Upgrade actpat to read it."
                )
            # Index the whole file before keeping anything of it, so a failure leaves no half shard.
            infos, entries = {}, []
            for key, group in handle[schema.SITES_GROUP].items():
                self._index_site(path, key, group, infos, entries)
            dropped = int(handle.attrs.get("dropped_records", 0))
            if partial or not handle.attrs.get("finalized", False):
                log.warning("actpat: reading the flushed part of unfinalized shard %s (left by a crash?).", path)
        self.shards.append(path)
        self.dropped_records += dropped
        for site, info in infos.items():
            self._info.setdefault(site, info)
        for index_key, entry in entries:
            self._entries[index_key].append(entry)

    def _index_site(self, path: Path, key: str, group: h5py.Group, infos: dict, entries: list) -> None:
        site = str(group.attrs["site"])
        infos[site] = {
            "module_type": str(group.attrs["module_type"]),
            "shape": tuple(int(s) for s in group.attrs["shape"]),
            "n_units": int(group.attrs["n_units"]),
            "pattern": str(group.attrs["pattern"]),
            "site_index": int(group.attrs["site_index"]),
            "value_units": tuple(int(u) for u in group.attrs["value_units"]) if "value_units" in group.attrs else None,
        }
        n_rows = group[schema.BITS].shape[0]
        n_samples = group[schema.SAMPLE_IDS].shape[0]
        n_obs = group[schema.OBS_INDEX].shape[0]
        n_values = group[schema.VALUES].shape[0] if schema.VALUES in group else 0
        records = group[schema.RECORDS][()]
        # Version 1 shards have no values.
        value_starts = records["value_start"] if "value_start" in records.dtype.names else np.full(len(records), -1)
        for rec, value_start in zip(records, value_starts):
            # A record whose rows were not flushed before a crash is ignored.
            if (
                rec["row_start"] + rec["row_count"] > n_rows
                or rec["sample_start"] + rec["sample_count"] > n_samples
                or (rec["obs_start"] >= 0 and rec["obs_start"] + rec["row_count"] > n_obs)
                or (value_start >= 0 and value_start + rec["row_count"] > n_values)
            ):
                continue
            entry = _Entry(
                path, key, int(rec["step"]), int(rec["epoch"]), int(rec["row_start"]), int(rec["row_count"]),
                int(rec["sample_start"]), int(rec["sample_count"]), int(rec["obs_start"]),
                int(rec["n_positions"]), int(rec["nan_count"]), int(value_start),
            )
            entries.append(((site, rec["split"].decode()), entry))

    # ------------------------------------------------------------------ queries
    @property
    def sites(self) -> list[str]:
        """Site names in forward order."""
        return sorted(self._info, key=lambda s: self._info[s]["site_index"])

    @property
    def splits(self) -> list[str]:
        """Names of the recorded splits, sorted."""
        return sorted({split for _, split in self._entries})

    def site_info(self, site: str) -> dict:
        """``module_type``, ``shape`` (without batch), ``n_units``, ``pattern``, ``site_index`` and
        ``value_units`` (units with stored float16 values, or None) of a site."""
        self._check_site(site)
        return dict(self._info[site])

    def steps(self, site: str, split: str = "train") -> np.ndarray:
        """Sorted distinct steps recorded for ``site`` in ``split``."""
        self._check_site(site)
        return np.unique(np.array([e.step for e in self._entries.get((site, split), [])], dtype=np.int64))

    def n_observations(self, site: str, split: str = "train") -> int:
        """Total observations (rows) of ``site`` in ``split``."""
        self._check_site(site)
        return sum(e.row_count for e in self._entries.get((site, split), []))

    def read(self, site: str, step: int, split: str = "train") -> Patterns:
        """All observations of ``site`` at ``step`` in ``split``, from every shard and rank."""
        self._check_site(site)
        entries = [e for e in self._entries.get((site, split), []) if e.step == step]
        if not entries:
            raise KeyError(
                f"Expected a recorded step of site {site!r} in split {split!r}, but step {step} has no record; "
                f"recorded steps: {self.steps(site, split).tolist()}."
            )
        return _concat([self._load(site, split, e, 0, e.row_count) for e in entries])

    def iter_chunks(self, site: str, split: str = "train", max_rows: int = 1_000_000) -> Iterator[Patterns]:
        """Yield the observations of ``site`` in step order, at most ``max_rows`` rows at a time.

        Each chunk belongs to one step; a step may span several chunks. Memory stays bounded by
        ``max_rows`` whatever the size of the run.
        """
        self._check_site(site)
        if max_rows < 1:
            raise ValueError(f"Expected `max_rows` to be at least 1, but got {max_rows}.")
        for entry in self._entries.get((site, split), []):
            for start in range(0, max(entry.row_count, 1), max_rows):
                yield self._load(site, split, entry, start, min(start + max_rows, entry.row_count))

    def _check_site(self, site: str) -> None:
        if site not in self._info:
            raise KeyError(f"Expected one of the recorded sites {self.sites}, but got {site!r}.")

    def _load(self, site: str, split: str, e: _Entry, lo: int, hi: int) -> Patterns:
        with h5py.File(e.path, "r", locking=False) as handle:
            group = handle[schema.SITES_GROUP][e.key]
            bits = group[schema.BITS][e.row_start + lo : e.row_start + hi]
            labels = group[schema.LABELS][e.sample_start : e.sample_start + e.sample_count]
            sample_ids = group[schema.SAMPLE_IDS][e.sample_start : e.sample_start + e.sample_count]
            if e.obs_start < 0:
                obs = np.arange(lo, hi, dtype=np.int64)
            else:
                obs = group[schema.OBS_INDEX][e.obs_start + lo : e.obs_start + hi]
            values = None if e.value_start < 0 else group[schema.VALUES][e.value_start + lo : e.value_start + hi]
        sample_row = obs // e.n_positions
        return Patterns(
            site=site, step=e.step, epoch=e.epoch, split=split, n_units=self._info[site]["n_units"],
            bits=bits, labels=labels[sample_row], sample_ids=sample_ids[sample_row],
            positions=obs % e.n_positions, nan_count=e.nan_count if lo == 0 else 0, values=values,
        )


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


def _shard_order(name: str) -> tuple:
    parsed = schema.parse_shard_name(name)
    return (0, parsed[0], parsed[1], name) if parsed else (1, 0, 0, name)
