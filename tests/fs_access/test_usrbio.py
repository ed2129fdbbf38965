"""USRBIO-style batched I/O: reads land in the caller's Iov at the right place (and nowhere else), io_depth
batching, ring limits, errors as -errno completions; on the real cluster and on a local directory."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from seekstack.fs.usrbio import Ior, Iov, dereg_fd, prep_io, reg_fd, submit_ios, wait_for_ios

POISON = 0xA5


def _write(client, path, data):
    client.write_bytes(path, data)


@pytest.fixture
def blob(client, uniq, rng):
    data = rng.integers(0, 256, 3 * 65536 + 4099, dtype=np.uint8).tobytes()  # odd length, spans 4 chunks
    path = uniq + ".bin"
    _write(client, path, data)
    f = client.open(path)
    fd = reg_fd(f)
    yield data, fd
    dereg_fd(fd)
    f.close()


def test_random_4k_reads_land_in_place(blob, rng):
    data, fd = blob
    n = 97
    offs = rng.integers(0, len(data) - 4096, n)
    slot = 4096 + 64  # gaps between slots must stay poisoned
    with Iov(n * slot) as iov, Ior(128) as ior:
        iov.array()[:] = POISON
        for i, off in enumerate(offs):
            prep_io(ior, iov, True, i * slot, fd, int(off), 4096, userdata=i)
        assert submit_ios(ior) == n
        cqes = wait_for_ios(ior, n, min_results=n)
        assert sorted(c.userdata for c in cqes) == list(range(n))
        assert all(c.result == 4096 for c in cqes)
        arr = iov.array().reshape(n, slot)
        for i, off in enumerate(offs):
            assert arr[i, :4096].tobytes() == data[off : off + 4096]
        assert (arr[:, 4096:] == POISON).all()
        del arr


def test_large_reads_and_short_read_at_eof(blob):
    data, fd = blob
    size = 1 << 16
    with Iov(4 * size) as iov, Ior(8) as ior:
        iov.array()[:] = POISON
        offs = [0, size, 2 * size, len(data) - 100]
        for i, off in enumerate(offs):
            prep_io(ior, iov, True, i * size, fd, off, size, userdata=off)
        submit_ios(ior)
        got = {c.userdata: c.result for c in wait_for_ios(ior, 4, min_results=4)}
        assert got == {0: size, size: size, 2 * size: size, len(data) - 100: 100}
        buf = iov.array()
        for i, off in enumerate(offs[:3]):
            assert buf[i * size : (i + 1) * size].tobytes() == data[off : off + size]
        assert buf[3 * size : 3 * size + 100].tobytes() == data[-100:]
        assert (buf[3 * size + 100 :] == POISON).all()  # nothing past EOF is written
        del buf


def test_io_depth_positive_waits_for_a_full_batch(blob):
    data, fd = blob
    with Iov(8 * 4096) as iov, Ior(16, io_depth=4) as ior:
        for i in range(3):
            prep_io(ior, iov, True, i * 4096, fd, i * 4096, 4096)
        submit_ios(ior)
        assert wait_for_ios(ior, 4, min_results=0, timeout=0.2) == []  # 3 < io_depth: nothing starts
        prep_io(ior, iov, True, 3 * 4096, fd, 3 * 4096, 4096)
        submit_ios(ior)
        assert len(wait_for_ios(ior, 4, min_results=4)) == 4
        assert bytes(iov.view(0, 4 * 4096)) == data[: 4 * 4096]


def test_io_depth_negative_starts_partial_batch_after_timeout(blob):
    data, fd = blob
    with Iov(8 * 4096) as iov, Ior(16, io_depth=-8, timeout=0.05) as ior:
        for i in range(3):
            prep_io(ior, iov, True, i * 4096, fd, i * 4096, 4096)
        submit_ios(ior)
        assert len(wait_for_ios(ior, 8, min_results=3, timeout=30)) == 3
        assert bytes(iov.view(0, 3 * 4096)) == data[: 3 * 4096]


def test_ring_limits_and_bad_arguments(blob):
    _, fd = blob
    with Iov(4 * 4096) as iov, Ior(2, io_depth=0) as ior:
        prep_io(ior, iov, True, 0, fd, 0, 4096)
        prep_io(ior, iov, True, 4096, fd, 0, 4096)
        with pytest.raises(OSError) as e:
            prep_io(ior, iov, True, 0, fd, 0, 4096)
        assert e.value.errno == errno.EAGAIN
        submit_ios(ior)
        assert len(wait_for_ios(ior, 2, min_results=2)) == 2
        with pytest.raises(ValueError, match="length"):
            prep_io(ior, iov, True, 3 * 4096, fd, 0, 8192)
        with pytest.raises(ValueError, match="ptr"):
            prep_io(ior, iov, True, -1, fd, 0, 10)
        with pytest.raises(ValueError, match="read"):
            prep_io(ior, iov, False, 0, fd, 0, 10)
        with pytest.raises(ValueError, match="offset"):
            prep_io(ior, iov, True, 0, fd, -5, 10)
        with pytest.raises(OSError) as e:
            prep_io(ior, iov, True, 0, 12345, 0, 10)
        assert e.value.errno == errno.EBADF
        with pytest.raises(ValueError, match="min_results"):
            wait_for_ios(ior, 4, min_results=1)  # nothing submitted: would block forever
    with pytest.raises(ValueError, match="entries"):
        Ior(0)
    with pytest.raises(ValueError, match="io_depth"):
        Ior(4, io_depth=5)
    with pytest.raises(ValueError, match="size"):
        Iov(0)


def test_write_ring_and_error_completion(client, uniq, rng):
    data = rng.integers(0, 256, 5 * 4096 + 7, dtype=np.uint8).tobytes()
    f = client.open(uniq + ".w", "w+b")
    fd = reg_fd(f)
    ro = client.open(uniq + ".w", "rb")
    rofd = reg_fd(ro)
    try:
        with Iov(len(data)) as iov, Ior(8, for_read=False) as ior:
            iov.view(0, len(data))[:] = data
            pieces = [(0, 4096), (4096, 8192), (12288, len(data) - 12288)]
            for off, n in reversed(pieces):  # order must not matter
                prep_io(ior, iov, False, off, fd, off, n)
            submit_ios(ior)
            assert sorted(c.result for c in wait_for_ios(ior, 3, min_results=3)) == sorted(n for _, n in pieces)
            prep_io(ior, iov, False, 0, rofd, 0, 16)  # writing through a read-only file: -EBADF, not an exception
            submit_ios(ior)
            (cqe,) = wait_for_ios(ior, 1, min_results=1)
            assert cqe.result == -errno.EBADF
    finally:
        dereg_fd(fd)
        dereg_fd(rofd)
        f.close()
        ro.close()
    assert client.read_bytes(uniq + ".w") == data


def test_os_fd_registration(tmp_path, rng):
    import os

    data = rng.integers(0, 256, 10000, dtype=np.uint8).tobytes()
    (tmp_path / "x").write_bytes(data)
    osfd = os.open(tmp_path / "x", os.O_RDONLY)
    fd = reg_fd(osfd)
    try:
        with Iov(4096) as iov, Ior(4) as ior:
            prep_io(ior, iov, True, 0, fd, 5000, 4096)
            submit_ios(ior)
            assert wait_for_ios(ior, 1)[0].result == 4096
            assert bytes(iov.view(0, 4096)) == data[5000:9096]
    finally:
        dereg_fd(fd)
        os.close(osfd)


def test_iov_is_shared_memory_another_process_can_attach():
    import subprocess
    import sys

    with Iov(1 << 16) as iov:
        iov.view(100, 5)[:] = b"hello"
        code = (
            "import sys; from seekstack.fs.usrbio import Iov; v = Iov(0, name=sys.argv[1]); "
            "print(bytes(v.view(100, 5)).decode()); v.view(0, 3)[:] = b'abc'; v.close()"
        )
        out = subprocess.run([sys.executable, "-c", code, iov.name], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "hello"
        assert bytes(iov.view(0, 3)) == b"abc"
