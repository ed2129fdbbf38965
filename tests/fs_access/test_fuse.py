"""The FUSE mount (`seekstack fs mount`): ordinary tools and Python's open on the mount, POSIX behaviour with the
right errno, unmount by `umount_main` and by SIGTERM to the daemon; nothing stays mounted or running."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from seekstack.fs.fuse import is_mounted, mount_main, umount_main

pytest.importorskip("pyfuse3", reason="pyfuse3 (apt fuse3 libfuse3-dev pkg-config; pip pyfuse3) is not installed")
if not os.access("/dev/fuse", os.R_OK | os.W_OK):
    pytest.skip("/dev/fuse is not usable here", allow_module_level=True)


def _wait(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture(scope="module")
def mnt(cluster, tmp_path_factory):
    mp = tmp_path_factory.mktemp("mnt")
    assert mount_main([str(mp), "--data", str(cluster.dir)]) == 0
    try:
        yield mp
    finally:
        if is_mounted(mp):
            assert umount_main([str(mp)]) == 0
        assert not is_mounted(mp)
        # the daemon exits once unmounted
        assert _wait(lambda: not _daemons(mp)), "FUSE daemon still running after unmount"


def _daemons(mp) -> list[str]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                cmd = open(f"/proc/{p}/cmdline", "rb").read().decode(errors="replace")
            except OSError:
                continue
            if "seekstack.fs.fuse.main" in cmd and str(mp) in cmd:
                out.append(p)
    return out


def sh(cmd: str, cwd) -> str:
    return subprocess.run(cmd, shell=True, cwd=cwd, check=True, capture_output=True, text=True).stdout


def test_ordinary_tools(mnt, fs, rng):
    d = mnt / "tools"
    data = rng.integers(0, 256, 300_001, dtype=np.uint8).tobytes()
    src = mnt.parent / "src.bin"
    src.write_bytes(data)
    sh(f"mkdir tools && cp {src} tools/a.bin && mv tools/a.bin tools/b.bin", mnt)
    assert sh("ls tools", mnt).split() == ["b.bin"]
    assert sh("cat tools/b.bin | sha256sum", mnt) == sh(f"sha256sum < {src}", mnt)
    assert sh("stat -c '%s %F' tools/b.bin", mnt).strip() == "300001 regular file"
    sh("dd if=tools/b.bin of=tools/c.bin bs=4096 skip=3 count=5 status=none", mnt)
    assert (d / "c.bin").read_bytes() == data[3 * 4096 : 8 * 4096]
    assert fs.read_bytes("/tools/b.bin") == data  # what the mount wrote is on the cluster
    fs.write_bytes("/tools/from_client.txt", b"written by the client\n")
    assert sh("cat tools/from_client.txt", mnt) == "written by the client\n"
    sh("rm -r tools", mnt)
    assert not d.exists()


def test_posix_behaviour(mnt):
    d = mnt / "posix"
    d.mkdir()
    p = d / "f.txt"
    with open(p, "w") as f:  # create + write
        f.write("hello")
    with open(p, "a") as f:  # append
        f.write(" world")
    assert p.read_text() == "hello world"
    with open(p, "r+b") as f:  # positioned overwrite
        f.seek(6)
        f.write(b"WORLD")
        f.flush()
        assert os.fstat(f.fileno()).st_size == 11
    assert p.read_bytes() == b"hello WORLD"
    os.truncate(p, 5)
    assert p.read_bytes() == b"hello"
    with open(p, "r+b") as f:
        f.truncate(2)
    assert p.read_bytes() == b"he"
    with open(p, "wb") as f:  # O_TRUNC
        f.write(b"new")
    assert p.read_bytes() == b"new"
    os.rename(p, d / "g.txt")
    assert not p.exists() and (d / "g.txt").read_bytes() == b"new"
    os.symlink("g.txt", d / "link")
    assert os.readlink(d / "link") == "g.txt" and (d / "link").read_bytes() == b"new"
    assert os.lstat(d / "link").st_mode & 0o170000 == 0o120000
    os.mkdir(d / "sub")
    os.chmod(d / "g.txt", 0o600)
    assert os.stat(d / "g.txt").st_mode & 0o777 == 0o600
    os.utime(d / "g.txt", (1_000_000_000, 1_100_000_000))
    assert os.stat(d / "g.txt").st_mtime == pytest.approx(1_100_000_000, abs=1e-3)
    assert sorted(os.listdir(d)) == ["g.txt", "link", "sub"]
    st = os.stat(d / "sub")
    assert st.st_mode & 0o170000 == 0o040000
    # errno for errors
    cases = [
        (lambda: open(d / "missing"), errno.ENOENT),
        (lambda: os.rmdir(d), errno.ENOTEMPTY),
        (lambda: os.mkdir(d / "sub"), errno.EEXIST),
        (lambda: open(d / "g.txt" / "x", "w"), errno.ENOTDIR),
        (lambda: os.unlink(d / "sub"), errno.EISDIR),
        (lambda: os.rmdir(d / "g.txt"), errno.ENOTDIR),
        (lambda: os.open(d / "g.txt", os.O_CREAT | os.O_EXCL | os.O_WRONLY), errno.EEXIST),
    ]
    for fn, want in cases:
        with pytest.raises(OSError) as e:
            fn()
        assert e.value.errno == want, (fn, e.value)
    os.unlink(d / "link")
    os.unlink(d / "g.txt")
    os.rmdir(d / "sub")
    os.rmdir(d)
    assert not d.exists()


def test_sigterm_unmounts_cleanly(local, tmp_path):
    """A foreground daemon (here over a local directory, so it is quick) unmounts and exits 0 on SIGTERM."""
    local.write_bytes("/x", b"abc")
    mp = tmp_path / "m"
    mp.mkdir()
    cmd = [sys.executable, "-m", "seekstack.fs.fuse.main", str(mp), "--foreground", "--local", local.root]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert _wait(lambda: is_mounted(mp) or proc.poll() is not None), "mount did not appear"
        assert is_mounted(mp), proc.stdout.read()
        assert (mp / "x").read_bytes() == b"abc"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert not is_mounted(mp)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if is_mounted(mp):
            subprocess.run(["fusermount3", "-u", "-z", str(mp)])


def test_mount_cli_errors(tmp_path):
    assert mount_main([str(tmp_path / "nope"), "--local", str(tmp_path)]) == 2
    assert umount_main([str(tmp_path)]) == 1  # nothing mounted there
