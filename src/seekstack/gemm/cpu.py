"""The CPU path: blocked, vectorised dequantisation feeding fp32 matmuls.

torch's own fp8 -> fp32 conversion is a scalar loop (~2.5 ns/element here), which would cost more than the matmul
itself at small M. Instead an e4m3 byte is moved into an fp16 bit pattern with integer ops that vectorise:
sign-extend it to int16, shift left by 7 and clear bit 14; that is exactly `value * 2**-8` as fp16 (subnormals
included), and the 2**8 is folded into the block scale. The weight operand is converted in row chunks that stay in
cache right before their matmul, so the fp32 copy of the whole weight never exists.

>>> from seekstack.gemm import per_token_cast_to_fp8, per_block_cast_to_fp8, calc_diff
>>> a, b = torch.randn(64, 200), torch.randn(64, 200)
>>> d = torch.empty(64, 64, dtype=torch.bfloat16)
>>> gemm(*per_token_cast_to_fp8(a), *per_block_cast_to_fp8(b), 128, d, None)
>>> calc_diff(d, a @ b.T) < 1e-3
True
"""

from __future__ import annotations

import torch

from .layout import align

# fp16 bit pattern of an e4m3 byte (after the shift) is value * 2**-8.
_FP16_FOLD = 256.0
# Clears bit 14, which sign extension sets for negative bytes (0xBFFF as a signed int16).
_CLEAR_BIT14 = -16385
# Bytes of fp32 weight rows converted per chunk: small enough to stay cached for the matmul, large enough that
# the per-op overhead (each torch op is a parallel region) stays small.
_CHUNK_BYTES = 4 << 20
# Up to this size the whole fp32 weight is materialised at large M.
_WHOLE_BYTES = 256 << 20


def fp8_rows_to_f32(x: torch.Tensor, sf_rows: torch.Tensor, w16: torch.Tensor, out: torch.Tensor) -> None:
    """Dequantise `x [r, k]` (fp8 e4m3) with 1x128 scales `sf_rows [r, ceil(k/128)]` into `out [r, kp]` (fp32).

    `w16` is an int16 workspace shaped like `out`; columns `k..kp` of `out` come out zero.
    """
    r, k = x.shape
    kp = out.shape[1]
    if kp != k:
        w16[:, k:].zero_()
    w16[:, :k].copy_(x.view(torch.int8))
    w16.bitwise_left_shift_(7).bitwise_and_(_CLEAR_BIT14)
    out.copy_(w16.view(torch.float16))  # vectorised; a fused mixed-dtype mul measured slower
    out.view(r, kp // 128, 128).mul_((sf_rows.float() * _FP16_FOLD).unsqueeze(-1))


def dequantize_rows(x: torch.Tensor, sf_rows: torch.Tensor) -> torch.Tensor:
    """`x [r, k]` (fp8) with 1x128 scales, as fp32 `[r, align(k, 128)]` (zero-padded)."""
    r, k = x.shape
    kp = align(k, 128)
    out = torch.empty((r, kp), dtype=torch.float32, device=x.device)
    fp8_rows_to_f32(x, sf_rows, torch.empty((r, kp), dtype=torch.int16, device=x.device), out)
    return out


def _chunk_rows(m: int, n: int, kp: int) -> int:
    if m >= 256 and n * kp * 4 <= _WHOLE_BYTES:
        return n  # the matmul dominates: one large matmul beats cache-sized pieces
    rows = max(16, _CHUNK_BYTES // (4 * kp))
    if m >= 256:
        rows = max(rows, 1024)
    return min(n, rows)


def gemm(a, sfa, b, sfb, b_gran: int, d: torch.Tensor, c: torch.Tensor | None) -> None:
    m, k = a.shape
    n = b.shape[0]
    if m == 0 or n == 0 or k == 0:
        d.copy_(c) if c is not None else d.zero_()
        return
    if sfa is None:  # bf16 GEMM: the conversion to fp32 is a cheap vectorised shift
        acc = torch.mm(a.float(), b.float().T)
        d.copy_(acc.add_(c) if c is not None else acc)
        return
    kp = align(k, 128)
    af = dequantize_rows(a, sfa)
    sb_rows = sfb if b_gran == 1 else sfb.repeat_interleave(128, dim=0)[:n]
    rows = _chunk_rows(m, n, kp)
    w16 = torch.empty((rows, kp), dtype=torch.int16)
    bf = torch.empty((rows, kp), dtype=torch.float32)
    tmp = torch.empty(m * rows, dtype=torch.float32)
    for i in range(0, n, rows):
        j = min(n, i + rows)
        r = j - i
        fp8_rows_to_f32(b[i:j], sb_rows[i:j], w16[:r], bf[:r])
        t = tmp[: m * r].view(m, r)
        if c is not None:
            torch.addmm(c[:, i:j], af, bf[:r].T, out=t)
        else:
            torch.mm(af, bf[:r].T, out=t)
        d[:, i:j].copy_(t)
