"""The FP8 latent KV-cache layout of DeepSeek-V3.2 (FlashMLA's sparse decoding), 656 bytes per token.

Each token's cached vector (d = 576: 512 latent "NoPE" values that also serve as V, then 64 RoPE values) is stored as

    bytes [0, 512)     512 x float8_e4m3fn   the NoPE values divided by their tile's scale
    bytes [512, 528)   4 x float32           one scale per 128-value tile: amax / 448 rounded up to a power of two
    bytes [528, 656)   64 x bfloat16         the RoPE values, not quantized

Power-of-two scales make dequantization (fp8 * scale) exact in bf16 and fp32. The helpers are written for any
`d_nope` that is a multiple of `tile`, so other MLA shapes (e.g. 320 = 256 + 64) get the same layout.

>>> import torch
>>> kv = torch.randn(2, 64, 1, 576, dtype=torch.bfloat16)
>>> packed = pack_fp8_kvcache(kv)
>>> packed.shape, packed.dtype
(torch.Size([2, 64, 1, 656]), torch.float8_e4m3fn)
>>> unpack_fp8_kvcache(packed).shape
torch.Size([2, 64, 1, 576])
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
TILE = 128  # NoPE values per fp32 scale
ROPE_DTYPE = torch.bfloat16
FP8_CACHE_DTYPES = (torch.float8_e4m3fn, torch.uint8, torch.int8)


def fp8_bytes_per_token(head_dim: int = 576, head_dim_v: int = 512, tile: int = TILE) -> int:
    """Bytes one token of one KV head takes in the FP8 layout: 656 for DeepSeek's 576/512."""
    if head_dim_v % tile:
        raise ValueError(f"head_dim_v ({head_dim_v}) must be a multiple of the scale tile ({tile}) for the FP8 layout")
    if head_dim < head_dim_v:
        raise ValueError(f"head_dim_v ({head_dim_v}) must not exceed head_dim ({head_dim})")
    return head_dim_v + 4 * (head_dim_v // tile) + 2 * (head_dim - head_dim_v)


def fp8_cache_views(packed: torch.Tensor, head_dim: int = 576, head_dim_v: int = 512, tile: int = TILE):
    """Typed views of a packed cache [..., bytes]: (nope fp8 [..., dv], scales fp32 [..., dv/tile], rope bf16 [..., r]).

    No copy is made; the views share the packed storage.
    """
    nbytes = fp8_bytes_per_token(head_dim, head_dim_v, tile)
    if packed.dtype not in FP8_CACHE_DTYPES:
        raise ValueError(f"k_cache: FP8 cache must be float8_e4m3fn, uint8 or int8, got {packed.dtype}")
    if packed.shape[-1] != nbytes:
        raise ValueError(
            f"k_cache: FP8 cache must have {nbytes} bytes per token for head_dim={head_dim}, "
            f"head_dim_v={head_dim_v}; got last dimension {packed.shape[-1]}"
        )
    if packed.stride(-1) != 1 or any(s % 4 for s in packed.stride()[:-1]):
        raise ValueError("k_cache: FP8 cache rows must be contiguous and 4-byte aligned")
    raw = packed.view(torch.uint8)
    n_scales = head_dim_v // tile
    nope = raw[..., :head_dim_v].view(torch.float8_e4m3fn)
    scales = raw[..., head_dim_v : head_dim_v + 4 * n_scales].view(torch.float32)
    rope = raw[..., head_dim_v + 4 * n_scales :].view(ROPE_DTYPE)
    return nope, scales, rope


def pack_fp8_kvcache(kv: torch.Tensor, head_dim_v: int = 512, tile: int = TILE) -> torch.Tensor:
    """Quantize a latent cache [..., d] (any float dtype) to the FP8 layout [..., bytes] (float8_e4m3fn storage).

    Scales are `amax / 448` rounded up to a power of two, as FlashMLA's `tests/quant.py` computes them:
    `2 ** ceil(log2(max(amax / 448, 1e-4)))` (the 1e-4 floor keeps all-zero tiles finite).
    """
    head_dim = kv.shape[-1]
    nbytes = fp8_bytes_per_token(head_dim, head_dim_v, tile)
    n_scales = head_dim_v // tile
    out = torch.empty(*kv.shape[:-1], nbytes, dtype=torch.uint8, device=kv.device)
    nope_q, scales, rope = fp8_cache_views(out, head_dim, head_dim_v, tile)

    nope = kv[..., :head_dim_v].float().unflatten(-1, (n_scales, tile))  # [..., tiles, tile]
    amax = nope.abs().amax(dim=-1)
    scale = torch.pow(2.0, torch.log2(torch.clamp_min(amax / FP8_MAX, 1e-4)).ceil())
    scales.copy_(scale)
    nope_q.copy_((nope / scale.unsqueeze(-1)).flatten(-2).to(torch.float8_e4m3fn))
    rope.copy_(kv[..., head_dim_v:].to(ROPE_DTYPE))
    return out.view(torch.float8_e4m3fn)


def unpack_fp8_kvcache(
    packed: torch.Tensor,
    head_dim: int = 576,
    head_dim_v: int = 512,
    tile: int = TILE,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Dequantize the FP8 layout [..., bytes] back to [..., head_dim] in `dtype` (exact: scales are powers of two)."""
    nope, scales, rope = fp8_cache_views(packed, head_dim, head_dim_v, tile)
    return dequantize_rows(nope, scales, rope, tile).to(dtype)


def dequantize_rows(nope: torch.Tensor, scales: torch.Tensor, rope: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """fp32 [..., dv + r] from the three typed views (also used on gathered rows by the CPU path)."""
    values = nope.float().unflatten(-1, (scales.shape[-1], tile)) * scales.unsqueeze(-1)
    return torch.cat([values.flatten(-2), rope.float()], dim=-1)
