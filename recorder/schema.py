"""The on-disk format of activation-pattern shards: names, dtypes and the version constant.

Writer and reader both import this module; the README documents the same layout. A shard is a plain
HDF5 file that ``h5py`` alone can read::

    /                       attrs: format, format_version, rank, shard_index, dropped_records, finalized
    /sites/<site key>/      attrs: site, site_index, module_type, shape, n_units, pattern, bit_order
        bits        (rows, n_bytes) uint8   packed patterns, unit j = bit j % 8 of byte j // 8
        sample_ids  (samples,) int64        per sample of each record, -1 where unknown
        labels      (samples,) int64        per sample of each record, -1 where unknown
        obs_index   (subsampled rows,) int64  row index into the record's full (sample, position) grid
        values      (value rows, k) float16 optional pre-activations of the units in attr value_units
        records     (records,) RECORD_DTYPE one row per recorded call, pointing into the arrays above

Rows of a record are ordered sample-major then by flattened spatial position, unless the record was
subsampled, in which case ``obs_index`` names each kept row's place in that grid. A record with values
has one ``values`` row per ``bits`` row, starting at ``value_start``.

Version history: 1 = patterns only; 2 adds ``values``, the ``value_units`` attribute and the
``value_start`` record field (-1 = no values). Readers of version 2 read version 1 shards.
"""

from __future__ import annotations

import re

import numpy as np

FORMAT_NAME = "actpat-patterns"
FORMAT_VERSION = 2
BIT_ORDER = "little"
PATTERN_KINDS = ("channel", "flat")

SITES_GROUP = "sites"
BITS = "bits"
SAMPLE_IDS = "sample_ids"
LABELS = "labels"
OBS_INDEX = "obs_index"
VALUES = "values"
RECORDS = "records"

SPLIT_BYTES = 32
RECORD_DTYPE = np.dtype(
    [
        ("step", np.int64),
        ("epoch", np.int64),
        ("split", f"S{SPLIT_BYTES}"),
        ("row_start", np.int64),
        ("row_count", np.int64),
        ("sample_start", np.int64),
        ("sample_count", np.int64),
        # -1 when every (sample, position) row was kept, else the offset into obs_index.
        ("obs_start", np.int64),
        ("n_positions", np.int64),
        ("nan_count", np.int64),
        ("value_start", np.int64),
    ]
)

SHARD_SUFFIX = ".h5"
PARTIAL_SUFFIX = ".h5.partial"
_SHARD_RE = re.compile(r"^patterns-rank(\d+)-(\d+)\.h5(\.partial)?$")


def shard_name(rank: int, index: int, partial: bool = False) -> str:
    """File name of shard ``index`` written by process ``rank``."""
    return f"patterns-rank{rank:03d}-{index:05d}" + (PARTIAL_SUFFIX if partial else SHARD_SUFFIX)


def parse_shard_name(name: str) -> tuple[int, int, bool] | None:
    """``(rank, index, partial)`` of a shard file name, or ``None`` for any other file."""
    match = _SHARD_RE.match(name)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)), match.group(3) is not None


def site_key(site: str) -> str:
    """HDF5 group name of a site: ``/`` would create nested groups, so it is escaped."""
    return site.replace("%", "%25").replace("/", "%2F")
