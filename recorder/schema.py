"""The on-disk format of activation-pattern shards: names, dtypes, checksums, codecs and the version.

Writer and reader both import this module; the README documents the same layout. A shard is a plain
HDF5 file that ``h5py`` alone can read::

    /                       attrs: format, format_version, rank, shard_index, finalized, dropped_records,
                                   compression, stop_reason (only where recording stopped early)
    /sites/<site key>/      attrs: site, site_index, module_type, shape, n_units, pattern, bit_order,
                                   value_units (only once a record with values was written)
        bits        (rows, n_bytes) uint8   packed patterns, unit j = bit j % 8 of byte j // 8
        sample_ids  (samples,) int64        per sample of each record, -1 where unknown
        labels      (samples,) int64        per sample of each record, -1 where unknown
        obs_index   (subsampled rows,) int64  only once a subsampled record was written
        values      (value rows, k) float16 only once a record with values was written
        records     (records,) RECORD_DTYPE one row per recorded call, pointing into the arrays above

Rows of a record are ordered sample-major then by flattened spatial position, unless the record was
subsampled, in which case ``obs_index`` names each kept row's place in that grid. A record with values
has one ``values`` row per ``bits`` row, starting at ``value_start``. Each record row carries two CRC-32:
of itself (:func:`row_crcs`) and of itself and its data (:func:`record_crc`), so a reader can tell an
exact record from a damaged one.

Version history: 1 = patterns only; 2 adds ``values``, the ``value_units`` attribute and the
``value_start`` record field (-1 = no values); 3 adds the ``row_crc32`` and ``crc32`` record fields, the
``compression`` and ``stop_reason`` attributes, creates ``obs_index`` and ``values`` only when a record needs them, and is
written with HDF5 1.10 object formats (checksummed file metadata); 4 adds the ``part`` and ``ends_step`` record
fields, with which a reader tells a step whose last records never reached the disk (a probe cut short by a kill)
from a complete one. Readers read every earlier version.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import numpy as np

FORMAT_NAME = "actpat-patterns"
FORMAT_VERSION = 4
#: First version whose records carry a checksum.
CHECKSUM_VERSION = 3
BIT_ORDER = "little"
#: How a pre-activation is cut into patterns (the site attribute ``pattern``): ``channel``, dimension 1 the units
#: (SPEC section 1); ``flat``, one pattern per sample; ``channel_last``, the last dimension the units (a Linear on
#: ``(N, L, C)`` sequences), every other position one observation.
PATTERN_KINDS = ("channel", "flat", "channel_last")
#: HDF5 object formats of shards since version 3: 1.10 gives checksums on all file metadata (superblock v3,
#: object header v2, chunk indexes) and every h5py since 3.0 reads it.
LIBVER = ("v110", "v110")

SITES_GROUP = "sites"
BITS = "bits"
SAMPLE_IDS = "sample_ids"
LABELS = "labels"
OBS_INDEX = "obs_index"
VALUES = "values"
RECORDS = "records"
#: Per-sample columns, always present.
SAMPLE_COLUMNS = (SAMPLE_IDS, LABELS)
#: Columns a writer (since version 3) creates only when the first record that needs them arrives.
OPTIONAL_COLUMNS = (OBS_INDEX, VALUES)

SPLIT_BYTES = 32


def check_split(split: object, name: str = "`split`") -> None:
    """Refuse a split the records table cannot keep: it stores a split's first :data:`SPLIT_BYTES` bytes (UTF-8),
    and a longer one would read back as another."""
    if not isinstance(split, str) or len(split.encode()) > SPLIT_BYTES:
        raise ValueError(f"Expected {name} to be a str of at most {SPLIT_BYTES} bytes (UTF-8), but got {split!r}. "
                         "Use a shorter name.")

_FIELDS = [
    ("step", "<i8"),
    ("epoch", "<i8"),
    ("split", f"S{SPLIT_BYTES}"),
    ("row_start", "<i8"),
    ("row_count", "<i8"),
    ("sample_start", "<i8"),
    ("sample_count", "<i8"),
    # -1 when every (sample, position) row was kept, else the offset into obs_index.
    ("obs_start", "<i8"),
    ("n_positions", "<i8"),
    ("nan_count", "<i8"),
    ("value_start", "<i8"),
]
_STEP_FIELDS = [
    # The record's place among its site's records of this step and split from one writer (0, 1, ...),
    # and 1 on the last of them: -1 and 0 for records written without step tracking.
    ("part", "<i4"),
    ("ends_step", "u1"),
]
_CRC_FIELDS = ("row_crc32", "crc32")
_CRC = [(name, "<u4") for name in _CRC_FIELDS]
#: The records table's dtype by version, of the versions whose rows carry checksums.
RECORD_DTYPES = {3: np.dtype(_FIELDS + _CRC), 4: np.dtype(_FIELDS + _STEP_FIELDS + _CRC)}
RECORD_DTYPE = RECORD_DTYPES[FORMAT_VERSION]
#: First version whose records carry ``part`` and ``ends_step``.
STEP_PARTS_VERSION = 4
#: Record fields by version (version 1 lacks ``value_start``, versions 1-2 lack the checksums, 1-3 the parts).
RECORD_FIELDS = {
    1: tuple(name for name, _ in _FIELDS if name != "value_start"),
    2: tuple(name for name, _ in _FIELDS),
    **{version: dtype.names for version, dtype in RECORD_DTYPES.items()},
}
COLUMN_DTYPES = {BITS: np.dtype("u1"), SAMPLE_IDS: np.dtype("<i8"), LABELS: np.dtype("<i8"),
                 OBS_INDEX: np.dtype("<i8"), VALUES: np.dtype("<f2")}  # fmt: skip

# Chunks of at most this many bytes: small enough that a partly filled chunk per dataset stays cheap
# to keep in HDF5's chunk cache and to rewrite, large enough for fast sequential reads.
CHUNK_BYTES = 64 << 10
RECORD_CHUNK_ROWS = 256

SHARD_SUFFIX = ".h5"
PARTIAL_SUFFIX = ".h5.partial"
STOP_SUFFIX = ".stop.txt"
MARKS_SUFFIX = ".queued.json"
LOCK_SUFFIX = ".lock"
_SHARD_RE = re.compile(r"^patterns-rank(\d+)-(\d+)\.h5(\.partial)?$")
_STOP_RE = re.compile(r"^patterns-rank(\d+)-(\d+)\.stop\.txt$")
_MARKS_RE = re.compile(r"^patterns-rank(\d+)-(\d+)\.queued\.json$")
#: Bytes the marks file keeps at least, padded with spaces: a rewrite in place never needs new disk space.
MARKS_BYTES = 4096

# ---------------------------------------------------------------------------------------------- codecs
#: ``compression=`` names: the HDF5 filters built into h5py, and fast codecs of ``hdf5plugin``
#: (the ``actpat[codecs]`` extra). A shard names its codec in its ``compression`` attribute.
BUILTIN_CODECS = ("lzf", "gzip")
PLUGIN_CODECS = ("lz4", "zstd", "blosc-lz4", "blosc-zstd")
CODECS = (None,) + BUILTIN_CODECS + PLUGIN_CODECS
CODECS_EXTRA = "pip install 'actpat[codecs]'"


class ShardFormatError(ValueError):
    """A file in a run directory is not a readable actpat shard of a known format version."""


def check_codec(compression: str | None) -> None:
    """Raise ``ValueError`` for an unknown codec, naming the known ones and the extra to install. ``"none"``, the
    shards' own name for no codec (a config file's spelling of None), is taken for None."""
    if compression not in CODECS and compression != "none":
        raise ValueError(
            f"Expected `compression` to be one of {list(CODECS)} (None: uncompressed), but got {compression!r}. The "
            f"codecs {list(PLUGIN_CODECS)} come with the `codecs` extra ({CODECS_EXTRA})."
        )


def codec_options(compression: str | None) -> dict[str, Any]:
    """``h5py`` ``create_dataset`` keywords that apply codec ``compression`` (see :data:`CODECS`)."""
    check_codec(compression)
    if compression is None or compression == "none":
        return {}
    if compression in BUILTIN_CODECS:
        return {"compression": compression, **({"compression_opts": 1} if compression == "gzip" else {})}
    hdf5plugin = load_plugins(compression)
    filters = {
        "lz4": lambda: hdf5plugin.LZ4(),
        "zstd": lambda: hdf5plugin.Zstd(clevel=1),
        "blosc-lz4": lambda: hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.NOSHUFFLE),
        "blosc-zstd": lambda: hdf5plugin.Blosc(cname="zstd", clevel=1, shuffle=hdf5plugin.Blosc.NOSHUFFLE),
    }
    return dict(filters[compression]())


def open_for_reading(path: Any) -> Any:
    """Open a shard read-only as an ``h5py.File``.

    With h5py's default file locking first, so that a plain ``h5py.File(path)`` in the same process
    opens the shard too (HDF5 refuses a second handle whose locking flag differs); without locking where
    that fails: a shard still being written, or left unfinalized by a crash, carries HDF5's "open for
    writing" flag, which only a reader without locking ignores, and some file systems refuse locks.
    A shard whose superblock a crash left behind the rest of the file is opened with it raised
    (:mod:`~actpat.recorder.superblock`).
    """
    import h5py

    from actpat.recorder import superblock

    head = superblock.raised_eoa(path)
    if head is not None:
        return h5py.File(superblock.WithSuperblock(path, head), "r")
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise
    except OSError:
        return h5py.File(path, "r", locking=False)


def load_plugins(what: str) -> Any:
    """Import ``hdf5plugin`` (registering its HDF5 filters), or say which extra to install for ``what``."""
    try:
        import hdf5plugin
    except ImportError as exc:
        problem = "which is not installed" if exc.name == "hdf5plugin" else f"which cannot be imported ({exc})"
        raise ImportError(
            f"{what} needs the HDF5 filters of `hdf5plugin`, {problem}: {CODECS_EXTRA}.", name="hdf5plugin"
        ) from exc
    return hdf5plugin


# ---------------------------------------------------------------------------------------------- sites
@dataclass(frozen=True)
class SiteMeta:
    """What a shard stores about one activation site (the attributes of its group)."""

    site: str
    site_index: int
    module_type: str
    shape: tuple[int, ...]
    n_units: int
    pattern: str
    # Units whose float16 pre-activations are stored alongside the bits (None: values not stored).
    value_units: tuple[int, ...] | None = None

    @property
    def n_bytes(self) -> int:
        """Bytes per packed pattern."""
        return (self.n_units + 7) // 8


def write_site_attrs(group: Any, meta: SiteMeta) -> None:
    """Write the attributes of a site group (``value_units`` is written by :func:`create_column`)."""
    group.attrs["site"] = meta.site
    group.attrs["site_index"] = meta.site_index
    group.attrs["module_type"] = meta.module_type
    group.attrs["shape"] = np.asarray(meta.shape, dtype=np.int64)
    group.attrs["n_units"] = meta.n_units
    group.attrs["pattern"] = meta.pattern
    group.attrs["bit_order"] = BIT_ORDER


def create_column(group: Any, name: str, meta: SiteMeta, codec: dict[str, Any]) -> Any:
    """Create the extensible dataset ``name`` of a site group, chunked to about :data:`CHUNK_BYTES`.

    The records table is never compressed (it is small and read first); ``codec`` (from
    :func:`codec_options`) applies to the data columns.
    """
    if name == RECORDS:
        return group.create_dataset(
            RECORDS, shape=(0,), maxshape=(None,), dtype=RECORD_DTYPE, chunks=(RECORD_CHUNK_ROWS,)
        )
    if name == VALUES:
        if meta.value_units is None:
            raise ValueError(f"Site {meta.site!r} stores no values: it has no `value_units`.")
        group.attrs["value_units"] = np.asarray(meta.value_units, dtype=np.int64)
    width = {BITS: meta.n_bytes, VALUES: len(meta.value_units or ())}.get(name)
    dtype = COLUMN_DTYPES[name]
    if width is None:
        rows = max(1, CHUNK_BYTES // dtype.itemsize)
        return group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(rows,), **codec)
    rows = max(1, CHUNK_BYTES // (width * dtype.itemsize))
    return group.create_dataset(
        name, shape=(0, width), maxshape=(None, width), dtype=dtype, chunks=(rows, width), **codec
    )


# ---------------------------------------------------------------------------------------------- checksums
def site_header(site: str, pattern: str, n_units: int, value_units: Iterable[int] | None) -> bytes:
    """The bytes of a site that every record checksum covers: what decoding its bits depends on.

    ``value_units`` is given for records with values only.
    """
    header = b"actpat-record\0" + site.encode() + b"\0" + pattern.encode() + b"\0"
    header += np.int64(n_units).astype("<i8").tobytes()
    if value_units is not None:
        header += np.asarray(tuple(value_units), dtype="<i8").tobytes()
    return header


def row_crcs(
    table: np.ndarray, header: bytes, values_header: bytes | None = None, version: int = FORMAT_VERSION
) -> np.ndarray:
    """CRC-32 (``zlib.crc32``) of each row of a records table, as int64: of the site header, then the row
    itself (little-endian, the fields of ``version``) with both checksum fields set to 0. Checked when a run
    is opened, before a row is trusted as an index entry. Rows with values (``value_start >= 0``) start
    from ``values_header``; -2 for such rows where it is None (nothing they could match)."""
    dtype = RECORD_DTYPES[version]
    plain = np.zeros(len(table), dtype=dtype)
    for name in dtype.names:
        if name not in _CRC_FIELDS:
            plain[name] = table[name]
    raw = plain.view(np.uint8).reshape(len(table), dtype.itemsize)
    start = zlib.crc32(header)
    values_start = -2 if values_header is None else zlib.crc32(values_header)
    with_values = (plain["value_start"] >= 0).tolist()
    out = np.empty(len(table), dtype=np.int64)
    for i, has_values in enumerate(with_values):
        first = values_start if has_values else start
        out[i] = -2 if first < 0 else zlib.crc32(raw[i], first)
    return out


def record_crc(row_checksum: int, columns: Iterable[np.ndarray]) -> int:
    """CRC-32 of a whole record: its row's checksum (:func:`row_crcs`) continued over its data, in
    column order ``bits, sample_ids, labels[, obs_index][, values]`` (each the record's slice, dtypes of
    :data:`COLUMN_DTYPES`, C order). Checked when the record is read."""
    crc = row_checksum
    for column in columns:
        crc = crc_update(crc, column)
    return crc


def crc_update(crc: int, array: np.ndarray | bytes) -> int:
    """Continue a CRC-32 over ``array``'s bytes (C order)."""
    if isinstance(array, np.ndarray):
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        array = np.ascontiguousarray(array)
    return zlib.crc32(array, crc)


