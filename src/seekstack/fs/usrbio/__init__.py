"""Batched zero-copy I/O in the style of 3FS USRBIO: a shared-memory buffer (`Iov`), a submission ring per thread
(`Ior`), fd registration and the `prep_io` / `submit_ios` / `wait_for_ios` calls.

>>> # from seekstack.fs import connect
>>> # from seekstack.fs.usrbio import Iov, Ior, reg_fd, prep_io, submit_ios, wait_for_ios
>>> # fs = connect("/tmp/3fs"); fd = reg_fd(fs.open("/big.bin"))
>>> # with Iov(64 << 20) as iov, Ior(entries=256, io_depth=0) as ior:
>>> #     for i in range(64): prep_io(ior, iov, True, i << 20, fd, i << 20, 1 << 20)
>>> #     submit_ios(ior); done = wait_for_ios(ior, 64, min_results=64)
"""

from seekstack.fs.usrbio.ior import Cqe, Ior, dereg_fd, prep_io, reg_fd, submit_ios, wait_for_ios
from seekstack.fs.usrbio.iov import Iov
from seekstack.fs.usrbio.localdir import LocalDirClient

__all__ = ["Cqe", "Ior", "Iov", "LocalDirClient", "dereg_fd", "prep_io", "reg_fd", "submit_ios", "wait_for_ios"]
