"""FP8 (e4m3) quantisation with fine-grained scales, as in DeepSeek-V3 / DeepGEMM.

- `per_token_cast_to_fp8`: one scale per 1x128 slice along K (activations): `sf [..., m, ceil(k/128)]`.
- `per_block_cast_to_fp8`: one scale per 128x128 block (weights): `sf [..., ceil(n/128), ceil(k/128)]`.
- `per_channel_cast_to_fp8`: one scale per 128x1 slice along M (a transposed operand, e.g. for wgrad).

Scales are dequantisation factors (`x ≈ x_fp8 · sf`, `sf = amax / 448`, amax clamped at 1e-4); with
`use_ue8m0=True` they are rounded up to powers of two (what SM100 requires). Shapes need not be multiples of 128.

>>> x = torch.randn(7, 300)
>>> x_fp8, sf = per_token_cast_to_fp8(x)
>>> x_fp8.shape, sf.shape
(torch.Size([7, 300]), torch.Size([7, 3]))
"""

from __future__ import annotations

import torch

from .layout import align

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
# DeepGEMM clamps the block amax here so all-zero blocks get a finite scale.
AMAX_EPS = 1e-4
GRAN = 128


def ceil_to_ue8m0(x: torch.Tensor) -> torch.Tensor:
    """Round positive scales up to the next power of two (an 8-bit exponent, no mantissa).

    >>> ceil_to_ue8m0(torch.tensor([0.3, 1.0, 5.0]))
    tensor([0.5000, 1.0000, 8.0000])
    """
    return torch.pow(2.0, torch.ceil(torch.log2(x.abs().float())))


def pack_ue8m0_to_int(x: torch.Tensor) -> torch.Tensor:
    """Pack power-of-two fp32 scales four to an int32 along the last axis (SM100's format; last dim % 4 == 0)."""
    if x.dtype != torch.float32 or x.shape[-1] % 4:
        raise ValueError(f"x: expected fp32 with last dim % 4 == 0, got {x.dtype} {tuple(x.shape)}")
    exponent = (x.contiguous().view(torch.int32) >> 23) & 0xFF
    return exponent.to(torch.uint8).view(torch.int32)


def unpack_ue8m0_from_int(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_ue8m0_to_int`: int32 [..., k/4] -> fp32 [..., k]."""
    if x.dtype != torch.int32:
        raise ValueError(f"x: expected int32 packed scales, got {x.dtype}")
    exponent = x.contiguous().view(torch.uint8).to(torch.int32)
    return (exponent << 23).view(torch.float32)


def _check_float(name: str, x: torch.Tensor, min_dim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(x).__name__}")
    if not x.is_floating_point() or x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"{name}: expected a bf16/fp16/fp32 tensor, got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dims, got shape {tuple(x.shape)}")


def _scale(amax: torch.Tensor, use_ue8m0: bool) -> torch.Tensor:
    sf = amax.clamp(min=AMAX_EPS) / FP8_MAX
    return ceil_to_ue8m0(sf) if use_ue8m0 else sf


def per_token_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise `x [..., m, k]` with one fp32 scale per 1x128 slice; returns `(fp8 [..., m, k], sf [..., m, kb])`."""
    _check_float("x", x, 1)
    k = x.shape[-1]
    kp = align(k, GRAN)
    xf = x.float()
    if kp != k:
        xf = torch.nn.functional.pad(xf, (0, kp - k))
    xv = xf.unflatten(-1, (kp // GRAN, GRAN))
    sf = _scale(xv.abs().amax(dim=-1), use_ue8m0)
    q = (xv / sf.unsqueeze(-1)).to(FP8_DTYPE).flatten(-2)
    return q[..., :k].contiguous(), sf


def per_block_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise `x [..., n, k]` with one fp32 scale per 128x128 block; returns `(fp8, sf [..., nb, kb])`."""
    _check_float("x", x, 2)
    n, k = x.shape[-2:]
    np_, kp = align(n, GRAN), align(k, GRAN)
    xf = x.float()
    if (np_, kp) != (n, k):
        xf = torch.nn.functional.pad(xf, (0, kp - k, 0, np_ - n))
    xv = xf.unflatten(-1, (kp // GRAN, GRAN)).unflatten(-3, (np_ // GRAN, GRAN))  # [..., nb, 128, kb, 128]
    sf = _scale(xv.abs().amax(dim=(-3, -1)), use_ue8m0)
    q = (xv / sf[..., :, None, :, None]).to(FP8_DTYPE).flatten(-2).flatten(-3, -2)
    return q[..., :n, :k].contiguous(), sf


def per_channel_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise `x [..., m, k]` with one fp32 scale per 128x1 slice along M; returns `(fp8, sf [..., mb, k])`.

    `per_channel_cast_to_fp8(x)` transposed is `per_token_cast_to_fp8(x.mT)`: the wgrad operand layout.
    """
    _check_float("x", x, 2)
    m = x.shape[-2]
    mp = align(m, GRAN)
    xf = x.float()
    if mp != m:
        xf = torch.nn.functional.pad(xf, (0, 0, 0, mp - m))
    xv = xf.unflatten(-2, (mp // GRAN, GRAN))  # [..., mb, 128, k]
    sf = _scale(xv.abs().amax(dim=-2), use_ue8m0)
    q = (xv / sf.unsqueeze(-2)).to(FP8_DTYPE).flatten(-3, -2)
    return q[..., :m, :].contiguous(), sf
