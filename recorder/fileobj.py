"""The reading half of the file objects h5py's file-object driver goes through: the shard writer's
guarded file and the reader's view of a shard a crash left behind."""

from __future__ import annotations

import os
from typing import Any


class FileAt:
    """The reading half of a file object for h5py's file-object driver: a descriptor read at a position
    kept here (``pread``, so nothing else moves it)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pos = 0

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            self.pos = offset
        elif whence == os.SEEK_CUR:
            self.pos += offset
        else:
            self.pos = os.fstat(self.fd).st_size + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], self.pos + done)
            if n == 0:  # past the end: HDF5 expects zeros
                view[done:] = bytes(len(view) - done)
                break
            done += n
        self.pos += len(view)
        return len(view)

    def read(self, size: int = -1) -> bytes:
        buffer = bytearray(size)
        self.readinto(buffer)
        return bytes(buffer)
