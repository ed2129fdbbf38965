"""Which implementation runs a GEMM: `reference` (plain PyTorch), `cpu` (blocked, vectorised) or `triton`.

Default: Triton for CUDA tensors, the CPU path otherwise; `SEEKSTACK_GEMM_BACKEND` or a `backend=` argument
overrides it (Triton on CPU tensors needs `TRITON_INTERPRET=1`).
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

BACKENDS = ("reference", "cpu", "triton")


def pick_backend(device: torch.device, backend: str | None = None) -> ModuleType:
    name = backend or os.environ.get("SEEKSTACK_GEMM_BACKEND") or ("triton" if device.type == "cuda" else "cpu")
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend: 'cpu' needs CPU tensors, got {device}")
        from . import cpu

        return cpu
    if name == "reference":
        from . import reference

        return reference
    from . import triton_gemm  # imported lazily: Triton is an optional extra

    return triton_gemm
