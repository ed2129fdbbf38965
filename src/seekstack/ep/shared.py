"""Shared-memory windows: the NVLink buffer of DeepEP's intranode kernels, for gloo ranks on one host.

Every rank owns two windows (memfd files) and maps every peer's through `/proc/<pid>/fd`. An exchange is: each rank
writes what it offers into its own window, one barrier, then each rank copies what it needs straight out of its
peers' windows (or, in combine, sums it from there). So a row crosses memory twice, where a socket moves it through
the kernel (user → socket buffer → user) with a system call per chunk.

The barrier is a pipe per rank: a rank writes its barrier number into every peer's pipe and sleeps in `select` on
its own until all peers' numbers arrived (~0.1 ms with 4 ranks on 2 cores, where gloo's barrier took 2.1 ms and a
one-value all_reduce 1.1 ms). The kernel's pipe locks order the window writes before the peers' reads. Each peer's
pidfd is in the same `select`, so a peer that exits ends the wait with an error at once; a live peer that does not
come ends it after the Buffer's timeout.

Why two windows: exchange n uses window n % 2. A rank rewrites window p in exchange n + 2 only after passing the
barrier of exchange n + 1, which every peer entered after it had finished reading exchange n — so no rank
overwrites rows a peer is still reading, with one barrier per exchange. (A deferred read, `async_finish`, is
completed before the rank's next exchange starts; see `Buffer.settle_shared`.) Windows grow on demand (ftruncate)
and only touched pages take memory.

>>> # inside a gloo group whose ranks share a host:
>>> # win = SharedWindows.open(group, rank, world_size, timeout)   # None when the ranks are not on one host
>>> # mine = win.own(nbytes); ...fill it...; wait_work(win.sync(step), timeout, step); theirs = win.peer(j, nbytes)
"""

from __future__ import annotations

import errno
import mmap
import os
import select
import struct
import time
import weakref
from collections import Counter

import torch

from .events import EPCommError
from .routing import HEADER, check_headers
from .transport import gather_headers

_GROW = 2 << 20  # windows grow in 2 MiB steps at least (a ftruncate and a remap each time)


def _map(fd: int) -> tuple[torch.Tensor, int]:
    """The whole file `fd` as a writable uint8 tensor (empty for an empty file) and its size."""
    size = os.fstat(fd).st_size
    if size == 0:
        return torch.empty(0, dtype=torch.uint8, device="cpu"), 0
    return torch.frombuffer(mmap.mmap(fd, size), dtype=torch.uint8), size