# ---------------------------------------------------------------------------------------------- file names
def shard_name(rank: int, index: int, partial: bool = False) -> str:
    """File name of shard ``index`` written by process ``rank``."""
    return f"patterns-rank{rank:03d}-{index:05d}" + (PARTIAL_SUFFIX if partial else SHARD_SUFFIX)


def parse_shard_name(name: str) -> tuple[int, int, bool] | None:
    """``(rank, index, partial)`` of a shard file name, or ``None`` for any other file."""
    match = _SHARD_RE.match(name)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)), match.group(3) is not None


def stop_name(rank: int, index: int) -> str:
    """Side file that records why recording of ``rank`` stopped at shard ``index`` when no shard could."""
    return f"patterns-rank{rank:03d}-{index:05d}{STOP_SUFFIX}"


def parse_stop_name(name: str) -> tuple[int, int] | None:
    """``(rank, index)`` of a stop side file name, or ``None``."""
    match = _STOP_RE.match(name)
    return None if match is None else (int(match.group(1)), int(match.group(2)))


def marks_name(rank: int, index: int) -> str:
    """Side file of the writer session of ``rank`` whose first shard is ``index``: the last step of each split
    it queued, and whether it closed (:func:`read_marks`)."""
    return f"patterns-rank{rank:03d}-{index:05d}{MARKS_SUFFIX}"


