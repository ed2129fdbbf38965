"""The oracle: dequantise with plain PyTorch, then an fp32 matmul. Slow, simple, and independent of `cpu.py`.

Every backend module (`reference`, `cpu`, `triton_gemm`) offers the same core:
`gemm(a, sfa, b, sfb, b_gran, d, c)` computes `d = c + a @ b.T` where `a [m, k]`, `b [n, k]` are fp8 with scales
`sfa [m, kb]` (1x128) and `sfb` ([nb, kb] for 128x128 blocks when `b_gran == 128`, [n, kb] for 1x128 when
`b_gran == 1`), or bf16 with both scales None. `c` is None or an fp32 [m, n] tensor (it may be `d` itself).

>>> from seekstack.gemm import per_token_cast_to_fp8, per_block_cast_to_fp8, calc_diff
>>> a, b = torch.randn(64, 256), torch.randn(64, 256)
>>> d = torch.empty(64, 64)
>>> gemm(*per_token_cast_to_fp8(a), *per_block_cast_to_fp8(b), 128, d, None)
>>> calc_diff(d, a @ b.T) < 1e-3
True
"""

from __future__ import annotations

import torch


def dequantize(x: torch.Tensor, sf: torch.Tensor, gran_rows: int, gran_cols: int = 128) -> torch.Tensor:
    """`x [..., r, c]` (fp8) times its scales repeated over `gran_rows x gran_cols` blocks, in fp32."""
    r, c = x.shape[-2:]
    s = sf.float().repeat_interleave(gran_rows, dim=-2)[..., :r, :]
    s = s.repeat_interleave(gran_cols, dim=-1)[..., :c]
    return x.float() * s


def gemm(a, sfa, b, sfb, b_gran: int, d: torch.Tensor, c: torch.Tensor | None) -> None:
    if sfa is None:
        af, bf = a.float(), b.float()
    else:
        af, bf = dequantize(a, sfa, 1), dequantize(b, sfb, b_gran)
    acc = af @ bf.T
    if c is not None:
        acc = acc + c.float()
    d.copy_(acc)
