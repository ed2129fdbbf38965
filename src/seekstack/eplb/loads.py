"""Reading expert-load matrices from files, and making skewed synthetic ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def load_weight_file(path: str | Path) -> torch.Tensor:
    """Read a [layers, experts] load matrix from .npy, .csv (comma-separated rows) or .pt; 1-D means one layer.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "load.csv")
    >>> _ = open(p, "w").write("1,2,3,4\\n5,6,7,8\\n")
    >>> load_weight_file(p).shape
    torch.Size([2, 4])
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        data = torch.from_numpy(np.load(path, allow_pickle=False))
    elif suffix == ".csv":
        try:
            data = torch.from_numpy(np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64))
        except ValueError as exc:
            raise ValueError(f"{path}: not a numeric CSV matrix: {exc}") from exc
    elif suffix == ".pt":
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"{path}: expected a saved tensor, got {type(data).__name__}")
    else:
        raise ValueError(f"{path}: unsupported load file type {suffix!r} (use .npy, .csv or .pt)")
    if data.dim() == 1:
        data = data.unsqueeze(0)
    return data


def skewed_load(num_layers: int, num_experts: int, *, seed: int = 0, sigma: float = 1.5) -> torch.Tensor:
    """Token counts per (layer, expert) from a log-normal, the heavy-tailed shape real MoE routing shows."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(num_layers, num_experts, generator=g, dtype=torch.float64)
    return (torch.exp(sigma * z) * 1000).round()