def parse_marks_name(name: str) -> tuple[int, int] | None:
    """``(rank, index)`` of a marks side file name, or ``None``."""
    match = _MARKS_RE.match(name)
    return None if match is None else (int(match.group(1)), int(match.group(2)))


class Marks(NamedTuple):
    """What a marks file says of its writer session (:func:`read_marks`)."""

    queued: dict[str, int]  # split -> the last step queued
    closed: bool
    sites: dict[tuple[str, str], int] | None = None  # (site, split) -> the last step queued; set once closed


def marks_text(queued: dict[str, int], closed: bool, sites: dict[tuple[str, str], int] | None = None) -> bytes:
    """Content of a marks file: JSON ``{"closed": bool, "queued": {split: last step}}``, space-padded to
    :data:`MARKS_BYTES`, and where ``sites`` is given ``"sites": {site: {split: last step}}`` (a closing session's
    own marks per site: the file may then outgrow the padding, once)."""
    data: dict[str, Any] = {"closed": closed, "queued": queued}
    if sites is not None:
        data["sites"] = {}
        for (site, split), step in sites.items():
            data["sites"].setdefault(site, {})[split] = step
    return json.dumps(data).encode().ljust(MARKS_BYTES)


def read_marks(path: Path) -> Marks | None:
    """The marks of a marks file, or None where it cannot be read or parsed."""
    text = read_marks_text(path)
    return None if text is None else parse_marks(text)


def read_marks_text(path: Path) -> bytes | None:
    """The content of a marks file, or None where it cannot be read (b"": a writer creating it this instant)."""
    try:
        return path.read_bytes()
    except OSError:
        return None


def parse_marks(text: bytes) -> Marks | None:
    """The marks of a marks file's content, or None where it cannot be parsed."""
    try:
        data = json.loads(text)
        queued = {str(split): int(step) for split, step in data["queued"].items()}
        sites = None
        if "sites" in data:
            sites = {(str(site), str(split)): int(step) for site, steps in data["sites"].items()
                     for split, step in steps.items()}
        return Marks(queued, bool(data["closed"]), sites)
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError):
        return None


def lock_name(rank: int) -> str:
    """Lock file held by the live writer of ``rank`` in a run directory."""
    return f"patterns-rank{rank:03d}{LOCK_SUFFIX}"


def site_key(site: str) -> str:
    """HDF5 group name of a site: ``/`` would create nested groups, so it is escaped."""
    return site.replace("%", "%25").replace("/", "%2F")
