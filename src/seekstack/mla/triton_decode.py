"""Triton MLA decoding: a split-KV kernel driven by FlashMLA's tile-scheduler plan, plus a combine kernel.

Split-KV kernel, grid (query-row tiles, h_kv, workers): worker w reads its row of `tile_scheduler_metadata` and walks
its (request, token range) pieces. For each piece it loads the request's query rows once (every query token and head
that shares the KV head: FlashMLA's M rows), then streams BLOCK_N-token tiles of the cache through the block table
(or the sparse indices) with an online softmax in base 2. Each key tile is loaded once and also serves as V (its
first head_dim_v columns). The head dim is split into two power-of-two tiles for `tl.dot`: 576 = 512 + 64.
A request processed whole goes straight to `out`; a split one writes a normalised partial output and its base-2
log-sum-exp to fp32 scratch, which the combine kernel (grid: requests, h_kv, row tiles) merges.

CPU runs use Triton's interpreter (TRITON_INTERPRET=1, set here when CUDA is absent and before any kernel is
defined). The interpreter multiplies bf16 bit patterns in `tl.dot` and truncates fp32 -> bf16 casts, so there the
kernel upcasts to fp32 before every dot (UPCAST) and rounds to nearest even by hand before a bf16 store.
"""

from __future__ import annotations

import math
import os

import torch

from seekstack.triton_env import imported_too_early, prepare_triton

# See seekstack.triton_env: the interpreter must be chosen before triton.language is first imported.
_IMPORTED_TOO_EARLY = imported_too_early()
prepare_triton()

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402

from seekstack.mla.fp8_cache import fp8_cache_views  # noqa: E402
from seekstack.mla.interface import DecodeProblem  # noqa: E402
from seekstack.mla.metadata import (  # noqa: E402
    TILE_SCHEDULER_METADATA_SIZE,
    default_num_sms,
    get_mla_metadata,
    num_sm_parts_for,
    plan_splits,
)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
FORCE_FP8_FROM_BITS = False  # tests set it to run the integer fp8 decoding under the interpreter


def _fp8_from_bits(device: torch.device) -> bool:
    """Native float8e4nv needs sm_89+ (Ada, Hopper); Ampere decodes the bits by hand."""
    if FORCE_FP8_FROM_BITS:
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9)


LN2 = math.log(2.0)
LOG2E = 1.0 / LN2


