"""Spawn a local gloo job on 127.0.0.1 and collect each rank's return value (tests, demo, timeline, bench).

>>> def hello(rank, world):
...     return rank * 10
>>> spawn(hello, 2)  # doctest: +SKIP
[0, 10]
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world: int, port: int, outdir: str, args: tuple, timeout_s: float) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)  # many ranks share few cores; one thread each also keeps matmuls reproducible
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(Path(outdir) / f"{rank}.pkl", "wb") as f:
        pickle.dump(result, f)


def spawn(fn, world: int, *args, timeout_s: float = 120.0) -> list:
    """Run `fn(rank, world, *args)` in `world` fresh processes joined by a gloo group; return their results.

    `fn` must be importable by the children (a module-level function). Raises if any rank fails.
    """
    if world < 1:
        raise ValueError(f"world: must be >= 1, got {world}")
    with tempfile.TemporaryDirectory(prefix="seekstack-pipeline-") as outdir:
        mp.spawn(_entry, args=(fn, world, free_port(), outdir, args, timeout_s), nprocs=world, join=True)
        results = []
        for r in range(world):
            with open(Path(outdir) / f"{r}.pkl", "rb") as f:
                results.append(pickle.load(f))
    return results
