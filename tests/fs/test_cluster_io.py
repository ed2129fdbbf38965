"""End to end on a real local cluster (mgmtd, meta, 3 storage processes, 3 replicas) on 127.0.0.1: reads and
writes checked byte for byte against local files, striping and replication checked on every replica, errnos,
the cluster token, owner/mode bits, concurrent writers and renames, and the CLI."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import threading
import time
import zlib

import pytest

from seekstack.fs.meta.layout import chunk_id
from seekstack.fs.protocol import RpcError, call_sync
from seekstack.fs.testing import local_cluster

CHUNK = 64 << 10


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with local_cluster(
        tmp_path_factory.mktemp("fs") / "cluster",
        storage_nodes=3,
        replicas=3,
        targets_per_node=4,
        metas=2,
        chunk_size=CHUNK,
    ) as c:
        yield c


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_write_read_roundtrip_odd_sizes(fs, seed):
    rng = random.Random(seed)
    fs.mkdir("/rt", exist_ok=True)
    for n in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 12345]:
        data = rng.randbytes(n)
        with fs.open(f"/rt/f{n}", "wb") as f:
            assert f.write(data) == n
        assert fs.stat(f"/rt/f{n}").st_size == n
        assert sha(fs.read_bytes(f"/rt/f{n}")) == sha(data)


def test_large_chunks_roundtrip_and_overwrite(fs, seed):
    """2 MiB chunks (block writes on the storage I/O threads, O_DIRECT from the receive buffers) and a partial
    overwrite of one of them (a read-modify-write into a fresh block), checked against the bytes written."""
    rng = random.Random(seed)
    big = 2 << 20
    data = bytearray(rng.randbytes(2 * big + 4097))
    with fs.open("/big_chunks.bin", "wb", chunk_size=big) as f:
        assert f.write(data) == len(data)
    patch = rng.randbytes(1000)
    with fs.open("/big_chunks.bin", "r+b") as f:
        f.pwrite(patch, big + 12345)
    data[big + 12345 : big + 13345] = patch
    assert sha(fs.read_bytes("/big_chunks.bin")) == sha(bytes(data))
    with fs.open("/big_chunks.bin", "rb") as f:
        assert f.pread(3000, big - 1500) == bytes(data[big - 1500 : big + 1500])


def test_pread_pwrite_against_local_file(fs, tmp_path, seed):
    """Random overwrites, sparse extensions and reads at odd offsets, mirrored on a local file."""
    rng = random.Random(seed)
    local = os.open(tmp_path / "ref", os.O_RDWR | os.O_CREAT)
    try:
        with fs.open("/rw.bin", "w+b") as f:
            for _ in range(40):
                off, n = rng.randrange(0, 6 * CHUNK), rng.randrange(1, 2 * CHUNK)
                if rng.random() < 0.6:
                    data = rng.randbytes(n)
                    assert f.pwrite(data, off) == os.pwrite(local, data, off)
                else:
                    assert f.pread(n, off) == os.pread(local, n, off)
            size = os.fstat(local).st_size
            assert f.size == size
        assert fs.stat("/rw.bin").st_size == size  # settled from storage on close
        assert sha(fs.read_bytes("/rw.bin")) == sha(os.pread(local, size, 0))
        with fs.open("/rw.bin", "ab") as f:
            f.write(b"tail")
        os.pwrite(local, b"tail", size)
        fs.truncate("/rw.bin", size // 3)
        os.truncate(local, size // 3)
        assert fs.read_bytes("/rw.bin") == os.pread(local, size, 0)
        fs.truncate("/rw.bin", size // 3 + 2 * CHUNK)  # extend: a sparse zero tail
        os.truncate(local, size // 3 + 2 * CHUNK)
        assert fs.read_bytes("/rw.bin") == os.pread(local, size, 0)
    finally:
        os.close(local)


def test_striping_and_replicas(cluster, fs, seed):
    """Each chunk lives on the chain its layout names, with identical bytes on all three replicas."""
    rng = random.Random(seed)
    data = rng.randbytes(9 * CHUNK + 777)
    with fs.open("/striped.bin", "wb", stripe=4) as f:
        f.write(data)
        layout, ino = f.layout, f.ino
    assert len(set(layout.stripe_chains())) == 4
    routing = fs.routing()
    used = set()
    for idx in range(10):
        cid = layout.chain_of(idx)
        used.add(cid)
        chain = routing["chains"][str(cid)]
        assert len(chain["targets"]) == 3 and len({t["node"] for t in chain["targets"]}) == 3
        want = data[idx * CHUNK : (idx + 1) * CHUNK]
        for t in chain["targets"]:
            res = call_sync(t["addr"], cluster.token, "list_chunks", target=t["id"], inode=ino)
            assert chunk_id(ino, idx) in res["chunks"]
        # Read the chunk from every replica directly.
        got = {sha(_read_target(cluster, t, chunk_id(ino, idx))) for t in chain["targets"]}
        assert got == {sha(want)}
    assert len(used) == 4


def _read_target(cluster, t, cid):
    import asyncio

    from seekstack.fs.protocol import RpcClient

    async def go():
        host, port = t["addr"].rsplit(":", 1)
        c = RpcClient(host, int(port), cluster.token)
        try:
            _, data = await c.call_data("read", target=t["id"], chunk=cid, offset=0, length=CHUNK)
            return bytes(data)
        finally:
            await c.close()

    return asyncio.run(go())


def test_other_client_sees_closed_file(cluster, fs):
    with fs.open("/shared.txt", "wb") as f:
        f.write(b"hello from client one")
    with cluster.connect() as other:
        assert other.read_bytes("/shared.txt") == b"hello from client one"
        assert "shared.txt" in other.listdir("/")


def test_errnos_through_the_client(fs):
    fs.mkdir("/e", exist_ok=True)
    fs.write_bytes("/e/file", b"x")
    fs.mkdir("/e/sub", exist_ok=True)
    fs.write_bytes("/e/sub/y", b"y")
    cases = [
        (lambda: fs.open("/e/missing"), FileNotFoundError),
        (lambda: fs.open("/e", "wb"), IsADirectoryError),
        (lambda: fs.open("/e/sub", "rb"), IsADirectoryError),
        (lambda: fs.open("/e/file/x", "wb"), NotADirectoryError),
        (lambda: fs.open("/e/file", "xb"), FileExistsError),
        (lambda: fs.rmdir("/e/sub"), OSError),
        (lambda: fs.unlink("/e/sub"), IsADirectoryError),
        (lambda: fs.mkdir("/e/" + "n" * 256), OSError),
        (lambda: fs.stat(""), FileNotFoundError),
        (lambda: fs.rename("/e", "/e/sub/inside"), OSError),
    ]
    for fn, exc in cases:
        with pytest.raises(exc):
            fn()
    with pytest.raises(OSError) as ei:
        fs.rmdir("/e/sub")
    assert ei.value.errno == errno.ENOTEMPTY
    with pytest.raises(OSError) as ei:
        fs.mkdir("/e/" + "n" * 256)
    assert ei.value.errno == errno.ENAMETOOLONG
    with pytest.raises(ValueError, match="null"):
        fs.stat("/e/a\0b")
    with pytest.raises(ValueError, match="mode"):
        fs.open("/e/file", "rt")
    assert sorted(fs.listdir("/e")) == ["file", "sub"]  # nothing half-done
    assert fs.read_bytes("/e/file") == b"x"


def test_cluster_token_required(cluster):
    node = cluster.status()["nodes"]["0"]
    for bad in ["", "wrong-token"]:
        with pytest.raises(RpcError) as ei:
            call_sync(node, bad, "ping")
        assert ei.value.errno == errno.EACCES
        with pytest.raises(RpcError):
            call_sync(cluster.mgmtd, bad, "routing")
    assert call_sync(node, cluster.token, "ping")["node"] == 0


def test_owner_and_mode_bits_over_rpc(cluster, fs):
    fs.mkdir("/private", 0o700, exist_ok=True)
    fs.write_bytes("/private/root.txt", b"secret")
    fs.mkdir("/public", 0o777, exist_ok=True)
    with cluster.connect(uid=1000, gid=1000) as alice:
        with pytest.raises(PermissionError):
            alice.read_bytes("/private/root.txt")
        with pytest.raises(PermissionError):
            alice.mkdir("/alice")
        alice.write_bytes("/public/a.txt", b"mine", perm=0o600)
        assert alice.stat("/public/a.txt").st_uid == 1000
        with pytest.raises(PermissionError):
            alice.chmod("/private", 0o777)
    with cluster.connect(uid=1001, gid=1001) as bob:
        with pytest.raises(PermissionError):
            bob.read_bytes("/public/a.txt")
        with pytest.raises(PermissionError):
            bob.open("/public/a.txt", "r+b")


def test_concurrent_writers_and_renames(cluster, seed):
    fs_dir = "/conc"
    clients = [cluster.connect() for _ in range(3)]
    try:
        clients[0].mkdir(fs_dir, exist_ok=True)
        expected, errors = {}, []

        def worker(k):
            rng = random.Random(seed + k)
            try:
                for i in range(6):
                    data = rng.randbytes(rng.randrange(1, 3 * CHUNK))
                    clients[k].write_bytes(f"{fs_dir}/tmp{k}_{i}", data)
                    clients[k].rename(f"{fs_dir}/tmp{k}_{i}", f"{fs_dir}/final{k}_{i}")
                    expected[f"final{k}_{i}"] = sha(data)
                    # Everyone renames the same file over the same target: last one wins, no crash.
                    clients[k].write_bytes(f"{fs_dir}/race{k}", data)
                    clients[k].rename(f"{fs_dir}/race{k}", f"{fs_dir}/winner")
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        names = set(clients[1].listdir(fs_dir))
        assert names == set(expected) | {"winner"}
        for name, digest in expected.items():
            assert sha(clients[2].read_bytes(f"{fs_dir}/{name}")) == digest
    finally:
        for c in clients:
            c.close()


def test_unlink_removes_chunks(cluster, fs):
    fs.write_bytes("/gone.bin", os.urandom(3 * CHUNK))
    with fs.open("/gone.bin") as f:
        ino, layout = f.ino, f.layout
    fs.unlink("/gone.bin")
    routing = fs.routing()
    deadline = time.monotonic() + 10
    while True:
        left = [
            c
            for cid in set(layout.stripe_chains())
            for t in routing["chains"][str(cid)]["targets"]
            for c in call_sync(t["addr"], cluster.token, "list_chunks", target=t["id"], inode=ino)["chunks"]
        ]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert left == []
    assert not fs.exists("/gone.bin")


def test_cli_commands(cluster, tmp_path, capsys):
    from seekstack.fs.cli import main

    d = ["--data", str(cluster.dir)]
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(100_000))
    assert main(["mkdir", "-p", "3fs:/cli/x", *d]) == 0
    assert main(["cp", str(src), "3fs:/cli/x/in.bin", *d]) == 0
    assert main(["cp", "3fs:/cli/x/in.bin", str(tmp_path / "out.bin"), *d]) == 0
    assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()
    capsys.readouterr()
    assert main(["ls", "3fs:/cli", *d]) == 0
    assert capsys.readouterr().out.split() == ["x/"]
    assert main(["stat", "3fs:/cli/x/in.bin", *d]) == 0
    assert "size 100000" in capsys.readouterr().out
    fs_txt = tmp_path / "t.txt"
    fs_txt.write_bytes(b"cat me\n")
    assert main(["cp", str(fs_txt), "3fs:/cli/t.txt", *d]) == 0
    assert main(["status", *d]) == 0
    out = capsys.readouterr().out
    assert "chain 1" in out and "serving" in out
    assert main(["rm", "3fs:/cli/x", *d]) == 1  # not empty
    assert "Directory not empty" in capsys.readouterr().err
    assert main(["rm", "-r", "3fs:/cli", *d]) == 0
    assert main(["ls", "3fs:/cli", *d]) == 1


def test_cli_up_status_down(tmp_path):
    """`seekstack fs up` returns once the cluster serves and leaves it running; `fs down` stops every process."""
    import subprocess
    import sys

    d = tmp_path / "updown"
    run = [sys.executable, "-m", "seekstack", "fs"]  # the real entry point once...
    fast = [sys.executable, "-m", "seekstack.fs.cli"]  # ...then the same main() without the CLI's start-up cost
    up = subprocess.run(
        [*run, "up", "--data", str(d), "--storage-nodes", "2", "--replicas", "2", "--targets-per-node", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        assert up.returncode == 0, up.stderr
        assert "serving" in up.stdout
        st = subprocess.run([*fast, "status", "--data", str(d)], capture_output=True, text=True, timeout=60)
        assert st.returncode == 0 and "chain 1" in st.stdout and "alive" in st.stdout
        again = subprocess.run([*fast, "up", "--data", str(d)], capture_output=True, text=True, timeout=60)
        assert again.returncode == 1 and "already running" in again.stderr
    finally:
        down = subprocess.run([*fast, "down", "--data", str(d)], capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = [p for p in os.listdir("/proc") if p.isdigit() and str(d) in _cmdline(p)]
        if not left:
            break
        time.sleep(0.05)
    assert not left


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def test_diverged_replica_is_repaired_by_the_next_write(cluster, fs):
    """If an attempt the head aborted had committed on the tail (a timeout at the wrong moment), the next write
    detects the different base (CRC check) and re-sends the whole chunk above the tail's version."""
    fs.write_bytes("/div.bin", b"A" * 1000)
    with fs.open("/div.bin") as f:
        ino, layout = f.ino, f.layout
    cid = layout.chain_of(0)
    chain = fs.routing()["chains"][str(cid)]
    tail = chain["targets"][-1]
    bogus = b"Z" * 1000
    call_sync(
        tail["addr"],
        cluster.token,
        "forward",
        bogus,
        target=tail["id"],
        chain=cid,
        chain_ver=chain["version"],
        chunk=chunk_id(ino, 0),
        ver=2,
        op="write",
        offset=0,
        full=True,
        chunk_size=CHUNK,
        new_crc=zlib.crc32(bogus),
    )
    with fs.open("/div.bin", "r+b") as f:
        f.pwrite(b"B" * 10, 5)
    want = b"A" * 5 + b"B" * 10 + b"A" * 985
    got = {_read_target(cluster, t, chunk_id(ino, 0)) for t in chain["targets"]}
    assert got == {want}


