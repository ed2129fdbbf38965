"""`Iov`: the shared-memory buffer every batched read and write goes through (3FS `hf3fs_iovcreate`).

The region is a POSIX shared-memory segment (`/dev/shm/<name>`), so another process can attach to the same bytes by
name, as 3FS's FUSE daemon does with a user's iov. Reads land directly in it; `view`/`array` expose slices without
copying.

>>> iov = Iov(1 << 20)
>>> iov.view(0, 4)[:] = b"abcd"
>>> bytes(iov.view(0, 4))
b'abcd'
>>> iov.close()
"""

from __future__ import annotations

from multiprocessing import shared_memory


class Iov:
    """`size` bytes of shared memory; `block_size` (0 = none) documents the alignment callers promise to use.

    `name=` attaches to an existing segment instead of creating one (the creator unlinks it on `close`).
    """

    def __init__(self, size: int, block_size: int = 0, *, name: str | None = None):
        if name is None and (not isinstance(size, int) or size <= 0):
            raise ValueError(f"size must be a positive int, got {size!r}")
        if block_size < 0 or (block_size and size % block_size):
            raise ValueError(f"block_size must be >= 0 and divide size={size}, got {block_size}")
        self._owner = name is None
        self.shm = shared_memory.SharedMemory(name=name, create=self._owner, size=size if self._owner else 0)
        if not self._owner:
            # Before Python 3.13 attaching also registers the segment with this process's resource tracker, which
            # would unlink it (under its creator's feet) when this process exits.
            try:
                from multiprocessing import resource_tracker

                resource_tracker.unregister(self.shm._name, "shared_memory")
            except Exception:
                pass
        self.size = size if self._owner else self.shm.size
        self.block_size = block_size
        self.buf = self.shm.buf[: self.size]  # the OS may round the segment up to a page

    @property
    def name(self) -> str:
        return self.shm.name

    def check(self, ptr: int, length: int) -> None:
        if not isinstance(ptr, int) or ptr < 0 or ptr > self.size:
            raise ValueError(f"ptr must be an offset in [0, {self.size}] of the iov, got {ptr!r}")
        if not isinstance(length, int) or length < 0 or ptr + length > self.size:
            raise ValueError(f"length must be >= 0 and fit the iov ({self.size - ptr} bytes after ptr), got {length!r}")

    def view(self, ptr: int, length: int) -> memoryview:
        """A zero-copy view of bytes [ptr, ptr+length); release it (or drop it) before `close`."""
        self.check(ptr, length)
        return self.buf[ptr : ptr + length]

    def array(self, dtype="uint8", ptr: int = 0, count: int = -1):
        """A numpy array over the buffer, without copying."""
        import numpy as np

        return np.frombuffer(self.buf, dtype=dtype, count=count, offset=ptr)

    def close(self) -> None:
        """Detach; the creating Iov also removes the segment from /dev/shm."""
        if self.buf is None:
            return
        self.buf.release()
        try:
            self.shm.close()
        except BufferError:
            import gc

            gc.collect()  # views kept alive only by reference cycles
            self.shm.close()  # still exported: the caller holds a view or numpy array over the buffer
        self.buf = None
        if self._owner:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass  # already removed by someone else

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass  # interpreter shutdown or views still exported: the tracker cleans /dev/shm up
