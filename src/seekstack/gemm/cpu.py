"""The CPU path: blocked, vectorised dequantisation feeding fp32 matmuls.

torch's own fp8 -> fp32 conversion is a scalar loop (~2.5 ns/element here), which would cost more than the matmul
itself at small M. The weight operand is decoded in row chunks that stay in cache right before their matmul, so the
fp32 copy of the whole weight never exists. The decode runs as one C pass (`native_decode`, 0.16 ns per element on
one core) when a C compiler is at hand; otherwise as five eager passes (~0.41 ns): an e4m3 byte is moved into an fp16
bit pattern with integer ops that vectorise: sign-extend it to int16, multiply by 128 (a shift by 7) and clear bit
14; that is exactly `value * 2**-8` as fp16 (subnormals included), and the 2**8 is folded into the block scale. Both
give `x.float() * scale` bit for bit. At small M the chunk is the left operand (`w @ a.T`, MKL's faster layout
there) and each `[rows, m]` product is transposed into `d` while in cache. With the C library, torch's MKL and a
bf16 `d` that whole small-M path is one C call (`native_decode.gemm_weight_left`): each thread decodes, multiplies
(MKL's sgemm on that thread alone) and transposes its own chunks, instead of MKL splitting every small product
over the threads (FP8 / fp32 time at M = 64 on 2 threads: 1.18-1.49 against 1.24-1.72 for the torch calls).

>>> from seekstack.gemm import per_token_cast_to_fp8, per_block_cast_to_fp8, calc_diff
>>> a, b = torch.randn(64, 200), torch.randn(64, 200)
>>> d = torch.empty(64, 64, dtype=torch.bfloat16)
>>> gemm(*per_token_cast_to_fp8(a), *per_block_cast_to_fp8(b), 128, d, None)
>>> calc_diff(d, a @ b.T) < 1e-3
True
"""

from __future__ import annotations

import torch

from . import native_decode
from .layout import align

# fp16 bit pattern of an e4m3 byte (after the shift) is value * 2**-8.
_FP16_FOLD = 256.0
# 0-dim CPU operands: a Python scalar costs ~1.5 us more per op (wrapping), and the loop below runs ~5 ops per chunk.
# x * 128 == x << 7 in int16, and faster than torch's shift (0.05-0.07 vs 0.07-0.10 ns/element in cache here).
_TIMES_128 = torch.tensor(128, dtype=torch.int16, device="cpu")
_CLEAR_BIT14 = torch.tensor(-16385, dtype=torch.int16, device="cpu")  # 0xBFFF: sign extension sets bit 14
# Bytes of fp32 weight rows converted per chunk at small M: the fp32 chunk, its int16 twin and MKL's packed copy
# then share the 2 MiB L2. Per weight element (M = 64, K = 1792, one thread) the five decode passes alone cost
# 0.47 ns at 0.9 MiB chunks vs 0.67 ns at 4 MiB; end to end, 0.5 MiB measured 3-6 % faster than 1 and 2 MiB, and
# 0.25 MiB no better (each torch call has ~1-3 us of fixed cost).
_CHUNK_BYTES = 512 << 10
# With several threads (C decode), per thread: each small-M MKL call splits poorly over 2 cores (M = 64, 160 x 1792
# weight rows: 143 us on 2 threads vs 208 on one), so fewer, larger calls win. `seekstack bench gemm --threads 2`,
# FP8 / fp32 time at M = 64: 1.46-1.79 at 512 KiB, 1.26-1.68 at 8 MiB (most weights in one chunk).
_THREADED_CHUNK_BYTES = 8 << 20
# From this M on the matmul dominates and larger pieces keep it efficient.
_LARGE_M = 256
_LARGE_CHUNK_BYTES = 4 << 20
# Up to this size the whole fp32 weight is materialised at large M.
_WHOLE_BYTES = 256 << 20
# At small M, MKL's sgemm is faster with the weight as the left, untransposed operand (`w @ a.T`, "NN") than as
# the right, transposed one (`a @ w.T`, "TN", what the fp32 baseline runs); ns per weight element, one thread,
# K = 512 / 1792:
#   M    16         32         64         96         128        160        192        255
#   TN   0.37/0.43  0.57/0.65  0.92/0.98  1.33/1.47  1.71/1.89  2.10/2.31  2.48/2.73  3.28/3.56
#   NN   0.23/0.25  0.38/0.39  0.78/0.79  1.10/1.15  1.46/1.53  1.86/1.97  2.39/2.32  3.85/3.35
# The [n, m] product must then be transposed into `d` and the activations transposed. Eager (~0.9 ns per output
# element, bf16 conversion included: 0.9 * m / k per weight element; ~1 ns per activation element: 1 * m / n) that is
# worth it up to M = 160 (above, the gain measured nil in place) from k >= 4 * m; with the C decode and transpose
# (~0.3 ns per element each) from k >= m: (M, N, K) = (64, 8192, 128) went from 1.49 to 1.45 x the fp32 time.
_WEIGHT_LEFT_MAX_M = 160
_WEIGHT_LEFT_K_PER_M = 4
_WEIGHT_LEFT_K_PER_M_NATIVE = 1
# ... but with several threads only from k >= 4 * m: at (M, N, K) = (64, 8192, 128) on 2 threads, weight-left took
# 1.78 x the fp32 time and weight-right 1.59 (the [8192, 64] product's transpose is as large as the weight).
_WEIGHT_LEFT_K_PER_M_THREADED = 4
# The one-call C path (`native_decode.gemm_weight_left`): per chunk, the fp32 rows a thread decodes and hands to
# MKL. FP8 / fp32 time on 2 threads, 8 small-M shapes: 1.25-1.47 at 256 KiB, 1.25-1.45 at 512, 1.13-1.41 at 1 MiB,
# 1.09-1.43 at 1.5 MiB (1 thread: 0.90-1.19 at 512 KiB and 1 MiB alike); the L2 holds 2 MiB per core here.
_FUSED_CHUNK_BYTES = 1 << 20
# Chunk rows are a multiple of this (MKL works on row blocks): 2-3 % faster at (M, N, K) = (64, 528, 1792).
_ROW_ALIGN = 32


