"""Per-token 1x128 FP8 (e4m3) casting, DeepGEMM style: one fp32 scale per token per 128 channels.

>>> import torch
>>> x = torch.randn(4, 256, dtype=torch.bfloat16)
>>> q, s = per_token_cast_to_fp8(x)
>>> q.dtype, s.shape
(torch.float8_e4m3fn, torch.Size([4, 2]))
>>> bool((per_token_cast_back(q, s) - x.float()).abs().max() < 0.2)
True
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def per_token_cast_to_fp8(x: torch.Tensor, round_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`x [T, H]` → `(e4m3 [T, H], fp32 scales [T, H/128])` with `x ≈ q * scale` per 128-channel block.

    `round_scale` rounds each scale up to a power of two (needed for UE8M0 scales).
    """
    if x.dim() != 2 or x.shape[1] % 128:
        raise ValueError(f"x must be [num_tokens, hidden] with hidden a multiple of 128, got {list(x.shape)}")
    T, H = x.shape
    blocks = x.float().view(T, H // 128, 128)
    amax = blocks.abs().amax(dim=2).clamp(min=1e-4)
    scale = amax / FP8_MAX
    if round_scale:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (blocks / scale.unsqueeze(2)).to(torch.float8_e4m3fn).view(T, H)
    return q, scale


def per_token_cast_back(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Dequantize `(e4m3 [..., H], fp32 scales [..., H/128])` to fp32."""
    H = q.shape[-1]
    blocks = q.float().reshape(*q.shape[:-1], H // 128, 128)
    return (blocks * scales.float().unsqueeze(-1)).reshape(q.shape)


def pack_ue8m0(scales: torch.Tensor) -> torch.Tensor:
    """Power-of-two fp32 scales `[..., S]` → their exponent bytes packed four to an int32, `[..., S/4]`."""
    if scales.shape[-1] % 4:
        raise ValueError("UE8M0 packing needs hidden to be a multiple of 512")
    exp = ((scales.contiguous().view(torch.int32) >> 23) & 0xFF).to(torch.uint8)
    return exp.view(torch.int32)
