"""Recorded pipeline runs on spawned gloo ranks, shared by the timeline command, the demo and the benchmark.

`record_run` (run inside each rank) builds a model for one schedule, runs warm-up steps, then measured steps with
the executor's per-action timeline on, and gathers every rank's events on rank 0.

Models: ``sleep`` stages cost fixed F/B/W times without using the CPU (clean bubbles on a small machine);
``mlp`` stages are upstream's example MLP (real compute, which ranks sharing few cores slow down).
All schedules get the same model: the same total work per micro-batch, split into as many stages as the schedule
has (N for 1F1B/ZB1P/DualPipe, 2N for DualPipeV), and the same number of micro-batches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from seekstack.pipeline.dualpipe import DualPipe
from seekstack.pipeline.dualpipev import DualPipeV
from seekstack.pipeline.linear import LinearPipeline
from seekstack.pipeline.models import MLPStage, SleepStage, mse


@dataclass(frozen=True)
class RunConfig:
    """What to run. `f`, `b`, `w` are seconds per micro-batch for the *whole* model (sleep model)."""

    schedule: str = "dualpipe"
    num_chunks: int = 8
    model: str = "sleep"
    f: float = 0.04
    b: float = 0.08
    w: float = 0.04
    hidden: int = 64
    seq: int = 16
    micro_batch: int = 2
    warmup: int = 1
    repeats: int = 3


def num_stages(schedule: str, num_ranks: int) -> int:
    return 2 * num_ranks if schedule == "dualpipev" else num_ranks


def _stage(cfg: RunConfig, stages: int, seed: int):
    if cfg.model == "sleep":
        return SleepStage(cfg.f / stages, cfg.b / stages, cfg.w / stages)
    if cfg.model == "mlp":
        torch.manual_seed(seed)
        return MLPStage(cfg.hidden)
    raise ValueError(f"model: expected 'sleep' or 'mlp', got {cfg.model!r}")


def build(cfg: RunConfig, rank: int, num_ranks: int):
    """This rank's pipeline for `cfg.schedule`."""
    n = num_stages(cfg.schedule, num_ranks)
    if cfg.schedule == "dualpipe":
        pipe = DualPipe((_stage(cfg, n, rank), _stage(cfg, n, n - 1 - rank)))
    elif cfg.schedule == "dualpipev":
        pipe = DualPipeV((_stage(cfg, n, rank), _stage(cfg, n, n - 1 - rank)))
    else:
        pipe = LinearPipeline(_stage(cfg, n, rank), schedule=cfg.schedule)
    width = 1 if cfg.model == "sleep" else cfg.hidden
    pipe.set_p2p_tensor_shapes([(cfg.micro_batch, cfg.seq, width)])
    pipe.set_p2p_tensor_dtype(torch.float32)
    return pipe, width


def record_run(rank: int, world: int, cfg: RunConfig) -> dict | None:
    """Run `cfg` on this rank; rank 0 returns step times and every rank's timeline of the last step."""
    pipe, width = build(cfg, rank, world)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.num_chunks * cfg.micro_batch, cfg.seq, width, generator=g)
    y = torch.randn(cfg.num_chunks * cfg.micro_batch, cfg.seq, width, generator=g)
    kw: dict = {}
    args: tuple = ()
    if cfg.schedule == "dualpipe":
        half = x.shape[0] // 2
        if rank == 0:
            args, kw = (x[:half],), {"criterion": mse, "labels": [y[half:]]}
        elif rank == world - 1:
            args, kw = (x[half:],), {"criterion": mse, "labels": [y[:half]]}
    elif cfg.schedule == "dualpipev":
        if rank == 0:
            args, kw = (x,), {"criterion": mse, "labels": [y]}
    else:
        args = (x,) if rank == 0 else ()
        kw = {"criterion": mse, "labels": [y]} if rank == world - 1 else {}
    step_times = []
    for i in range(cfg.warmup + cfg.repeats):
        pipe.record_timeline = i == cfg.warmup + cfg.repeats - 1
        dist.barrier()
        t0 = time.perf_counter()
        pipe.step(*args, num_chunks=cfg.num_chunks, **kw)
        dist.barrier()
        if i >= cfg.warmup:
            step_times.append(time.perf_counter() - t0)
        pipe.zero_grad(set_to_none=True)
    events = [dict(e, rank=rank) for e in pipe.timeline]
    gathered = [None] * world
    dist.all_gather_object(gathered, events)
    if rank != 0:
        return None
    step_times.sort()
    return {
        "schedule": cfg.schedule,
        "num_ranks": world,
        "num_chunks": cfg.num_chunks,
        "step_time": step_times[len(step_times) // 2],
        "events": [e for evs in gathered for e in evs],
    }


def torch_1f1b_run(rank: int, world: int, cfg: RunConfig) -> dict | None:
    """The same model under torch.distributed.pipelining's Schedule1F1B (step time only: it records no timeline)."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    stage_mod, width = _stage(cfg, world, rank), (1 if cfg.model == "sleep" else cfg.hidden)
    stage = PipelineStage(stage_mod, rank, world, torch.device("cpu"))
    sched = Schedule1F1B(stage, n_microbatches=cfg.num_chunks, loss_fn=mse)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.num_chunks * cfg.micro_batch, cfg.seq, width, generator=g)
    y = torch.randn(cfg.num_chunks * cfg.micro_batch, cfg.seq, width, generator=g)
    times = []
    for i in range(cfg.warmup + cfg.repeats):
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            sched.step(x)
        elif rank == world - 1:
            sched.step(target=y, losses=[])
        else:
            sched.step()
        dist.barrier()
        if i >= cfg.warmup:
            times.append(time.perf_counter() - t0)
        stage_mod.zero_grad(set_to_none=True)
    times.sort()
    return {"schedule": cfg.schedule, "step_time": times[len(times) // 2], "events": []} if rank == 0 else None


def record_many(rank: int, world: int, cfgs: list[RunConfig]) -> list[dict] | None:
    """`record_run` for several configurations in one job (one spawn for a whole benchmark)."""
    out = [(torch_1f1b_run if c.schedule == "torch-1f1b" else record_run)(rank, world, c) for c in cfgs]
    return out if rank == 0 else None
