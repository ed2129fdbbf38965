"""`seekstack eplb LOADFILE`: rebalance experts for a load matrix, print the placement and plot GPU loads.

seekstack eplb loads.npy --replicas 288 --groups 8 --nodes 4 --gpus 32 --heatmap eplb.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from seekstack.cli.console import console, print_table
from seekstack.eplb.heatmap import plot_gpu_loads
from seekstack.eplb.loads import load_weight_file
from seekstack.eplb.metrics import balancedness_of_loads, default_gpu_loads, gpu_loads
from seekstack.eplb.policy import padded_replicas, rebalance_experts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seekstack eplb", description=__doc__.splitlines()[0])
    p.add_argument("loadfile", help="[layers, experts] expert loads: .npy, .csv or .pt (1-D = one layer)")
    p.add_argument("--gpus", type=int, default=8, help="number of GPUs (default 8)")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--groups", type=int, default=1, help="expert groups; hierarchical iff groups %% nodes == 0")
    p.add_argument("--replicas", type=int, default=None, help="physical experts (default: one redundant per GPU)")
    p.add_argument("--distinct-per-gpu", action="store_true", help="never two replicas of one expert on a GPU")
    p.add_argument("--heatmap", default="eplb_heatmap.png", help="PNG path for the before/after heatmap")
    p.add_argument("--json", default=None, help="also write the placement as JSON here")
    p.add_argument("--show-layers", type=int, default=2, help="print the placement of the first N layers")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    weight = load_weight_file(args.loadfile)
    replicas = args.replicas or padded_replicas(weight.size(1), args.gpus)
    phy2log, log2phy, logcnt = rebalance_experts(
        weight, replicas, args.groups, args.nodes, args.gpus, distinct_per_gpu=args.distinct_per_gpu
    )
    before = default_gpu_loads(weight, args.gpus)
    after = gpu_loads(weight, phy2log, args.gpus)
    bal_before, bal_after = balancedness_of_loads(before), balancedness_of_loads(after)

    policy = "hierarchical" if args.groups % args.nodes == 0 else "global"
    console.print(
        f"{weight.size(0)} layers × {weight.size(1)} experts → {replicas} replicas on {args.gpus} GPUs "
        f"({args.nodes} nodes, {args.groups} groups, {policy} policy)"
    )
    per_gpu = replicas // args.gpus
    for layer in range(min(args.show_layers, weight.size(0))):
        rows = [[g, " ".join(str(e) for e in phy2log[layer, g * per_gpu : (g + 1) * per_gpu].tolist()),
                 float(after[layer, g])] for g in range(args.gpus)]  # fmt: skip
        print_table(f"layer {layer}: experts on each GPU", ["GPU", "logical experts", "load"], rows)
    rows = [[y, float(bal_before[y]), float(bal_after[y])] for y in range(weight.size(0))]
    rows.append(["mean", float(bal_before.mean()), float(bal_after.mean())])
    print_table("balancedness (mean GPU load / max GPU load)", ["layer", "before", "after"], rows)

    png = plot_gpu_loads(before, after, args.heatmap, title=f"EPLB {policy}: {Path(args.loadfile).name}")
    console.print(f"heatmap: {png}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "phy2log": phy2log.tolist(), "log2phy": log2phy.tolist(), "logcnt": logcnt.tolist(),
            "balancedness_before": bal_before.tolist(), "balancedness_after": bal_after.tolist(),
        }))  # fmt: skip
        console.print(f"placement: {args.json}")
    return 0
