"""Triton kernels for the fine-grained FP8 GEMMs (and their bf16 counterparts), on any CUDA GPU or the interpreter.

One kernel, specialised by constexpr flags, covers dense, contiguous-grouped and masked-grouped layouts. Each
program owns a BLOCK_M x BLOCK_N output tile and walks K in 128-wide blocks, the scale granularity:
`acc += dot(a, b) * sa[:, None] * sb[None, :]`, which is DeepGEMM's per-128 promotion into fp32.

- fp8 operands use the fp8 tensor cores where they exist (SM89+). Elsewhere (and in the interpreter) they travel
  as int8 bits and are decoded to fp16 in registers with integer ops, exactly: the dequantising path for GPUs
  without FP8 support (Triton rejects the e4m3 type below SM89).
- Under `TRITON_INTERPRET=1`, bf16 operands are widened to fp32 (the interpreter's bf16 `tl.dot` is wrong) and a
  bf16 output is rounded to nearest even by hand (the interpreter's downcast truncates).

Rows, columns and K need not be multiples of the tile sizes: loads and stores are masked.
"""

from __future__ import annotations

import os

import torch

from seekstack.triton_env import prepare_triton

prepare_triton()  # before the first `import triton`: without CUDA, kernels run in Triton's interpreter

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from .layout import ceil_div  # noqa: E402

_DENSE, _CONTIGUOUS, _MASKED = 0, 1, 2


