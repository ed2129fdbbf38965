"""`seekstack demo` stage: a DualPipe training step on 4 gloo ranks, checked against one process, plus a timeline."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.distributed as dist

from seekstack.pipeline.dualpipe import DualPipe
from seekstack.pipeline.launch import spawn
from seekstack.pipeline.models import MLPStage, mse


def _worker(rank: int, world: int, num_chunks: int, steps: int) -> dict:
    torch.manual_seed(0)
    stages = [MLPStage(16) for _ in range(world)]
    x = torch.randn(num_chunks * 2, 8, 16)
    y = torch.randn(num_chunks * 2, 8, 16)
    ref = copy.deepcopy(stages)
    ref_losses = []
    for xc, yc in zip(x.tensor_split(num_chunks), y.tensor_split(num_chunks)):
        h = xc
        for s in ref:
            h = s(h)
        loss = mse(h, yc)
        loss.backward()
        ref_losses.append(loss.detach())
    pipe = DualPipe((copy.deepcopy(stages[rank]), copy.deepcopy(stages[world - 1 - rank])))
    pipe.set_p2p_tensor_shapes([(2, 8, 16)])
    pipe.set_p2p_tensor_dtype(torch.float32)
    opt = torch.optim.SGD(pipe.parameters(), lr=50.0)
    half = x.shape[0] // 2
    args, kw = (), {}
    if rank == 0:
        args, kw = (x[:half],), {"criterion": mse, "labels": [y[half:]]}
    elif rank == world - 1:
        args, kw = (x[half:],), {"criterion": mse, "labels": [y[:half]]}
    means, exact = [], None
    for step in range(steps):
        loss, _ = pipe.step(*args, num_chunks=num_chunks, **kw)
        if step == 0 and rank == 0:
            exact = torch.equal(loss, torch.stack(ref_losses).chunk(2)[1])
        total = torch.zeros(1) if loss is None else loss.sum().reshape(1)
        dist.all_reduce(total)  # ranks 0 and N-1 each hold half of the micro-batch losses
        means.append(total.item() / num_chunks)
        opt.step()
        opt.zero_grad()
    return {"exact": exact, "means": means}


def run_demo(workdir: Path) -> dict[str, str]:
    from seekstack.pipeline.timeline import bubble_stats, plot
    from seekstack.pipeline.workloads import RunConfig, record_many

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    res = spawn(_worker, 4, 8, 3)[0]
    run = spawn(record_many, 4, [RunConfig("dualpipe", 8, "sleep", 0.04, 0.08, 0.04, repeats=1)])[0][0]
    st = bubble_stats(run["events"], "dualpipe", 4)
    png = plot(run["events"], workdir / "dualpipe-timeline.png", "DualPipe, 4 ranks, 8 micro-batches")
    return {
        "training": "DualPipe, 4 gloo ranks x 8 micro-batches, SGD: mean loss "
        + " -> ".join(f"{m:.4f}" for m in res["means"]),
        "vs single process": "loss bit-exact" if res["exact"] else "loss DIFFERS",
        "bubble": f"measured {st['bubble_max'] * 1e3:.1f} ms vs formula {st['formula'] * 1e3:.1f} ms",
        "timeline": str(png),
    }
