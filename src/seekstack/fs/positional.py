"""Stream methods (read, write, seek, ...) from positional I/O, shared by the cluster's and a local directory's files.

A subclass provides `pread(size, offset)`, `preadinto(buf, offset)`, `pwrite(data, offset)`, a `size`, a `name` and
the attributes `pos` and `_append`; this mixin keeps the stream position.
"""

from __future__ import annotations

import errno
import io
import os


class PositionalFile(io.RawIOBase):
    pos: int
    _append: bool

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, self.size - self.pos)
        data = self.pread(size, self.pos)
        self.pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, b) -> int:
        n = self.preadinto(b, self.pos)
        self.pos += n
        return n

    def write(self, data) -> int:
        if self._append:
            self.pos = self.size
        n = self.pwrite(data, self.pos)
        self.pos += n
        return n

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}.get(whence)
        if base is None:
            raise ValueError(f"whence must be 0, 1 or 2, got {whence}")
        if base + offset < 0:
            raise OSError(errno.EINVAL, "negative seek position", self.name)
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos
