"""`seekstack bench eplb`: rebalance DeepSeek-V3's shape, vectorised vs a per-layer loop, on one CPU core.

DeepSeek-V3: 58 MoE layers × 256 experts + 32 redundant = 288 slots, 8 groups, 4 nodes × 8 GPUs.
Target: the vectorised policy under 100 ms on one core.
"""

from __future__ import annotations

import argparse

import torch

from seekstack.bench import Report, measure
from seekstack.eplb.loads import skewed_load
from seekstack.eplb.metrics import balancedness
from seekstack.eplb.policy import rebalance_experts
from seekstack.eplb.reference import rebalance_experts_loop

TARGET_MS = 100.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="seekstack bench eplb", description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=58)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--replicas", type=int, default=288)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--gpus", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--trials", type=int, default=20, help="random loads for the distinct-per-GPU quality check")
    args = p.parse_args(argv)

    torch.set_num_threads(1)  # the target is stated for one core
    shape = (args.replicas, args.groups, args.nodes, args.gpus)
    weight = skewed_load(args.layers, args.experts, seed=0)
    report = Report("eplb", ["case", "ms", "speedup vs loop", "ms / 100 ms target", "balancedness"])
    report.params = dict(vars(args))

    t_loop = measure(lambda: rebalance_experts_loop(weight, *shape), warmup=1, repeats=max(1, args.repeats // 2))
    cases = [
        ("per-layer loop (baseline)", lambda: rebalance_experts_loop(weight, *shape), t_loop),
        ("vectorised", lambda: rebalance_experts(weight, *shape), None),
        ("vectorised, distinct per GPU", lambda: rebalance_experts(weight, *shape, distinct_per_gpu=True), None),
    ]
    for name, fn, t in cases:
        t = t if t is not None else measure(fn, warmup=2, repeats=args.repeats)
        phy2log = fn()[0]
        bal = float(balancedness(weight, phy2log, args.gpus).mean())
        report.add(name, t * 1e3, t_loop / t, t * 1e3 / TARGET_MS, bal)

    ratios = []
    for seed in range(args.trials):
        w = skewed_load(args.layers, args.experts, seed=1000 + seed, sigma=2.0)
        base = balancedness(w, rebalance_experts(w, *shape)[0], args.gpus).mean()
        distinct = balancedness(w, rebalance_experts(w, *shape, distinct_per_gpu=True)[0], args.gpus).mean()
        ratios.append(float(distinct / base))
    report.note(
        f"distinct-per-GPU / default balancedness over {args.trials} log-normal loads: "
        f"min {min(ratios):.4f}, mean {sum(ratios) / len(ratios):.4f} (requirement: ≥ 0.98)"
    )
    report.emit()
    return 0
