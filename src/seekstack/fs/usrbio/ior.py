"""`Ior`: a submission/completion ring in the style of 3FS USRBIO (`hf3fs_iorcreate4`, `hf3fs_prep_io`,
`hf3fs_submit_ios`, `hf3fs_wait_for_ios`).

A ring has `entries` slots. `prep_io` fills a slot (taken until its completion is reaped), `submit_ios` hands every
prepared slot to the ring's dispatcher, `wait_for_ios` reaps completions. The dispatcher batches by `io_depth`:

- `io_depth == 0`: no batching; whatever has been submitted is started at once.
- `io_depth > 0`: start I/Os only in batches of exactly `io_depth` (the rest waits for more submissions).
- `io_depth < 0`: start up to `-io_depth` at a time; with fewer available, wait up to `timeout` s for more, then
  start what is there.

All I/Os of a batch are in flight together (see `engine`); read data lands in the Iov slice given to `prep_io`.
One ring per thread is the intended use; one thread may prep/submit while another waits.

>>> # f = client.open("/data.bin"); fd = reg_fd(f)
>>> # with Iov(1 << 20) as iov, Ior(entries=64) as ior:
>>> #     for i in range(16): prep_io(ior, iov, True, i * 4096, fd, i * 4096, 4096, userdata=i)
>>> #     submit_ios(ior); cqes = wait_for_ios(ior, 16, min_results=16)
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
import time
from collections import deque
from dataclasses import dataclass

from seekstack.fs.usrbio.engine import Executor
from seekstack.fs.usrbio.iov import Iov

# ------------------------------------------------------------------ fd registration (hf3fs_reg_fd / dereg_fd)
_fds: dict[int, object] = {}
_fd_ids = itertools.count(1 << 20)  # far from small OS fds so a mix-up shows as EBADF, not a wrong file
_fd_lock = threading.Lock()


class _OsFile:
    """An OS file descriptor (e.g. of a file on a FUSE mount) as a positioned-read/write file."""

    def __init__(self, fd: int):
        os.fstat(fd)  # EBADF now rather than at the first I/O
        self.fd = fd

    def preadinto(self, mv, offset):
        done = 0
        while done < len(mv):
            n = os.preadv(self.fd, [mv[done:]], offset + done)
            if n == 0:
                break
            done += n
        return done

    def pwrite(self, mv, offset):
        done = 0
        while done < len(mv):
            done += os.pwrite(self.fd, mv[done:], offset + done)
        return done


def reg_fd(f) -> int:
    """Register an open file (a `seekstack.fs` file, any object with `pread`/`preadinto`, or an OS fd) for batched
    I/O; returns the handle `prep_io` takes."""
    target = _OsFile(f) if isinstance(f, int) else f
    if not isinstance(f, int) and not any(hasattr(f, m) for m in ("preadinto", "pread", "readinto", "pwrite")):
        raise ValueError(f"f: {type(f).__name__} has no pread/preadinto/readinto/pwrite")
    with _fd_lock:
        h = next(_fd_ids)
        _fds[h] = target
    return h


def dereg_fd(fd: int) -> None:
    with _fd_lock:
        if _fds.pop(fd, None) is None:
            raise OSError(errno.EBADF, f"fd {fd} is not registered")


def _lookup(fd: int):
    f = _fds.get(fd)
    if f is None:
        raise OSError(errno.EBADF, f"fd {fd} is not registered (call reg_fd first)")
    return f


@dataclass(frozen=True)
class Cqe:
    """A completion: `index` is what `prep_io` returned, `result` the bytes moved or -errno."""

    index: int
    result: int
    userdata: object = None


@dataclass
class _Sqe:
    index: int
    file: object
    view: memoryview
    offset: int
    userdata: object


class Ior:
    """A ring of `entries` slots for reads (`for_read=True`) or writes; see the module docstring for `io_depth`.

    `timeout` (seconds) bounds the wait for a partial batch when `io_depth < 0`; `workers` sizes the thread pool
    used for files without a chunk path.
    """

    def __init__(
        self, entries: int = 1024, for_read: bool = True, io_depth: int = 0, timeout: float = 0.001, workers: int = 16
    ):
        if not isinstance(entries, int) or entries < 1:
            raise ValueError(f"entries must be a positive int, got {entries!r}")
        if not isinstance(io_depth, int) or abs(io_depth) > entries:
            raise ValueError(f"io_depth must be an int with |io_depth| <= entries={entries}, got {io_depth!r}")
        if timeout < 0:
            raise ValueError(f"timeout must be >= 0, got {timeout}")
        self.entries, self.for_read, self.io_depth, self.timeout = entries, for_read, io_depth, timeout
        self._free = deque(range(entries))
        self._prepped: list[_Sqe] = []
        self._queue: deque[_Sqe] = deque()  # submitted, not started
        self._done: deque[Cqe] = deque()
        self._inflight = 0
        self._cv = threading.Condition()
        self._closed = False
        self._exec = Executor(workers)
        self._thread = threading.Thread(target=self._dispatch_loop, name="usrbio-ior", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- user side
    def prep(self, iov: Iov, ptr: int, fd: int, offset: int, length: int, userdata=None, read: bool | None = None):
        """Prepare one I/O of `length` bytes between file `fd` at `offset` and `iov[ptr:ptr+length]`; returns its
        slot index. Raises OSError(EAGAIN) when all `entries` slots are taken (reap completions first)."""
        if read is not None and bool(read) != self.for_read:
            raise ValueError(f"read: this ring is for {'reads' if self.for_read else 'writes'} only")
        if not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be an int >= 0, got {offset!r}")
        iov.check(ptr, length)
        f = _lookup(fd)
        with self._cv:
            if self._closed:
                raise ValueError("ior: the ring is destroyed")
            if not self._free:
                raise OSError(errno.EAGAIN, f"ring full: all {self.entries} entries in use")
            idx = self._free.popleft()
            # The view is taken last so a failed prep leaves no export that would keep the Iov from closing.
            self._prepped.append(_Sqe(idx, f, iov.view(ptr, length), offset, userdata))
        return idx

    def submit(self) -> int:
        """Hand every prepared I/O to the dispatcher; returns how many."""
        with self._cv:
            n = len(self._prepped)
            self._queue.extend(self._prepped)
            self._prepped.clear()
            self._cv.notify_all()
        return n

    def wait(self, max_results: int | None = None, min_results: int = 1, timeout: float | None = None) -> list[Cqe]:
        """Reap up to `max_results` completions, blocking until `min_results` are there or `timeout` s pass
        (`None`: no limit). Reaped slots become free for `prep`."""
        max_results = self.entries if max_results is None else max_results
        if max_results < 1 or not 0 <= min_results <= max_results:
            raise ValueError(
                f"need 1 <= max_results and 0 <= min_results <= max_results, got {max_results}, {min_results}"
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while len(self._done) < min_results:
                outstanding = self._inflight + len(self._queue) + len(self._done)
                if outstanding < min_results:
                    raise ValueError(f"min_results={min_results} but only {outstanding} I/Os are submitted")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cv.wait(left)
            out = [self._done.popleft() for _ in range(min(max_results, len(self._done)))]
            self._free.extend(c.index for c in out)
        return out

    @property
    def in_flight(self) -> int:
        with self._cv:
            return self._inflight

    # -------------------------------------------------------------- dispatcher ("the FUSE daemon's side")
    def _take_batch(self) -> list[_Sqe] | None:
        with self._cv:
            while True:
                if self._closed:
                    return None
                n = len(self._queue)
                if self.io_depth == 0 and n:
                    take = n
                elif self.io_depth > 0 and n >= self.io_depth:
                    take = self.io_depth
                elif self.io_depth < 0 and n:
                    want = -self.io_depth
                    end = time.monotonic() + self.timeout
                    while len(self._queue) < want and not self._closed and (left := end - time.monotonic()) > 0:
                        self._cv.wait(left)
                    take = min(want, len(self._queue))
                else:
                    self._cv.wait()
                    continue
                batch = [self._queue.popleft() for _ in range(take)]
                self._inflight += len(batch)
                return batch

    def _complete(self, sqe: _Sqe, result: int) -> None:
        try:
            sqe.view.release()  # so the Iov can close once its I/Os are done
        except (BufferError, ValueError):
            pass
        with self._cv:
            self._inflight -= 1
            self._done.append(Cqe(sqe.index, result, sqe.userdata))
            self._cv.notify_all()

    def _dispatch_loop(self) -> None:
        while (batch := self._take_batch()) is not None:
            self._exec.run(
                [(s.file, self.for_read, s.view, s.offset, lambda r, s=s: self._complete(s, r)) for s in batch]
            )
            del batch  # drop the views before blocking for the next batch

    # -------------------------------------------------------------- lifetime
    def destroy(self) -> None:
        """Wait for in-flight I/Os, then stop the dispatcher (hf3fs_iordestroy)."""
        with self._cv:
            while self._inflight:
                self._cv.wait(1.0)
            self._closed = True
            self._cv.notify_all()
        self._thread.join()
        self._exec.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.destroy()


# ------------------------------------------------------------------ the hf3fs_* style free functions
def prep_io(ior: Ior, iov: Iov, read: bool, ptr: int, fd: int, off: int, length: int, userdata=None) -> int:
    """`hf3fs_prep_io`: see `Ior.prep`."""
    return ior.prep(iov, ptr, fd, off, length, userdata, read=read)


def submit_ios(ior: Ior) -> int:
    """`hf3fs_submit_ios`: see `Ior.submit`."""
    return ior.submit()


def wait_for_ios(ior: Ior, max_results: int | None = None, min_results: int = 1, timeout: float | None = None):
    """`hf3fs_wait_for_ios`: see `Ior.wait`; returns a list of `Cqe`."""
    return ior.wait(max_results, min_results, timeout)