class SharedWindows:
    """Two windows per rank of a group on one host, mapped by every rank; see the module docstring."""

    def __init__(self, rank: int, fds: list[list[int]], wake: int, peer_pipes: dict, pidfds: dict) -> None:
        self.rank = rank
        self._fds = fds  # [rank][parity]: this rank's own memfds and its opened views of the peers'
        self._maps = [[_map(fd) for fd in pair] for pair in fds]
        self._wake = wake  # read end of this rank's barrier pipe
        self._peer_pipes = peer_pipes  # rank -> write end of that peer's barrier pipe
        self._pidfds = pidfds  # pidfd -> rank, readable once that peer has exited
        self._arrived: Counter[int] = Counter()  # barrier number -> peers that reached it
        self._barrier = 0
        self.parity = 1
        every = [*(f for pair in fds for f in pair), *peer_pipes.values(), *pidfds, wake]
        self._close = weakref.finalize(self, _close_all, every)  # also when the Buffer is dropped unclosed

    @staticmethod
    def supported() -> bool:
        """Whether this platform has what the windows use (Linux: memfd, pidfd, /proc/<pid>/fd)."""
        return all(hasattr(os, f) for f in ("memfd_create", "pidfd_open", "pipe2")) and os.path.isdir("/proc/self/fd")

    @classmethod
    def open(cls, group, rank: int, num_ranks: int, timeout, step: str) -> SharedWindows | None:
        """Create this rank's windows and barrier pipe and open the peers' (collective). None on every rank when
        any rank cannot open a peer's (ranks on different hosts or in different pid namespaces)."""
        own = [os.memfd_create(f"seekstack-ep-{rank}-{p}", os.MFD_CLOEXEC) for p in (0, 1)]
        wake, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        ids = [os.fstat(fd) for fd in (*own, wake_w)]
        mine = [os.getpid(), *own, wake_w, ids[0].st_dev, *(st.st_ino for st in ids)]
        rows = gather_headers(group, torch.tensor(mine, dtype=torch.int64), num_ranks, timeout, step).tolist()
        opened: list[int] = []
        fds: list[list[int]] = []
        peer_pipes, pidfds = {}, {}
        ok = True
        try:
            for j, (pid, fd0, fd1, pipe_w, dev, ino0, ino1, ino_p) in enumerate(rows):
                if j == rank:
                    fds.append(own)
                    continue
                pair = []
                for fd, ino, flags, dst in (
                    (fd0, ino0, os.O_RDWR, pair),
                    (fd1, ino1, os.O_RDWR, pair),
                    (pipe_w, ino_p, os.O_WRONLY | os.O_NONBLOCK, None),
                ):
                    f = os.open(f"/proc/{pid}/fd/{fd}", flags | os.O_CLOEXEC)
                    opened.append(f)
                    st = os.fstat(f)
                    if (st.st_dev if dst is not None else dev, st.st_ino) != (dev, ino):
                        raise OSError(errno.ESTALE, "not the same file")  # a namesake on another host
                    if dst is None:
                        peer_pipes[j] = f
                    else:
                        dst.append(f)
                fds.append(pair)
                pidfd = os.pidfd_open(pid)
                opened.append(pidfd)
                pidfds[pidfd] = j
        except OSError:
            ok = False
        agreed = gather_headers(group, torch.tensor([int(ok)], dtype=torch.int64), num_ranks, timeout, step)
        os.close(wake_w)  # the peers hold their own write ends
        if not bool(agreed.all()):
            for f in (*opened, *own, wake):
                os.close(f)
            return None
        return cls(rank, fds, wake, peer_pipes, pidfds)

    def begin(self) -> int:
        """Start an exchange: switch to the other window pair; returns its parity."""
        self.parity ^= 1
        return self.parity

    def own(self, nbytes: int) -> torch.Tensor:
        """This rank's current window, grown to at least `nbytes` (uint8)."""
        view, size = self._maps[self.rank][self.parity]
        if size < nbytes:
            fd = self._fds[self.rank][self.parity]
            os.ftruncate(fd, max(nbytes, 2 * size, _GROW))
            view, size = self._maps[self.rank][self.parity] = _map(fd)
        return view

    def peer(self, j: int, nbytes: int) -> torch.Tensor:
        """Rank j's current window (this rank's own for j == rank), mapped to cover at least `nbytes`."""
        view, size = self._maps[j][self.parity]
        if size < nbytes:
            view, size = self._maps[j][self.parity] = _map(self._fds[j][self.parity])
            if size < nbytes:
                raise RuntimeError(f"rank {j}'s shared window holds {size} bytes, {nbytes} expected")
        return view

    def barrier(self, timeout, step: str) -> None:
        """Wait until every rank has reached this barrier (each rank's windows are written): `EPCommError` naming
        `step` if a peer exited, or after `timeout` (a timedelta, or None for no limit)."""
        self._barrier += 1
        n, msg = self._barrier, struct.pack("<q", self._barrier)
        for j, f in self._peer_pipes.items():
            try:
                os.write(f, msg)
            except OSError as exc:  # EPIPE: the peer is gone; EAGAIN: it is thousands of barriers behind
                raise EPCommError(f"{step}: rank {j} does not take part ({exc.strerror})") from exc
        deadline = None if timeout is None else time.monotonic() + timeout.total_seconds()
        watch = [self._wake, *self._pidfds]
        while self._arrived[n] < len(self._peer_pipes):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise EPCommError(f"{step}: timed out after {timeout.total_seconds():g} s waiting for peers")
            ready, _, _ = select.select(watch, [], [], left)
            for f in ready:
                if f in self._pidfds:
                    raise EPCommError(f"{step}: rank {self._pidfds[f]} exited")
            if self._wake in ready:
                try:
                    data = os.read(self._wake, 4096)
                except BlockingIOError:
                    continue
                self._arrived.update(v for (v,) in struct.iter_unpack("<q", data) if v >= n)
        del self._arrived[n]

    def close(self) -> None:
        """Close the descriptors; mapped windows stay valid while tensors view them."""
        self._maps = []
        self._close()
        self._fds, self._peer_pipes, self._pidfds = [], {}, {}


def _close_all(fds: list[int]) -> None:
    for f in fds:
        try:
            os.close(f)
        except OSError:
            pass


def sections(*sizes: int) -> list[int]:
    """Start offsets of consecutive 64-byte-aligned window sections of `sizes` bytes, and the total at the end."""
    out = [0]
    for n in sizes:
        out.append((out[-1] + n + 63) // 64 * 64)
    return out


def view(win: torch.Tensor, start: int, dtype: torch.dtype, rows: int, cols: int) -> torch.Tensor:
    """Bytes `start..` of a window as a `[rows, cols]` tensor of `dtype`."""
    return win[start : start + rows * cols * dtype.itemsize].view(dtype).view(rows, cols)


def read_headers(windows: SharedWindows, num_ranks: int, length: int, step: str) -> list[torch.Tensor]:
    """Every rank's int64 window header of `length` values, after checking the six constants of `routing` that
    every header starts with (ranks in different calls raise the same `EPCommError` everywhere)."""
    heads = [windows.peer(j, 8 * HEADER)[: 8 * HEADER].view(torch.int64) for j in range(num_ranks)]
    check_headers([h.tolist() for h in heads], step)
    return [windows.peer(j, 8 * length)[: 8 * length].view(torch.int64) for j in range(num_ranks)]
