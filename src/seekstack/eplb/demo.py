"""Demo stage: balance a skewed synthetic load shaped like a small DeepSeek-V3 MoE and plot it."""

from __future__ import annotations

from pathlib import Path

from seekstack.eplb.heatmap import plot_gpu_loads
from seekstack.eplb.loads import skewed_load
from seekstack.eplb.metrics import balancedness_of_loads, default_gpu_loads, gpu_loads
from seekstack.eplb.policy import rebalance_experts


def run_demo(workdir: Path) -> dict[str, str]:
    layers, experts, gpus, nodes, groups, replicas = 8, 64, 16, 2, 8, 80
    weight = skewed_load(layers, experts, seed=7)
    phy2log, _, logcnt = rebalance_experts(weight, replicas, groups, nodes, gpus)
    distinct, _, _ = rebalance_experts(weight, replicas, groups, nodes, gpus, distinct_per_gpu=True)
    before = balancedness_of_loads(default_gpu_loads(weight, gpus)).mean()
    after = balancedness_of_loads(gpu_loads(weight, phy2log, gpus)).mean()
    after_distinct = balancedness_of_loads(gpu_loads(weight, distinct, gpus)).mean()
    png = plot_gpu_loads(default_gpu_loads(weight, gpus), gpu_loads(weight, phy2log, gpus),
                         Path(workdir) / "eplb_heatmap.png", title="EPLB on a log-normal load")  # fmt: skip
    return {
        "shape": f"{layers} layers × {experts} experts → {replicas} replicas, {gpus} GPUs on {nodes} nodes",
        "balancedness": f"{float(before):.3f} before → {float(after):.3f} after "
        f"({float(after_distinct):.3f} with distinct replicas per GPU)",
        "most replicated": f"{int(logcnt.max())} replicas of one expert",
        "heatmap": str(png),
    }
