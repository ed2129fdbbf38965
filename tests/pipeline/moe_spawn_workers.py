"""MoE stages with expert parallelism inside DualPipe, run in spawned gloo ranks (see test_moe_overlap.py).

4 ranks = 2 PP ranks x 2 EP ranks: global rank g is PP rank g % 2 and EP rank g // 2. The pipelines are {0, 1}
and {2, 3}; the EP groups (one per PP rank, i.e. per pair of stage copies) are {0, 2} and {1, 3}. Each EP rank
feeds its own micro-batches; micro-batch m of both EP ranks crosses every stage at the same time.

The single-process reference holds every expert and moves tokens by plain indexing in the order the EP exchange
uses (rows by source rank then token; copies added in fp32 in rank order), so the loss is bit-exact.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from seekstack.pipeline import DualPipe
from seekstack.pipeline.models import mse
from seekstack.pipeline.moe import MoEStage, OverlappedMoEStage, experts_forward

PP, EP = 2, 2
MB, SEQ, H, FFN, E, K = 3, 5, 8, 12, 4, 2
CHUNKS = 6


def cal_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return (1 - 2 * (x * y).sum() / ((x * x).sum() + (y * y).sum())).item()


def full_stages(seed: int) -> list[MoEStage]:
    torch.manual_seed(seed)
    return [MoEStage(H, FFN, E, K) for _ in range(PP)]


def data(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed + 1000)
    xs = [torch.randn(CHUNKS * MB, SEQ, H, generator=g) for _ in range(EP)]
    ys = [torch.randn(CHUNKS * MB, SEQ, H, generator=g) for _ in range(EP)]
    return xs, ys


def ref_layer(stage: MoEStage, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """One MoE stage over every EP rank's tokens, EP simulated by indexing."""
    routed = [stage.route(x.reshape(-1, H)) for x in xs]  # per EP rank: h, w, idx
    local = E // EP
    rows = [[((idx >= r * local) & (idx < (r + 1) * local)).any(1).nonzero().squeeze(1) for _, _, idx in routed]
            for r in range(EP)]  # fmt: skip
    ys = []  # per destination rank: expert rows, in (source rank, token) order
    for r in range(EP):
        recv_x = torch.cat([routed[e][0][rows[r][e]] for e in range(EP)])
        gidx = torch.cat([routed[e][2][rows[r][e]] for e in range(EP)])
        gw = torch.cat([routed[e][1][rows[r][e]] for e in range(EP)])
        mine = (gidx >= r * local) & (gidx < (r + 1) * local)
        recv_idx = torch.where(mine, gidx - r * local, -1)
        recv_w = torch.where(mine, gw, 0.0)
        ys.append(experts_forward(stage.experts[r * local : (r + 1) * local], recv_x, recv_idx, recv_w))
    outs = []
    for e, (h, _, _) in enumerate(routed):
        acc = torch.zeros_like(h)
        for r in range(EP):
            start = sum(len(rows[r][s]) for s in range(e))
            acc = acc.index_add(0, rows[r][e], ys[r][start : start + len(rows[r][e])])
        outs.append((h + acc).view(xs[e].shape))
    return outs


def reference(stages, xs, ys):
    """Per EP rank: stacked per-micro-batch losses; grads of every parameter of every stage."""
    ref = copy.deepcopy(stages)
    losses = [[] for _ in range(EP)]
    for m in range(CHUNKS):
        hs = [x[m * MB : (m + 1) * MB] for x in xs]
        for s in ref:
            hs = ref_layer(s, hs)
        ls = [mse(hs[e], ys[e][m * MB : (m + 1) * MB]) for e in range(EP)]
        sum(ls).backward()
        for e in range(EP):
            losses[e].append(ls[e].detach())
    return [torch.stack(lo) for lo in losses], ref


def local_stage(cls, full: MoEStage, ep_group) -> MoEStage:
    """This EP rank's share of a full stage: the dense and gate weights, and its experts."""
    m = cls(H, FFN, E, K, ep_group=ep_group)
    with torch.no_grad():
        m.dense.weight.copy_(full.dense.weight)
        m.router.weight.copy_(full.router.weight)
        for i, ex in enumerate(m.experts):
            ex.load_state_dict(full.experts[m.expert_offset + i].state_dict())
    return m


def grads_vs_reference(stage: MoEStage, ref: MoEStage, ep_group) -> float:
    """cos-diff of every parameter's grad; dense/gate grads are summed over EP ranks first (data parallel)."""
    worst = 0.0
    for name in ("dense", "router"):
        g = getattr(stage, name).weight.grad.clone()
        dist.all_reduce(g, group=ep_group)
        worst = max(worst, cal_diff(g, getattr(ref, name).weight.grad))
    for i, ex in enumerate(stage.experts):
        for p, q in zip(ex.parameters(), ref.experts[stage.expert_offset + i].parameters()):
            worst = max(worst, cal_diff(p.grad, q.grad))
    return worst


def run_pipeline(cls, pp_group, ep_group, pp, ep, stages, xs, ys, record: bool):
    mods = (local_stage(cls, stages[pp], ep_group), local_stage(cls, stages[PP - 1 - pp], ep_group))
    pipe = DualPipe(mods, process_group=pp_group)
    pipe.set_p2p_tensor_shapes([(MB, SEQ, H)])
    pipe.set_p2p_tensor_dtype(torch.float32)
    half = CHUNKS // 2 * MB
    x, y = xs[ep], ys[ep]
    args, kw = ((x[:half],), {"criterion": mse, "labels": [y[half:]]}) if pp == 0 else ((x[half:],), {})
    if pp == PP - 1:
        kw = {"criterion": mse, "labels": [y[:half]]}
    timeline: list[dict] = []
    if record:
        pipe.record_timeline = True
        for m in mods:
            m.overlap_timeline = timeline
    loss, _ = pipe.step(*args, num_chunks=CHUNKS, **kw)
    events, freed = pipe.timeline, pipe.last_freed_bytes
    pipe.record_timeline = False
    for m in mods:
        m.overlap_timeline = None
    with torch.no_grad():
        infer, outs = pipe.step(*args, num_chunks=CHUNKS, return_outputs=True, **kw)
    return pipe, loss, infer, events, timeline, freed


def run_moe(rank: int, world: int):
    pp, ep = rank % PP, rank // PP
    pp_groups = [dist.new_group([e * PP + p for p in range(PP)]) for e in range(EP)]
    ep_groups = [dist.new_group([e * PP + p for e in range(EP)]) for p in range(PP)]
    pp_group, ep_group = pp_groups[ep], ep_groups[pp]
    stages = full_stages(seed=5)
    xs, ys = data(seed=5)
    ref_losses, ref = reference(stages, xs, ys)
    # Losses of this rank: PP rank 0 holds the labels of the second half of the micro-batches, rank 1 the first.
    want = ref_losses[ep].chunk(2)[1 if pp == 0 else 0]
    res = {"rank": rank, "pp": pp, "ep": ep}
    losses = {}
    for name, cls in (("overlap", OverlappedMoEStage), ("plain", MoEStage)):
        pipe, loss, infer, events, timeline, freed = run_pipeline(cls, pp_group, ep_group, pp, ep, stages, xs, ys, True)
        losses[name] = loss
        res[name] = {
            "uses_hook": pipe.overlap_cls is not None,
            "loss_ok": torch.equal(loss, want),
            "infer_ok": torch.equal(infer, want),
            "grad_diff": max(
                grads_vs_reference(pipe.module[0], ref[pp], ep_group),
                grads_vs_reference(pipe.module[1], ref[PP - 1 - pp], ep_group),
            ),
            "grads": [p.grad.clone() for p in pipe.parameters()],
            "events": events,
            "sub_events": timeline,
            "freed_bytes": freed,
        }
    res["losses_equal"] = torch.equal(losses["overlap"], losses["plain"])
    a, b = res["overlap"].pop("grads"), res["plain"].pop("grads")
    res["overlap_vs_plain_grad_diff"] = max(cal_diff(x, y) for x, y in zip(a, b))
    res["overlap_vs_plain_grads_equal"] = all(torch.equal(x, y) for x, y in zip(a, b))
    return res