@triton.jit
def _round_to_bf16(x):
    """Round fp32 to the nearest bf16 (ties to even) while staying fp32, so the following cast is exact."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _e4m3_to_f32(bits):
    """float8_e4m3fn bit patterns (uint8) to fp32 with integer ops, for GPUs without native fp8 (before sm_89)."""
    b = bits.to(tl.int32)
    sign = (b >> 7) & 1
    e = (b >> 3) & 15
    m = b & 7
    normal = ((sign << 31) | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)  # rebias 7 -> 127
    sub = m.to(tl.float32) * 0.001953125  # 2^-9: e = 0 is m/8 * 2^-6
    val = tl.where(e == 0, tl.where(sign == 1, -sub, sub), normal)
    return tl.where((e == 15) & (m == 7), float("nan"), val)


@triton.jit
def _store_rows(Out, Lse, o, lse2, b_idx, s_row, head, offs_d, row_ok,
                stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls,
                DV: tl.constexpr, EXACT_BF16: tl.constexpr):  # fmt: skip
    """Write final rows: o [BLOCK_M, D1] (first DV columns), lse2 base-2 -> natural log; -inf -> +inf."""
    if EXACT_BF16:
        o = _round_to_bf16(o)
    o_ptrs = Out + b_idx * stride_ob + s_row[:, None] * stride_os + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d < DV)[None, :])
    lse = tl.where(lse2 == float("-inf"), float("inf"), lse2 * 0.6931471805599453)
    tl.store(Lse + b_idx * stride_lb + head * stride_lh + s_row * stride_ls, lse, mask=row_ok)


@triton.jit
def _splitkv_kernel(
    Q, K, KScale, KRope, BlockTable, SeqLens, Indices, SchedMeta, NumSplits,
    Out, Lse, OAccum, LseAccum,
    sm_scale_log2, s_q, topk, M, G, H_KV, REQ_PER_BATCH, D,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_kp, stride_kh,
    stride_sb, stride_sp, stride_sh,
    stride_rb, stride_rp, stride_rh,
    stride_bt, stride_ir,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh, stride_ls,
    PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D1: tl.constexpr, D2: tl.constexpr, SPLIT: tl.constexpr, DV: tl.constexpr,
    SPARSE: tl.constexpr, CAUSAL: tl.constexpr, FP8: tl.constexpr, UPCAST: tl.constexpr, EXACT_BF16: tl.constexpr,
    PRECISION: tl.constexpr, FP8_FROM_BITS: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_w = tl.program_id(2)
    meta = SchedMeta + pid_w * 8
    begin_idx = tl.load(meta)
    begin_tok = tl.load(meta + 1)
    end_idx = tl.load(meta + 2)
    end_tok = tl.load(meta + 3)
    begin_split = tl.load(meta + 4)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    head = pid_h * G + offs_m % G
    offs_n = tl.arange(0, BLOCK_N)
    offs_d1 = tl.arange(0, D1)
    offs_d2 = tl.arange(0, D2)
    d1_ok = offs_d1 < SPLIT
    d2_ok = SPLIT + offs_d2 < D
    if UPCAST:
        dot_ty = tl.float32
    else:
        dot_ty = Q.dtype.element_ty

    for r in range(begin_idx, end_idx + 1):
        b_idx = r // REQ_PER_BATCH
        s_row = r % REQ_PER_BATCH + offs_m // G  # the query token of each row
        if SPARSE:
            seqlen = topk
        else:
            seqlen = tl.load(SeqLens + r)
        start = tl.where(r == begin_idx, begin_tok, 0)
        split_idx = tl.where(r == begin_idx, begin_split, 0)
        stop = tl.where(r == end_idx, end_tok, seqlen)

        q_base = Q + b_idx * stride_qb + s_row[:, None] * stride_qs + head[:, None] * stride_qh
        q1 = tl.load(q_base + offs_d1[None, :], mask=row_ok[:, None] & d1_ok[None, :], other=0.0).to(dot_ty)
        q2 = tl.load(q_base + SPLIT + offs_d2[None, :], mask=row_ok[:, None] & d2_ok[None, :], other=0.0).to(dot_ty)
        if CAUSAL:  # query token s sees keys [0, seqlen - s_q + s]
            limit = seqlen - s_q + s_row + 1
        else:
            limit = tl.zeros([BLOCK_M], dtype=tl.int32) + seqlen

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
        for n0 in range(start, stop, BLOCK_N):
            tok = n0 + offs_n
            tok_ok = tok < stop
            if SPARSE:
                slot = tl.load(Indices + r * stride_ir + tok, mask=tok_ok, other=-1)
                tok_ok = tok_ok & (slot >= 0)
                slot = tl.maximum(slot, 0)
                blk = slot // PAGE
                off = slot % PAGE
            else:
                blk = tl.load(BlockTable + b_idx * stride_bt + tok // PAGE, mask=tok_ok, other=0)
                off = tok % PAGE
            blk = blk.to(tl.int64)
            k_row = blk * stride_kb + off * stride_kp + pid_h * stride_kh
            k1 = tl.load(K + k_row[:, None] + offs_d1[None, :], mask=tok_ok[:, None] & d1_ok[None, :], other=0.0)
            if FP8:
                s_row_ptr = KScale + blk * stride_sb + off * stride_sp + pid_h * stride_sh
                scale = tl.load(s_row_ptr[:, None] + (offs_d1 // 128)[None, :], mask=tok_ok[:, None] & d1_ok[None, :],
                                other=0.0)  # fmt: skip
                if FP8_FROM_BITS:
                    k1 = _e4m3_to_f32(k1)
                k1 = k1.to(tl.float32) * scale
                r_row = blk * stride_rb + off * stride_rp + pid_h * stride_rh
                k2 = tl.load(KRope + r_row[:, None] + offs_d2[None, :], mask=tok_ok[:, None] & d2_ok[None, :],
                             other=0.0)  # fmt: skip
            else:
                k2 = tl.load(K + k_row[:, None] + SPLIT + offs_d2[None, :], mask=tok_ok[:, None] & d2_ok[None, :],
                             other=0.0)  # fmt: skip
            k1 = k1.to(dot_ty)
            k2 = k2.to(dot_ty)

            s = tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
            s += tl.dot(q2, tl.trans(k2), input_precision=PRECISION)
            s = s * sm_scale_log2
            allowed = tok_ok[None, :] & (tok[None, :] < limit[:, None])
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(dot_ty), k1, input_precision=PRECISION)  # V: the same tile
            m_i = m_new

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # no key attended: out = 0, lse = -inf (reported as +inf)
        o = acc / l_safe[:, None]
        lse2 = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
        first_split = tl.load(NumSplits + r)
        n_splits = tl.load(NumSplits + r + 1) - first_split
        if n_splits == 1:
            _store_rows(Out, Lse, o, lse2, b_idx, s_row, head, offs_d1, row_ok,
                        stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls, DV, EXACT_BF16)  # fmt: skip
        else:
            acc_row = ((first_split + split_idx) * H_KV + pid_h) * M + offs_m
            tl.store(OAccum + acc_row[:, None].to(tl.int64) * DV + offs_d1[None, :], o,
                     mask=row_ok[:, None] & (offs_d1 < DV)[None, :])  # fmt: skip
            tl.store(LseAccum + acc_row, lse2, mask=row_ok)


@triton.jit
def _combine_kernel(
    OAccum, LseAccum, NumSplits, Out, Lse,
    M, G, H_KV, REQ_PER_BATCH,
    stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls,
    BLOCK_M: tl.constexpr, D1: tl.constexpr, DV: tl.constexpr, EXACT_BF16: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_m = tl.program_id(2)
    first = tl.load(NumSplits + r)
    n = tl.load(NumSplits + r + 1) - first
    if n > 1:  # a request in one piece was written by the split-KV kernel
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < M
        offs_d = tl.arange(0, D1)
        d_ok = offs_d < DV
        mx = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        for i in range(n):
            row = ((first + i) * H_KV + pid_h) * M + offs_m
            mx = tl.maximum(mx, tl.load(LseAccum + row, mask=row_ok, other=float("-inf")))
        mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
        total = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
        for i in range(n):
            row = ((first + i) * H_KV + pid_h) * M + offs_m
            w = tl.exp2(tl.load(LseAccum + row, mask=row_ok, other=float("-inf")) - mx_safe)
            total += w
            part_ptrs = OAccum + row[:, None].to(tl.int64) * DV + offs_d[None, :]
            part = tl.load(part_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            acc += w[:, None] * part
        total_safe = tl.where(total == 0.0, 1.0, total)
        o = acc / total_safe[:, None]
        lse2 = tl.where(total == 0.0, float("-inf"), mx_safe + tl.log2(total_safe))
        b_idx = r // REQ_PER_BATCH
        s_row = r % REQ_PER_BATCH + offs_m // G
        head = pid_h * G + offs_m % G
        _store_rows(Out, Lse, o, lse2, b_idx, s_row, head, offs_d, row_ok,
                    stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls, DV, EXACT_BF16)  # fmt: skip


def _next_pow2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def _plan(p: DecodeProblem) -> tuple[torch.Tensor, torch.Tensor]:
    if not p.sparse:
        return get_mla_metadata(p.cache_seqlens, p.rows, p.h_kv)
    parts = num_sm_parts_for(default_num_sms(p.q.device), p.rows, p.h_kv)
    rows, splits = plan_splits([p.indices.shape[-1]] * p.num_requests, parts)
    device = p.q.device
    return (
        torch.tensor(rows, dtype=torch.int32, device=device).view(parts, TILE_SCHEDULER_METADATA_SIZE),
        torch.tensor(splits, dtype=torch.int32, device=device),
    )


def _check_plan(p: DecodeProblem, meta, num_splits) -> None:
    if not isinstance(meta, torch.Tensor) or meta.dim() != 2 or meta.shape[1] != TILE_SCHEDULER_METADATA_SIZE:
        raise ValueError("tile_scheduler_metadata must be an int32 [num_sm_parts, 8] tensor from get_mla_metadata")
    if meta.dtype != torch.int32 or meta.device != p.q.device:
        raise ValueError(f"tile_scheduler_metadata must be int32 on {p.q.device}, got {meta.dtype} on {meta.device}")
    if not isinstance(num_splits, torch.Tensor) or num_splits.shape != (p.num_requests + 1,):
        raise ValueError(
            f"num_splits must be an int32 [{p.num_requests + 1}] tensor (requests + 1) from get_mla_metadata"
        )
    if num_splits.dtype != torch.int32 or num_splits.device != p.q.device:
        raise ValueError(f"num_splits must be int32 on {p.q.device}, got {num_splits.dtype} on {num_splits.device}")


def _configs(rows: int, upcast: bool) -> list[tuple[int, int, int, int]]:
    """Candidate (BLOCK_M, BLOCK_N, num_warps, num_stages), best first; a launch that needs more shared memory than
    the GPU has falls through to the next. The interpreter's cost grows with the program count, so it gets the
    largest tiles. GPU tiles were chosen by compiling ahead of time for sm_80/sm_90 (triton 3.8, no GPU at hand):
    the 512-wide fp32 accumulator spills least at 16 rows x 32 tokens x 4 warps (200 B of stack on sm_90) and
    32 x 32 x 8 warps (528 B); 64-row tiles spill 2.8 KB. Not yet timed on a GPU."""
    if INTERPRET:
        return [(min(max(16, _next_pow2(rows)), 128), 64, 4, 1)]
    small = [(16, 32, 4, 2), (16, 16, 4, 1)]
    if upcast:  # fp32 operands double the shared memory per tile
        return [(16, 16, 4, 1)]
    return ([(32, 32, 8, 2)] if rows > 16 else []) + small


_WORKING_CONFIG: dict[tuple, int] = {}  # first candidate that launched, per kernel specialisation


def mla_decode_triton(
    p: DecodeProblem, tile_scheduler_metadata: torch.Tensor | None = None, num_splits: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [b, s_q, h_q, dv] in q's dtype, lse fp32 [b, h_q, s_q]) for a validated problem."""
    if p.q.device.type != "cuda" and not INTERPRET:
        raise ValueError("q: the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")
    if INTERPRET and _IMPORTED_TOO_EARLY:
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set; set it before importing triton")
    if tile_scheduler_metadata is None or num_splits is None:
        tile_scheduler_metadata, num_splits = _plan(p)
    _check_plan(p, tile_scheduler_metadata, num_splits)

    q, dv, d = p.q, p.head_dim_v, p.d
    device = q.device
    from_bits = False
    if p.is_fp8:
        nope, scales, rope = fp8_cache_views(p.k_cache, d, dv)
        from_bits = _fp8_from_bits(device)
        k_main, k_scale, k_rope = (nope.view(torch.uint8) if from_bits else nope), scales, rope
        split = dv
    else:
        k_main = k_scale = k_rope = p.k_cache
        split = min(_next_pow2(dv), d)
    d1 = _next_pow2(split) if p.is_fp8 else _next_pow2(dv)
    d2 = max(16, _next_pow2(d - split)) if d > split else 16
    if k_main.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("q and k_cache must be contiguous in their last dimension")

    out = torch.empty(p.b, p.s_q, p.h_q, dv, dtype=q.dtype, device=device)
    lse = torch.empty(p.b, p.h_q, p.s_q, dtype=torch.float32, device=device)
    parts = tile_scheduler_metadata.shape[0]
    max_splits = p.num_requests + parts  # FlashMLA's bound on the total number of pieces
    o_accum = torch.empty(max_splits, p.h_kv, p.rows, dv, dtype=torch.float32, device=device)
    lse_accum = torch.empty(max_splits, p.h_kv, p.rows, dtype=torch.float32, device=device)

    req_per_batch = p.s_q if p.sparse else 1
    if p.sparse:
        indices = p.indices.reshape(p.num_requests, -1)
        block_table = seqlens = indices  # unused placeholders
    else:
        indices = p.block_table  # unused placeholder
        block_table, seqlens = p.block_table, p.cache_seqlens
    upcast = INTERPRET or q.dtype == torch.float32 or p.is_fp8 and q.dtype != torch.bfloat16
    exact_bf16 = INTERPRET and q.dtype == torch.bfloat16
    args = (
        q, k_main, k_scale, k_rope, block_table, seqlens, indices, tile_scheduler_metadata, num_splits,
        out, lse, o_accum, lse_accum,
        p.softmax_scale * LOG2E, p.s_q, indices.shape[-1], p.rows, p.group, p.h_kv, req_per_batch, d,
        q.stride(0), q.stride(1), q.stride(2),
        k_main.stride(0), k_main.stride(1), k_main.stride(2),
        k_scale.stride(0), k_scale.stride(1), k_scale.stride(2),
        k_rope.stride(0), k_rope.stride(1), k_rope.stride(2),
        block_table.stride(0), indices.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
    )  # fmt: skip
    consts = dict(
        PAGE=p.page, D1=d1, D2=d2, SPLIT=split, DV=dv, SPARSE=p.sparse, CAUSAL=p.causal, FP8=p.is_fp8,
        UPCAST=upcast, EXACT_BF16=exact_bf16,
        PRECISION="ieee" if upcast else "tf32",  # fp32 dots must not silently drop to TF32 on a GPU
        FP8_FROM_BITS=from_bits,
    )  # fmt: skip
    configs = _configs(p.rows, upcast)
    key = (device, q.dtype, p.rows > 16, tuple(sorted(consts.items())))
    for i in range(_WORKING_CONFIG.get(key, 0), len(configs)):
        block_m, block_n, warps, stages = configs[i]
        grid = (triton.cdiv(p.rows, block_m), p.h_kv, parts)
        try:
            _splitkv_kernel[grid](*args, BLOCK_M=block_m, BLOCK_N=block_n, **consts, num_warps=warps,
                                  num_stages=stages)  # fmt: skip
        except OutOfResources:
            if i == len(configs) - 1:
                raise
            continue
        _WORKING_CONFIG[key] = i
        break
    combine_m = block_m if INTERPRET else 16  # [16, 512] fp32 per 4 warps: 64 registers a thread
    _combine_kernel[(p.num_requests, p.h_kv, triton.cdiv(p.rows, combine_m))](
        o_accum, lse_accum, num_splits, out, lse,
        p.rows, p.group, p.h_kv, req_per_batch,
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
        BLOCK_M=combine_m, D1=d1, DV=dv, EXACT_BF16=exact_bf16, num_warps=4,
    )  # fmt: skip
    return out, lse
