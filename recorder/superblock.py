"""Open a shard whose HDF5 superblock lags behind the rest of the file, as a crash can leave it.

The superblock (the first 48 bytes of a version 2 or 3 superblock, which shards use) holds the file's
end-of-allocation address (EOA). HDF5 writes it last in a flush, after new chunks and the index and
object headers that point at them, and refuses to read past it ("addr overflow"). A process killed in
between leaves an index pointing at data that is in the file but past the stale EOA. For a compressed
column that costs earlier records too: a chunk that a block extends is rewritten at the end of the file.
Such a file is opened here with the EOA raised to the file's size. Nothing is trusted because of it:
every record read is still checked against its CRC-32, so a torn write is reported lost, never returned.
"""

from __future__ import annotations

import os
from typing import Any

from actpat.recorder.fileobj import FileAt

SIGNATURE = b"\x89HDF\r\n\x1a\n"
SIZE = 48
_EOA = slice(28, 36)
_CHECKSUM = slice(44, 48)
_MASK = 0xFFFFFFFF


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _MASK


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle`` of ``data``: the checksum of HDF5's metadata blocks."""
    a = b = c = (0xDEADBEEF + len(data) + initval) & _MASK
    rest = data
    while len(rest) > 12:
        a = (a + int.from_bytes(rest[0:4], "little")) & _MASK
        b = (b + int.from_bytes(rest[4:8], "little")) & _MASK
        c = (c + int.from_bytes(rest[8:12], "little")) & _MASK
        for x, y, z, k in ((0, 2, 1, 4), (1, 0, 2, 6), (2, 1, 0, 8), (0, 2, 1, 16), (1, 0, 2, 19), (2, 1, 0, 4)):
            v = [a, b, c]
            v[x] = ((v[x] - v[y]) & _MASK) ^ _rot(v[y], k)
            v[y] = (v[y] + v[z]) & _MASK
            a, b, c = v
        rest = rest[12:]
    if not rest:
        return c
    tail = rest + bytes(12 - len(rest))
    a = (a + int.from_bytes(tail[0:4], "little")) & _MASK
    b = (b + int.from_bytes(tail[4:8], "little")) & _MASK
    c = (c + int.from_bytes(tail[8:12], "little")) & _MASK
    for x, y, k in ((2, 1, 14), (0, 2, 11), (1, 0, 25), (2, 1, 16), (0, 2, 4), (1, 0, 14), (2, 1, 24)):
        v = [a, b, c]
        v[x] = ((v[x] ^ v[y]) - _rot(v[y], k)) & _MASK
        a, b, c = v
    return c


def raised_eoa(path: str | os.PathLike) -> bytes | None:
    """The superblock of ``path`` with its EOA raised to the file's size, or None where it is not behind
    (or is no intact version 2/3 superblock at the start of the file: HDF5 then reports what it finds)."""
    with open(path, "rb") as handle:
        head = handle.read(SIZE)
        size = os.fstat(handle.fileno()).st_size
    if len(head) < SIZE or head[:8] != SIGNATURE or head[8] not in (2, 3) or head[9] != 8:
        return None
    if lookup3(head[: _CHECKSUM.start]) != int.from_bytes(head[_CHECKSUM], "little"):
        return None
    base = int.from_bytes(head[12:20], "little")
    if base != 0 or int.from_bytes(head[_EOA], "little") >= size:
        return None
    raised = head[: _EOA.start] + size.to_bytes(8, "little") + head[_EOA.stop : _CHECKSUM.start]
    return raised + lookup3(raised).to_bytes(4, "little")


class WithSuperblock(FileAt):
    """A read-only file object for ``h5py.File``: the file at ``path`` with its first bytes replaced by
    ``head``. The descriptor is closed with the object (h5py drops it when its file is closed)."""

    def __init__(self, path: str | os.PathLike, head: bytes) -> None:
        super().__init__(os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
        self._head = head

    def readinto(self, buffer: Any) -> int:
        start = self.pos
        n = super().readinto(buffer)
        if start < len(self._head):
            stop = min(len(self._head), start + n)
            memoryview(buffer).cast("B")[: stop - start] = self._head[start:stop]
        return n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()
