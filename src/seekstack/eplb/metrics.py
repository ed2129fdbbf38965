"""How balanced a placement is: per-GPU load and mean/max balancedness (vLLM's metric, offline form).

GPU load L_g = Σ over slots s on GPU g of weight[phy2log[s]] / logcnt[phy2log[s]] — each expert's tokens are split
evenly among its replicas. Balancedness = mean(L) / max(L) per layer; 1.0 is perfect.
"""

from __future__ import annotations

import torch


def gpu_loads(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Per-GPU load [layers, num_gpus] of a placement `phy2log` [layers, slots] (or [slots]) for `weight`.

    >>> gpu_loads(torch.tensor([[6.0, 2.0]]), torch.tensor([[0, 1, 0, 1]]), 2).tolist()
    [[4.0, 4.0]]
    """
    weight = torch.as_tensor(weight).to(torch.float64)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [layers, experts], got shape {tuple(weight.shape)}")
    phy2log = torch.as_tensor(phy2log).to(torch.int64)
    if phy2log.dim() == 1:
        phy2log = phy2log.expand(weight.size(0), -1)
    if phy2log.dim() != 2 or phy2log.size(0) != weight.size(0):
        raise ValueError(f"phy2log must be [layers, slots] with {weight.size(0)} layers, got {tuple(phy2log.shape)}")
    if not isinstance(num_gpus, int) or num_gpus <= 0 or phy2log.size(1) % num_gpus:
        raise ValueError(f"num_gpus ({num_gpus!r}) must be a positive integer dividing the {phy2log.size(1)} slots")
    if bool(((phy2log < 0) | (phy2log >= weight.size(1))).any()):
        raise ValueError(f"phy2log holds expert ids outside [0, {weight.size(1)})")
    count = torch.zeros_like(weight).scatter_add_(1, phy2log, torch.ones_like(phy2log, dtype=weight.dtype))
    if bool((count == 0).any()):
        raise ValueError("phy2log leaves some expert without a replica")
    per_slot = (weight / count).gather(1, phy2log)
    return per_slot.view(weight.size(0), num_gpus, -1).sum(-1)


def balancedness(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """mean GPU load / max GPU load for each layer (1.0 = perfectly balanced; an idle layer counts as 1.0).

    >>> balancedness(torch.tensor([[3.0, 1.0]]), torch.tensor([[0, 1]]), 2).tolist()
    [0.6666666666666666]
    """
    return balancedness_of_loads(gpu_loads(weight, phy2log, num_gpus))


def default_gpu_loads(weight: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Per-GPU load without EPLB: one replica per expert, experts split over GPUs in contiguous ranges."""
    weight = torch.as_tensor(weight).to(torch.float64)
    gpu_of_expert = torch.arange(weight.size(1)) * num_gpus // weight.size(1)
    loads = torch.zeros(weight.size(0), num_gpus, dtype=torch.float64)
    return loads.index_add_(1, gpu_of_expert, weight)


def balancedness_of_loads(loads: torch.Tensor) -> torch.Tensor:
    """mean / max of per-GPU loads [layers, gpus], per layer."""
    peak = loads.max(dim=1).values
    return torch.where(peak > 0, loads.mean(dim=1) / peak.clamp_min(1e-300), torch.ones_like(peak))
