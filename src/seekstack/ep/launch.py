"""Spawn a small process group on 127.0.0.1 and run one function per rank; used by the tests, the demo and the bench.

gloo by default (CPU tensors); with `backend="nccl"` rank r binds to GPU `r % device_count` first (NCCL refuses two
ranks on one GPU, so a single GPU means a world of one).

The function is named by file path and attribute, so it need not live in an importable module (pytest test files
are not). Each rank's return value comes back pickled; a rank that fails, hangs past `timeout_s` or dies is
reported with its traceback instead of hanging the caller.

>>> # results = run_ranks("/path/to/checks.py", "worker", world_size=2, args=(...,))
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import pickle
import queue
import socket
import sys
import tempfile
import time
import traceback


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(path: str, attr: str):
    spec = importlib.util.spec_from_file_location(f"_ep_spawned_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(mod)
    return getattr(mod, attr)


def _child(rank, world_size, port, path, attr, args, pg_timeout_s, results, threads, backend):
    import torch
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=pg_timeout_s)
        )
        value = _load(path, attr)(rank, world_size, *args)
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def run_ranks(
    path: str,
    attr: str,
    world_size: int,
    args: tuple = (),
    timeout_s: float = 120.0,
    pg_timeout_s: float = 30.0,
    threads: int = 1,
    allow_missing: bool = False,
    backend: str = "gloo",
) -> list[object]:
    """Run `attr(rank, world_size, *args)` from file `path` in `world_size` spawned ranks; returns the values.

    Raises RuntimeError with the failing ranks' tracebacks if any rank raises, dies or exceeds `timeout_s`; with
    `allow_missing`, a rank that exits without a result (on purpose, in failure tests) gives None instead.
    """
    import torch.multiprocessing as mp

    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_child,
            args=(r, world_size, port, path, attr, args, pg_timeout_s, results, threads, backend),
            daemon=True,
        )
        for r in range(world_size)
    ]
    tempfile.gettempdir()  # resolve before children start, so they share it
    for p in procs:
        p.start()
    got: dict[int, tuple[bool, object]] = {}
    deadline = time.monotonic() + timeout_s
    while len(got) < world_size and time.monotonic() < deadline:
        try:
            rank, ok, payload = results.get(timeout=0.5)
            got[rank] = (ok, payload)
        except queue.Empty:
            if all(not p.is_alive() for p in procs) and results.empty():
                break
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()) if len(got) == world_size else 0.5)
        if p.is_alive():
            p.kill()
            p.join()
    errors = []
    for r in range(world_size):
        if r not in got:
            if allow_missing:
                continue
            errors.append(f"rank {r}: no result (died or timed out after {timeout_s:.0f} s)")
        elif not got[r][0]:
            errors.append(f"rank {r}:\n{got[r][1]}")
    if errors:
        raise RuntimeError("spawned EP ranks failed:\n" + "\n".join(errors))
    return [pickle.loads(got[r][1]) if r in got else None for r in range(world_size)]