# fmt: off
@triton.jit
def _tile_acc(a_ptr, b_ptr, sa_ptr, sb_ptr, offs_m, offs_n, m_ok, n_ok, K, num_kb,
              s_am, s_ak, s_bn, s_bk, s_sam, s_sak, s_sbn, s_sbk,
              SCALED: tl.constexpr, B_GRAN: tl.constexpr, UPCAST: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 accumulator of one output tile: the K loop over 128-wide blocks with per-block scales."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * s_am + offs_k[None, :] * s_ak
    b_ptrs = b_ptr + offs_k[:, None] * s_bk + offs_n[None, :] * s_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, num_kb):
        k_ok = offs_k < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST == 1:
            # int8 bit patterns of e4m3 -> fp16 holding value * 2**-8, exactly (the 2**16 is in the scales).
            a = ((a.to(tl.int16) << 7) & -16385).to(tl.float16, bitcast=True)
            b = ((b.to(tl.int16) << 7) & -16385).to(tl.float16, bitcast=True)
        elif UPCAST == 3:
            a = a.to(tl.float16)
            b = b.to(tl.float16)
        elif UPCAST == 2:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if SCALED:
            sa = tl.load(sa_ptr + offs_m * s_sam + kb * s_sak, mask=m_ok, other=0.0)
            sb = tl.load(sb_ptr + (offs_n // B_GRAN) * s_sbn + kb * s_sbk, mask=n_ok, other=0.0)
            if UPCAST == 1:
                sa = sa * 65536.0
            acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * s_ak
        b_ptrs += BLOCK_K * s_bk
    return acc


@triton.jit
def _gemm_kernel(a_ptr, b_ptr, d_ptr, c_ptr, sa_ptr, sb_ptr, idx_ptr, M, N, K,
                 s_ag, s_am, s_ak, s_bg, s_bn, s_bk, s_dg, s_dm, s_dn, s_cm, s_cn,
                 s_sag, s_sam, s_sak, s_sbg, s_sbn, s_sbk,
                 LAYOUT: tl.constexpr, SCALED: tl.constexpr, B_GRAN: tl.constexpr, HAS_C: tl.constexpr,
                 UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    pid_g = tl.program_id(1).to(tl.int64)
    # Tiles sharing a B panel run close together (L2 reuse).
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    num_kb = tl.cdiv(K, BLOCK_K)

    if LAYOUT == 1:
        # Contiguous grouped: each row names its group (-1: padding, output zero). In DeepGEMM's layout a tile
        # holds one group; any other segmentation costs one extra pass per group present in the tile.
        ids = tl.load(idx_ptr + offs_m, mask=m_ok, other=-1)
        g = tl.min(tl.where(ids >= 0, ids, 2147483647))
        g_hi = tl.max(ids)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        while g <= g_hi:
            sel = ids == g
            if tl.max(sel.to(tl.int32)) > 0:
                g64 = g.to(tl.int64)  # 64-bit offsets: G * n * k can pass 2**31 for large expert weights
                part = _tile_acc(a_ptr, b_ptr + g64 * s_bg, sa_ptr, sb_ptr + g64 * s_sbg, offs_m, offs_n,
                                 m_ok & sel, n_ok, K, num_kb, s_am, s_ak, s_bn, s_bk, s_sam, s_sak, s_sbn, s_sbk,
                                 SCALED, B_GRAN, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
                acc = tl.where(sel[:, None], part, acc)
            g += 1
    else:
        if LAYOUT == 2:
            # Masked grouped: rows at or beyond masked_m[g] are neither computed nor stored.
            m_valid = tl.load(idx_ptr + pid_g)
            m_ok = m_ok & (offs_m < m_valid)
            num_kb = tl.where(pid_m * BLOCK_M < m_valid, num_kb, 0)
            a_ptr += pid_g * s_ag
            b_ptr += pid_g * s_bg
            sa_ptr += pid_g * s_sag
            sb_ptr += pid_g * s_sbg
            d_ptr += pid_g * s_dg
        acc = _tile_acc(a_ptr, b_ptr, sa_ptr, sb_ptr, offs_m, offs_n, m_ok, n_ok, K, num_kb,
                        s_am, s_ak, s_bn, s_bk, s_sam, s_sak, s_sbn, s_sbk,
                        SCALED, B_GRAN, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)

    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_C:
        acc += tl.load(c_ptr + offs_m[:, None] * s_cm + offs_n[None, :] * s_cn, mask=mask, other=0.0)
    if ROUND_BF16:
        # Round to nearest even in fp32 so the (truncating) interpreter cast to bf16 is exact.
        bits = acc.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        acc = bits.to(tl.float32, bitcast=True)
    tl.store(d_ptr + offs_m[:, None] * s_dm + offs_n[None, :] * s_dn, acc.to(d_ptr.dtype.element_ty), mask=mask)
# fmt: on


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _config(m: int, n: int, device: torch.device) -> dict:
    if device.type != "cuda":
        if not interpreting():
            raise ValueError(f"backend: Triton needs CUDA tensors or TRITON_INTERPRET=1, got tensors on {device}")
        # The interpreter's cost grows with the number of programs: use the largest tiles.
        return dict(
            BLOCK_M=min(128, max(16, _next_pow2(m))),
            BLOCK_N=min(128, max(16, _next_pow2(n))),
            num_warps=4,
            num_stages=1,
        )
    if m <= 64:
        return dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)


# How fp8 operands reach tl.dot: None picks by device; tests set it to cover every path under the interpreter.
FP8_MODE: int | None = None


def _upcast(dtype: torch.dtype, device: torch.device) -> int:
    """0: dot on the operands as they are (fp8 tensor cores on SM89+); 1: fp8 passed as int8 bits and decoded
    to fp16 in registers (GPUs without FP8 support, where Triton rejects the e4m3 type; the interpreter's
    default); 2: bf16 widened to fp32 (the interpreter's bf16 dot is wrong); 3: fp8 widened to fp16 with a cast.
    """
    if dtype == torch.bfloat16:
        return 2 if device.type != "cuda" else 0
    if FP8_MODE is not None:
        return FP8_MODE
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return 1
    return 0


def _strides3(t: torch.Tensor | None) -> tuple[int, int, int]:
    """(group, row, column) strides; 0 for an absent tensor or an absent group axis."""
    if t is None:
        return (0, 0, 0)
    return tuple(t.stride()) if t.dim() == 3 else (0, *t.stride())


def _launch(layout: int, a, sfa, b, sfb, b_gran: int, d, c, idx, m: int, n: int, k: int, groups: int) -> None:
    cfg = _config(m, n, d.device)
    scaled = sfa is not None
    upcast = _upcast(a.dtype, d.device)
    if upcast == 1:
        a, b = a.view(torch.int8), b.view(torch.int8)
    c_strides = _strides3(c)[1:]
    grid = (ceil_div(m, cfg["BLOCK_M"]) * ceil_div(n, cfg["BLOCK_N"]), groups)
    # Absent operands get `d` as a never-read placeholder pointer.
    _gemm_kernel[grid](
        a, b, d, d if c is None else c, sfa if scaled else d, sfb if scaled else d, d if idx is None else idx,
        m, n, k, *_strides3(a), *_strides3(b), *_strides3(d), *c_strides, *_strides3(sfa), *_strides3(sfb),
        LAYOUT=layout, SCALED=scaled, B_GRAN=b_gran, HAS_C=c is not None, UPCAST=upcast,
        ROUND_BF16=d.dtype == torch.bfloat16 and d.device.type != "cuda",
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=128, GROUP_M=8,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip


def gemm(a, sfa, b, sfb, b_gran: int, d: torch.Tensor, c: torch.Tensor | None) -> None:
    (m, k), n = a.shape, b.shape[0]
    if m and n:
        _launch(_DENSE, a, sfa, b, sfb, b_gran, d, c, None, m, n, k, 1)


def m_grouped_contiguous(a, sfa, b, sfb, b_gran: int, d: torch.Tensor, m_indices: torch.Tensor) -> None:
    (m, k), n = a.shape, b.shape[1]
    if m and n:
        _launch(_CONTIGUOUS, a, sfa, b, sfb, b_gran, d, None, m_indices, m, n, k, 1)


def m_grouped_masked(a, sfa, b, sfb, b_gran: int, d: torch.Tensor, masked_m: torch.Tensor) -> None:
    (groups, m_max, k), n = a.shape, b.shape[1]
    if groups and m_max and n:
        _launch(_MASKED, a, sfa, b, sfb, b_gran, d, None, masked_m, m_max, n, k, groups)
