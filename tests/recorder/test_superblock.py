"""The superblock reader that opens a shard a crash left with its end-of-allocation behind the file."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from actpat.recorder import superblock


@pytest.mark.parametrize(
    ("data", "initval", "expected"),
    [  # the published self-test values of lookup3.c (driver5)
        (b"", 0, 0xDEADBEEF),
        (b"", 0xDEADBEEF, 0xBD5B7DDE),
        (b"Four score and seven years ago", 0, 0x17770551),
        (b"Four score and seven years ago", 1, 0xCD628161),
    ],
)
def test_lookup3_matches_the_published_values(data, initval, expected):
    assert superblock.lookup3(data, initval) == expected


@pytest.mark.parametrize("libver", ["v108", "v110", "latest"])
def test_lookup3_matches_the_checksum_hdf5_wrote_into_its_superblock(libver, tmp_path):
    for n in (1, 100, 10_000):
        path = tmp_path / f"{libver}-{n}.h5"
        with h5py.File(path, "w", libver=libver) as handle:
            handle["x"] = np.arange(n)
        head = path.read_bytes()[: superblock.SIZE]
        assert head[8] in (2, 3)
        assert superblock.lookup3(head[:44]) == int.from_bytes(head[44:48], "little")


def test_a_closed_file_or_no_hdf5_file_needs_no_raised_superblock(tmp_path):
    closed = tmp_path / "closed.h5"
    with h5py.File(closed, "w", libver="v110") as handle:
        handle["x"] = np.arange(10)
    assert superblock.raised_eoa(closed) is None
    text = tmp_path / "notes.txt"
    text.write_text("not hdf5 " * 20)
    assert superblock.raised_eoa(text) is None
    old = tmp_path / "v0.h5"  # version 0 superblock: no checksum, another layout: left to HDF5
    with h5py.File(old, "w", libver="earliest") as handle:
        handle["x"] = np.arange(10)
    with open(old, "ab") as handle:
        handle.write(bytes(100))
    assert superblock.raised_eoa(old) is None


def test_data_past_a_stale_end_of_allocation_is_read_through_the_raised_superblock(tmp_path):
    path = tmp_path / "stale.h5"
    with h5py.File(path, "w", libver="v110") as handle:
        handle.create_dataset("x", data=np.arange(1000), chunks=(100,))
    with h5py.File(path, "r") as handle:
        last = max(handle["x"].id.get_chunk_info(i).byte_offset for i in range(10))
    # The EOA lowered to the last chunk, as a crash between writing a chunk and the superblock leaves
    # it; the checksum HDF5 verifies recomputed.
    data = bytearray(path.read_bytes())
    stale = bytes(data[:28]) + last.to_bytes(8, "little") + bytes(data[36:44])
    data[:48] = stale + superblock.lookup3(stale).to_bytes(4, "little")
    path.write_bytes(data)
    with h5py.File(path, "r") as handle, pytest.raises(OSError, match="addr overflow"):
        handle["x"][:]
    head = superblock.raised_eoa(path)
    assert head is not None and int.from_bytes(head[28:36], "little") == len(data)
    with h5py.File(superblock.WithSuperblock(path, head), "r") as handle:
        np.testing.assert_array_equal(handle["x"][:], np.arange(1000))


def test_a_shard_opened_with_a_raised_superblock_gives_its_descriptor_back_when_closed(tmp_path):
    import os

    from actpat.recorder import schema

    path = tmp_path / "stale.h5"
    with h5py.File(path, "w", libver="v110") as handle:
        handle["x"] = np.arange(100)
    with open(path, "ab") as handle:  # the file longer than the superblock says: opened with it raised
        handle.write(bytes(4096))
    assert superblock.raised_eoa(path) is not None
    before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    for _ in range(50):
        handle = schema.open_for_reading(path)
        np.testing.assert_array_equal(handle["x"][:], np.arange(100))
        handle.close()
    if before is not None:
        assert len(os.listdir("/proc/self/fd")) <= before + 1
