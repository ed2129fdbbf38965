"""Entry point of every service process: `python -m seekstack.fs.server {mgmtd,meta,storage} --data DIR ...`.

Each process writes its port to `DIR/run/<name>.port` once it serves, so launchers can wait on it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from seekstack.fs.protocol import read_token


def _ready_writer(data_dir: str, name: str):
    def ready(port: int):
        run = os.path.join(data_dir, "run")
        os.makedirs(run, exist_ok=True)
        tmp = os.path.join(run, f"{name}.port.tmp")
        with open(tmp, "w") as f:
            f.write(str(port))
        os.replace(tmp, os.path.join(run, f"{name}.port"))

    return ready


def _die_with_launcher():
    """Tests and demos launch services tied to their own life (`SEEKSTACK_FS_DIE_WITH=<pid>`): if the launcher
    dies without stopping us (a crash, a timeout kill), the kernel kills us too, so nothing leaks."""
    watch = os.environ.get("SEEKSTACK_FS_DIE_WITH")
    if not watch or not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != int(watch):  # the launcher died before prctl took effect
        sys.exit(1)


def _keep_freed_memory():
    """Every RPC payload (a chunk: 1 MiB by default) is received into a fresh buffer. glibc serves such sizes
    with mmap, or trims them off the heap once freed, so each buffer costs a page fault per 4 KiB when first
    written — more CPU than the data copy itself. Keep them on the heap and keep freed heap memory, so buffers
    reuse warm pages. Only this service process is tuned (the client leaves its host process alone)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: allocations below 32 MiB come from the heap
        libc.mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD: return heap memory only when 128 MiB lie free at its top
    except (OSError, AttributeError):  # not glibc
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="seekstack.fs.server")
    p.add_argument("role", choices=["mgmtd", "meta", "storage"])
    p.add_argument("--data", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--mgmtd", default="", help="host:port of mgmtd (meta, storage)")
    p.add_argument("--node", type=int, default=0, help="storage node id")
    p.add_argument("--name", default="", help="name for the port file")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--targets-per-node", type=int, default=4)
    p.add_argument("--lease", type=float, default=2.0)
    p.add_argument("--client-timeout", type=float, default=10.0, help="meta: prune sessions of silent clients")
    p.add_argument("--kv", default="", help="meta KV store URL (default sqlite:///DIR/meta.db)")
    p.add_argument("--chunk-size", type=int, default=1 << 20)
    p.add_argument("--stripe", type=int, default=0)
    p.add_argument("--root-owner", default=f"{os.getuid()}:{os.getgid()}", help="uid:gid of a new root directory")
    a = p.parse_args(argv)
    _die_with_launcher()
    _keep_freed_memory()
    token = read_token(a.data)
    name = a.name or (a.role if a.role != "storage" else f"storage{a.node}")
    ready = _ready_writer(a.data, name)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if a.role == "mgmtd":
        from seekstack.fs.mgmtd.service import Mgmtd

        svc = Mgmtd(
            a.data, token, nodes=a.nodes, replicas=a.replicas, targets_per_node=a.targets_per_node, lease=a.lease
        )
        coro = svc.run(a.host, a.port, ready)
    elif a.role == "meta":
        from seekstack.fs.meta.service import MetaService

        kv = a.kv or f"sqlite://{os.path.abspath(os.path.join(a.data, 'meta.db'))}"
        uid, gid = (int(x) for x in a.root_owner.split(":"))
        svc = MetaService(
            kv,
            token,
            a.mgmtd,
            a.host,
            chunk_size=a.chunk_size,
            stripe=a.stripe,
            root_owner=(uid, gid),
            client_timeout=a.client_timeout,
        )
        coro = svc.run(a.port, ready)
    else:
        from seekstack.fs.storage.service import StorageNode

        svc = StorageNode(a.data, a.node, token, a.mgmtd, a.host)
        coro = svc.run(a.port, ready)
    prof = _profiler(name)
    try:
        asyncio.run(coro)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        if prof is not None:
            prof()
    return 0


def _profiler(name: str):
    """`SEEKSTACK_FS_PROFILE=DIR`: profile this service with cProfile and dump `DIR/<name>.prof` when it stops
    (SIGTERM), for finding where the data path spends its time."""
    out = os.environ.get("SEEKSTACK_FS_PROFILE")
    if not out:
        return None
    import cProfile
    import time

    prof = cProfile.Profile(time.thread_time)  # CPU time of the loop thread: idle waits and preemption left out
    prof.enable()

    def dump():
        prof.disable()
        os.makedirs(out, exist_ok=True)
        prof.dump_stats(os.path.join(out, f"{name}.prof"))

    return dump


if __name__ == "__main__":
    raise SystemExit(main())
