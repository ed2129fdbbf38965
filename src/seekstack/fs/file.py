"""An open file of the distributed file system: read/write/pread/pwrite/seek/truncate/fsync/close.

Data moves straight between this process and the storage chain heads/replicas; meta sees only open, fsync and
close (which settles the length from storage).
"""

from __future__ import annotations

import asyncio
import errno
import threading

from seekstack.fs.meta.layout import Layout, chunk_spans
from seekstack.fs.positional import PositionalFile

MAX_INFLIGHT = 32


class File(PositionalFile):
    """Returned by `FsClient.open`. Binary only; usable as a context manager.

    >>> # with client.open("/data/x.bin", "wb") as f: f.write(b"hello")
    """

    def __init__(self, client, path: str, info: dict, readable: bool, writable: bool, append: bool):
        super().__init__()
        self._client = client
        self.name = path
        self.ino = info["stat"]["ino"]
        self.layout = Layout.from_dict(info["layout"])
        self.session = info["session"]
        self.size = info["stat"]["size"]
        self._readable, self._writable, self._append = readable, writable, append
        self.pos = 0
        self._wrote = False  # whether close must settle the length from storage

    # io.RawIOBase protocol
    def readable(self):
        return self._readable

    def writable(self):
        return self._writable

    def seekable(self):
        return True

    def _check(self, want_write: bool):
        if self.closed:
            raise ValueError("I/O operation on closed file")
        if want_write and not self._writable:
            raise OSError(errno.EBADF, "file not open for writing", self.name)
        if not want_write and not self._readable:
            raise OSError(errno.EBADF, "file not open for reading", self.name)

    def pread(self, size: int, offset: int) -> bytes:
        """Read up to `size` bytes at `offset` without moving the position."""
        self._check(False)
        if size < 0 or offset < 0:
            raise ValueError(f"size and offset must be >= 0, got size={size}, offset={offset}")
        size = max(0, min(size, self.size - offset))
        if size == 0:
            return b""
        buf = bytearray(size)
        self._client._run(self._aread(offset, memoryview(buf)))
        return bytes(buf)

    def preadinto(self, b, offset: int) -> int:
        """Read into the writable buffer `b` at `offset` without moving the position; returns the byte count.
        Each chunk's reply is received straight into `b` (no intermediate copy)."""
        self._check(False)
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        mv = memoryview(b).cast("B")
        size = max(0, min(len(mv), self.size - offset))
        if size:
            self._client._run(self._aread(offset, mv[:size]))
        return size

    async def _aread(self, offset: int, dest: memoryview) -> None:
        sem = asyncio.Semaphore(MAX_INFLIGHT)

        async def one(idx, off, n, boff):
            part = dest[boff : boff + n]
            async with sem:
                got = await self._client._io.read_into(self.layout, self.ino, idx, off, part)
            if got < n:
                part[got:] = bytes(n - got)  # holes and short chunks read as zeros

        await asyncio.gather(*(one(*s) for s in chunk_spans(offset, len(dest), self.layout.chunk_size)))

    def pwrite(self, data, offset: int) -> int:
        """Write `data` at `offset` without moving the position; returns the byte count once every chunk is
        committed on all its replicas."""
        self._check(True)
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        mv = memoryview(data).cast("B")
        if len(mv):
            self._wrote = True
            self._client._run(self._awrite(offset, mv))
            self.size = max(self.size, offset + len(mv))
        return len(mv)

    async def _awrite(self, offset: int, mv: memoryview):
        sem = asyncio.Semaphore(MAX_INFLIGHT)

        async def one(idx, off, n, boff):
            async with sem:
                await self._client._io.write(self.layout, self.ino, idx, off, mv[boff : boff + n])

        await asyncio.gather(*(one(*s) for s in chunk_spans(offset, len(mv), self.layout.chunk_size)))

    def truncate(self, size: int | None = None) -> int:
        self._check(True)
        size = self.pos if size is None else size
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self._client._meta("truncate", path=self.name, length=size, ino=self.ino, session=self.session)
        self._wrote = True
        self.size = size
        return size

    def fsync(self) -> None:
        """Settle the length on meta from storage (all written data is already durable on every replica)."""
        self._check(True)
        st = self._client._meta("fsync", ino=self.ino, layout=self.layout.to_dict(), length_hint=self.size)
        self.size = max(self.size, st["size"])

    def flush(self):
        pass

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self.session is not None:  # read-only opens have no session on meta: nothing to tell it
                on_loop = threading.current_thread() is self._client._thread  # e.g. garbage-collected there
                (self._client._meta_nowait if on_loop else self._client._meta)(
                    "close",
                    ino=self.ino,
                    session=self.session,
                    layout=self.layout.to_dict(),
                    length_hint=self.size,
                    wrote=self._wrote,
                )
        finally:
            super().close()

    def __repr__(self):
        return f"<seekstack.fs.File {self.name!r} ino={self.ino} size={self.size}>"
