"""Expert-parallel load balancer (deepseek-ai/EPLB), vectorised over layers.

>>> import torch
>>> weight = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86]])
>>> phy2log, log2phy, logcnt = rebalance_experts(weight, num_replicas=16, num_groups=4, num_nodes=2, num_gpus=8)
>>> round(float(balancedness(weight, phy2log, num_gpus=8)[0]), 3)
0.828
"""

from seekstack.eplb.metrics import balancedness, gpu_loads
from seekstack.eplb.packing import balanced_packing
from seekstack.eplb.policy import default_placement, padded_replicas, rebalance_experts
from seekstack.eplb.replication import replicate_experts

__all__ = [
    "balanced_packing",
    "balancedness",
    "default_placement",
    "gpu_loads",
    "padded_replicas",
    "rebalance_experts",
    "replicate_experts",
]