def test_services_die_with_a_killed_launcher(tmp_path):
    """A launcher killed without cleaning up (kill -9 of pytest, a timeout) takes its services with it."""
    import subprocess
    import sys

    d = tmp_path / "orphan"
    script = (
        "import sys, time\n"
        "from seekstack.fs.cluster import Cluster\n"
        f"Cluster({str(d)!r}, storage_nodes=1, replicas=1, targets_per_node=1).start()\n"
        "print('up', flush=True)\n"
        "time.sleep(600)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "up"
        assert [q for q in os.listdir("/proc") if q.isdigit() and str(d) in _cmdline(q)]
    finally:
        p.kill()
        p.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = [q for q in os.listdir("/proc") if q.isdigit() and str(d) in _cmdline(q)]
        if not left:
            break
        time.sleep(0.05)
    assert not left


def test_concurrent_writes_to_one_chunk_lose_nothing(cluster, seed):
    """Writers hitting disjoint ranges of the same chunks at once: the head's per-chunk lock serializes the
    read-modify-write, so no update is lost on any replica."""
    rng = random.Random(seed)
    clients = [cluster.connect() for _ in range(4)]
    try:
        with clients[0].open("/one-chunk.bin", "wb") as f:
            f.write(bytes(2 * CHUNK))
        pieces = [rng.randbytes(CHUNK // 8) for _ in range(16)]
        files = [c.open("/one-chunk.bin", "r+b") for c in clients]

        def worker(k):
            for j in range(k, 16, 4):  # piece j lands at j * CHUNK/8: chunks 0 and 1, interleaved writers
                files[k].pwrite(pieces[j], j * (CHUNK // 8))

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for f in files:
            f.close()
        want = b"".join(pieces)
        assert clients[1].read_bytes("/one-chunk.bin") == want
        with clients[2].open("/one-chunk.bin") as f:
            ino, layout = f.ino, f.layout
        for idx in (0, 1):
            chain = clients[2].routing()["chains"][str(layout.chain_of(idx))]
            got = {_read_target(cluster, t, chunk_id(ino, idx)) for t in chain["targets"]}
            assert got == {want[idx * CHUNK : (idx + 1) * CHUNK]}
    finally:
        for c in clients:
            c.close()


def test_ftruncate_follows_the_inode_across_rename(fs):
    fs.write_bytes("/ft-a", b"0123456789" * 20_000)
    with fs.open("/ft-a", "r+b") as f:
        fs.rename("/ft-a", "/ft-b")
        f.truncate(12345)
        f.seek(0, os.SEEK_END)
        assert f.tell() == 12345
    assert fs.stat("/ft-b").st_size == 12345
    assert fs.read_bytes("/ft-b") == (b"0123456789" * 20_000)[:12345]
    with fs.open("/ft-b", "rb") as f, pytest.raises(OSError) as ei:
        f.truncate(0)
    assert ei.value.errno == errno.EBADF


def test_readinto_receives_in_place_against_local_file(fs, tmp_path, seed):
    """readinto/preadinto fill a caller's buffer (NaN-like 0xAB poison outside the read) straight from storage:
    holes, short last chunks and odd offsets match a local file read with os.preadv."""
    rng = random.Random(seed)
    local = os.open(tmp_path / "ri", os.O_RDWR | os.O_CREAT)
    try:
        with fs.open("/ri.bin", "w+b") as f:
            for off in (0, 3 * CHUNK + 17, 5 * CHUNK - 5):  # chunk 1..2 stay holes
                data = rng.randbytes(rng.randrange(1, CHUNK))
                f.pwrite(data, off)
                os.pwrite(local, data, off)
            size = os.fstat(local).st_size
            for _ in range(12):
                off, n = rng.randrange(0, size + CHUNK), rng.randrange(1, 3 * CHUNK)
                got, want = bytearray(b"\xab" * (n + 7)), bytearray(b"\xab" * (n + 7))
                k = f.preadinto(memoryview(got)[3 : 3 + n], off)
                assert k == os.preadv(local, [memoryview(want)[3 : 3 + n]], off)
                assert got == want
            f.seek(0)
            buf, out = bytearray(CHUNK + 3), bytearray()
            while k := f.readinto(buf):
                out += buf[:k]
            assert out == os.pread(local, size, 0) and f.tell() == size
    finally:
        os.close(local)


def test_cold_reads_from_evicted_chunk_files(cluster, fs, seed):
    """Block files dropped from the page cache (the storage sends whole chunks with sendfile straight from the
    disk, partial ones with a read on an I/O thread) read back byte for byte, whole chunks and partial ones alike."""
    data = random.Random(seed).randbytes(7 * CHUNK + 321)
    fs.write_bytes("/cold.bin", data)
    os.sync()
    for d, _, names in os.walk(cluster.dir):
        for n in names:
            fd = os.open(os.path.join(d, n), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    with fs.open("/cold.bin", "rb") as f:
        assert sha(f.pread(3 * CHUNK, CHUNK // 2)) == sha(data[CHUNK // 2 : CHUNK // 2 + 3 * CHUNK])
        assert sha(f.read()) == sha(data)


def test_close_on_the_client_loop_thread_does_not_deadlock(cluster, fs):
    # pyarrow/pandas can drop the last reference to a File on any thread, including the client's event-loop thread;
    # io.RawIOBase.__del__ then calls close(), which must not wait on the loop it is running on.
    f = fs.open("/closed_on_loop.bin", "wb")
    f.write(b"y" * 777)
    done = threading.Event()
    fs._loop.call_soon_threadsafe(lambda: (f.close(), done.set()))
    assert done.wait(10), "close() on the loop thread hung"
    deadline = time.monotonic() + 10
    while fs.stat("/closed_on_loop.bin").st_size != 777:  # the close reaches meta asynchronously
        assert time.monotonic() < deadline, "the close never reached meta"
        time.sleep(0.05)
    with cluster.connect() as other, other.open("/closed_on_loop.bin", "rb") as g:
        assert g.read() == b"y" * 777