def fp8_to_fp16_bits(x: torch.Tensor, w16: torch.Tensor) -> None:
    """`w16 [r, kp]` (int16) = fp16 bit patterns of `x [r, k]` (fp8 e4m3) times 2**-8; columns k.. are zeroed."""
    k = x.shape[1]
    if w16.shape[1] != k:
        w16[:, k:].zero_()
        w16 = w16[:, :k]
    w16.copy_(x.view(torch.int8))
    w16.mul_(_TIMES_128).bitwise_and_(_CLEAR_BIT14)


def fp8_rows_to_f32(x: torch.Tensor, sf_rows: torch.Tensor, w16: torch.Tensor, out: torch.Tensor) -> None:
    """Dequantise `x [r, k]` (fp8 e4m3) with 1x128 scales `sf_rows [r, ceil(k/128)]` into `out [r, kp]` (fp32).

    `sf_rows` carries the 2**8 of the fp16 trick (`folded_scales`); `w16` is an int16 workspace shaped like `out`;
    columns `k..kp` of `out` come out zero.
    """
    r, kp = out.shape
    fp8_to_fp16_bits(x, w16)
    out.copy_(w16.view(torch.float16))  # vectorised; a fused mixed-dtype mul measured slower (0.33 vs 0.21 ns)
    out.view(r, kp // 128, 128).mul_(sf_rows.unsqueeze(-1))


def folded_scales(sf: torch.Tensor) -> torch.Tensor:
    """Scales as contiguous fp32 times the 2**8 that the fp16 bit patterns of `fp8_to_fp16_bits` lack.

    Contiguous: `dequantize_rows_transposed` broadcasts `sf.T`, which as a strided view made its scale pass 6x
    slower (83 vs 13 us for 64 x 1792).
    """
    return (sf.float() * _FP16_FOLD).contiguous()


def dequantize_rows(x: torch.Tensor, sf_rows: torch.Tensor) -> torch.Tensor:
    """`x [r, k]` (fp8) with 1x128 scales, as fp32 `[r, align(k, 128)]` (zero-padded)."""
    r, k = x.shape
    kp = align(k, 128)
    out = torch.empty((r, kp), dtype=torch.float32, device=x.device)
    if _native(x) and native_decode.decode_rows(x, sf_rows.float().contiguous(), out):
        return out
    fp8_rows_to_f32(x, folded_scales(sf_rows), torch.empty((r, kp), dtype=torch.int16, device=x.device), out)
    return out


def dequantize_rows_transposed(x: torch.Tensor, sf_rows: torch.Tensor) -> torch.Tensor:
    """`dequantize_rows(x, sf_rows).T.contiguous()`, i.e. fp32 `[align(k, 128), r]`, decoded from transposed bytes.

    Transposing the bytes during the int8 -> int16 copy (0.45 ns/element) is cheaper than transposing the fp32
    result afterwards (0.73 ns/element).
    """
    r, k = x.shape
    kp = align(k, 128)
    if _native(x):
        out = torch.empty((kp, r), dtype=torch.float32)
        if native_decode.decode_rows_t(x, sf_rows.float().contiguous(), out):
            return out
    w16 = torch.empty((kp, r), dtype=torch.int16, device=x.device)
    if kp != k:
        w16[k:].zero_()
    w16[:k].copy_(x.view(torch.int8).T)
    w16.mul_(_TIMES_128).bitwise_and_(_CLEAR_BIT14)
    out = torch.empty((kp, r), dtype=torch.float32, device=x.device)
    out.copy_(w16.view(torch.float16))
    out.view(kp // 128, 128, r).mul_(folded_scales(sf_rows.T).unsqueeze(1))
    return out


def _native(x: torch.Tensor) -> bool:
    """Whether the one-pass C decode (`native_decode`) can take `x` (row-major bytes in CPU memory)."""
    return x.device.type == "cpu" and x.stride(-1) == 1 and native_decode.available()


def _plan(m: int, n: int, kp: int, native: bool = False, fused: bool = False) -> tuple[int, bool]:
    """`(weight rows per chunk, weight_left)` for an `[m, kp] x [n, kp].T` product (`native`: the C decode runs;
    `fused`: a weight-left product would run as one C call, `native_decode.gemm_weight_left`)."""
    if m >= _LARGE_M:
        if n * kp * 4 <= _WHOLE_BYTES:
            return n, False  # the matmul dominates: one large matmul beats cache-sized pieces
        return min(n, max(1024, _LARGE_CHUNK_BYTES // (4 * kp))), False
    # The C decode splits a chunk over the torch threads; the eager passes are split by torch itself.
    threads = torch.get_num_threads() if native else 1
    chunk = (_CHUNK_BYTES if threads == 1 else _THREADED_CHUNK_BYTES) * threads
    rows = max(16, chunk // (4 * kp))
    rows = -(-n // -(-n // rows))  # equal chunks: a short last one would pay the per-op overhead for little work
    rows = min(n, align(rows, _ROW_ALIGN))
    if not native:
        k_per_m = _WEIGHT_LEFT_K_PER_M
    elif fused:  # transposes per thread, in cache: (64, 8192, 128) on 2 threads 1.57 (weight-right) -> 1.47-1.50
        k_per_m = _WEIGHT_LEFT_K_PER_M_NATIVE
    else:
        k_per_m = _WEIGHT_LEFT_K_PER_M_NATIVE if threads == 1 else _WEIGHT_LEFT_K_PER_M_THREADED
    return rows, m <= _WEIGHT_LEFT_MAX_M and kp >= k_per_m * m


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
    native = _native(b)
    # One C call (`native_decode.gemm_weight_left`) where it applies: chunks decoded, multiplied by MKL and written
    # out per thread while in that core's cache.
    fused = native and c is None and d.dtype == torch.bfloat16 and d.stride(1) == 1 and _native(a)
    fused = fused and native_decode.mkl_sgemm() is not None
    rows, weight_left = _plan(m, n, kp, native, fused)
    if weight_left and fused:
        sfa_, sfb_ = sfa.float().contiguous(), sfb.float().contiguous()
        if native_decode.gemm_weight_left(a, sfa_, b, sfb_, b_gran, d, _fused_chunk_rows(n, kp)):
            return
    bf = torch.empty((rows, kp), dtype=torch.float32)
    if native:
        decode = _native_chunk_decoder(b, sfb, b_gran, bf)
    else:
        decode = _eager_chunk_decoder(b, sfb, b_gran, bf, n, k)
    # Each chunk's product is written to d (converted, transposed, C added) while it is still in cache: at K = 128
    # a whole fp32 [m, n] product is as large as the weight and converting it afterwards cost ~10 % of the call.
    if weight_left:
        at = dequantize_rows_transposed(a, sfa)
        to_bf16_t = d.dtype == torch.bfloat16 and d.stride(1) == 1 and _native(a)
        part = torch.empty((rows, m), dtype=torch.float32)  # one chunk of d.T
    else:
        af = dequantize_rows(a, sfa)
        # MKL writes straight into a row-major fp32 d (any row stride); otherwise into a chunk buffer.
        direct = d.dtype == torch.float32 and d.stride(1) == 1
        part = None if direct else torch.empty((m, rows), dtype=torch.float32)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        w = decode(r0, r1)
        dc = d[:, r0:r1]
        cc = None if c is None else c[:, r0:r1]
        if weight_left:
            o = part[: r1 - r0]
            torch.mm(w, at, out=o)
            if cc is not None:
                torch.add(cc, o.T, out=dc)
            elif not (to_bf16_t and native_decode.bf16_transposed(o, dc)):
                dc.copy_(o.T)
            continue
        o = dc if direct else part[:, : r1 - r0]
        if cc is not None:
            torch.addmm(cc, af, w.T, out=o)
        else:
            torch.mm(af, w.T, out=o)
        if o is not dc:
            dc.copy_(o)


def _fused_chunk_rows(n: int, kp: int) -> int:
    """Weight rows per chunk of the one-call C path: about `_FUSED_CHUNK_BYTES` of fp32, and the same number of
    chunks for every thread (they take chunks as they finish; a lone last chunk would leave the others idle)."""
    threads = torch.get_num_threads()
    chunks = threads * max(1, -(-n * kp * 4 // (threads * _FUSED_CHUNK_BYTES)))
    return max(1, -(-n // chunks))


def _native_chunk_decoder(b: torch.Tensor, sfb: torch.Tensor, b_gran: int, buf: torch.Tensor):
    """`decode(r0, r1)` -> fp32 weight rows r0:r1 in (a prefix of) `buf`, by one C pass."""
    sf = sfb.float().contiguous()

    def decode(r0: int, r1: int) -> torch.Tensor:
        w = buf[: r1 - r0]
        native_decode.decode_rows(b[r0:r1], sf, w, row0=r0, gran=b_gran)
        return w

    return decode


def _eager_chunk_decoder(b: torch.Tensor, sfb: torch.Tensor, b_gran: int, buf: torch.Tensor, n: int, k: int):
    """`decode(r0, r1)` as `_native_chunk_decoder`, by five eager passes through the fp16 bit patterns."""
    rows, kp = buf.shape
    sb = folded_scales(sfb)
    sb_rows = (sb if b_gran == 1 else sb.repeat_interleave(128, dim=0)[:n]).unsqueeze(-1)  # [n, kp / 128, 1]
    # ~5 torch calls per chunk at ~1-3 us of fixed cost each, so views are made once up front.
    w16 = torch.empty((rows, kp), dtype=torch.int16)
    if kp != k:
        w16[:, k:].zero_()  # stays zero: only columns :k are rewritten
    full = (w16[:, :k], w16, w16.view(torch.float16), buf, buf.view(rows, kp // 128, 128))
    b8 = b.view(torch.int8)

    def decode(r0: int, r1: int) -> torch.Tensor:
        r = r1 - r0
        w16k, w16r, w16h, w, w3 = full if r == rows else (v[:r] for v in full)
        w16k.copy_(b8[r0:r1])
        w16r.mul_(_TIMES_128).bitwise_and_(_CLEAR_BIT14)
        w.copy_(w16h)
        w3.mul_(sb_rows[r0:r1])
        return w

    return decode
