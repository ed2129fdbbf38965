"""Checks that run inside spawned ranks (loaded by path in every rank by `seekstack.ep.launch.run_ranks`).

Each `check_*` takes a `Ctx`, runs collectives that every rank joins in the same order, and raises on failure.
`run_checks` runs a list of them and reports `(ok, message)` per check, so one spawn serves many pytest cases.
Inputs are drawn on the CPU (same values on every device) and moved to `Ctx.dev`: CPU for gloo, CUDA for NCCL.
"""

from __future__ import annotations

import shutil
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from seekstack.ep import Buffer, EPCommError, dispatch_with_grad, per_token_cast_back, per_token_cast_to_fp8
from seekstack.ep.reference import (
    reference_combine,
    reference_dispatch,
    reference_low_latency_combine,
    reference_low_latency_dispatch,
)
from seekstack.ep.transport import gather_headers


@dataclass
class Ctx:
    rank: int
    R: int
    gen: torch.Generator
    buf: Buffer
    ll: Buffer
    dev: torch.device = torch.device("cpu")


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepEP's similarity metric: with a +1 shift, 1 - 2·Σxy / Σ(x² + y²)."""
    x, y = x.double() + 1, y.double() + 1
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


def make_inputs(c: Ctx, num_tokens: int, hidden: int, num_experts: int, topk: int):
    g = c.gen
    x = torch.randn(num_tokens, hidden, generator=g).to(torch.bfloat16)
    scores = torch.randn(num_tokens, num_experts, generator=g).abs() + 1
    idx = torch.topk(scores, topk, dim=1).indices
    idx[torch.rand(num_tokens, topk, generator=g) < 0.1] = -1
    if num_tokens > 3:
        idx[3] = -1  # a token routed nowhere
    w = torch.rand(num_tokens, topk, generator=g)
    return x.to(c.dev), idx.to(c.dev), w.to(c.dev)


def randn_bf16(c: Ctx, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=c.gen).to(torch.bfloat16).to(c.dev)


def num_tokens_for(c: Ctx) -> int:
    return 23 + 7 * c.rank  # odd and different per rank


def num_experts_for(c: Ctx) -> int:
    return 6 * c.R if c.R == 2 else 4 * c.R


def layout_of(c: Ctx, idx, num_experts):
    per_rank, _, per_expert, in_rank, _ = c.buf.get_dispatch_layout(idx, num_experts)
    return dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)


def routed_inputs(c: Ctx, hidden: int = 128, topk: int = 4):
    """The usual case: this rank's odd token count, bf16 x, top-k routing and its dispatch layout."""
    E, T = num_experts_for(c), num_tokens_for(c)
    x, idx, w = make_inputs(c, T, hidden, E, topk)
    return E, T, hidden, x, idx, w, layout_of(c, idx, E)


def assert_equal(a, b, what: str) -> None:
    if isinstance(a, tuple):
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            assert_equal(u, v, f"{what}[{i}]")
        return
    if a.dtype != b.dtype or a.shape != b.shape:
        raise AssertionError(f"{what}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}")
    if a.is_floating_point():  # bits, so -0.0 vs +0.0 (and NaN payloads) count as differences
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, b = a.view(bits), b.view(bits)
    if not torch.equal(a, b):
        raise AssertionError(f"{what}: not bit-identical to the reference")


def valid_rows(t: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The rows of a masked layout that low-latency dispatch defines: the first count[e] of each expert."""
    return torch.cat([t[e, : int(n)] for e, n in enumerate(count.tolist())])


# ---- checks ---------------------------------------------------------------------------------------------------
def check_layout(c: Ctx) -> None:
    E = num_experts_for(c)
    x, idx, _ = make_inputs(c, 41, 128, E, 4)
    per_rank, per_rdma, per_expert, in_rank, ev = c.buf.get_dispatch_layout(idx, E)
    El = E // c.R
    exp_expert = torch.zeros(E, dtype=torch.int32)
    exp_in_rank = torch.zeros(41, c.R, dtype=torch.bool)
    for t in range(41):
        for e in idx[t].tolist():
            if e >= 0:
                exp_expert[e] += 1
                exp_in_rank[t, e // El] = True
    per_rank, per_expert, in_rank = per_rank.cpu(), per_expert.cpu(), in_rank.cpu()
    assert torch.equal(per_expert, exp_expert) and per_expert.dtype == torch.int32
    assert torch.equal(in_rank, exp_in_rank)
    assert torch.equal(per_rank, exp_in_rank.sum(0).to(torch.int32))
    assert per_rdma is None and ev.is_completed()


def check_dispatch_combine_bf16(c: Ctx) -> None:
    E = num_experts_for(c)
    T, H = num_tokens_for(c), 256
    x, idx, w = make_inputs(c, T, H, E, 4)
    lay = layout_of(c, idx, E)
    recv_x, recv_idx, recv_w, counts, handle, _ = c.buf.dispatch(x, topk_idx=idx, topk_weights=w, **lay)
    ref_x, ref_idx, ref_w, ref_src, state = reference_dispatch(c.buf.group, x, idx, w, E)
    assert_equal(recv_x, ref_x, "recv_x")
    assert_equal(recv_idx, ref_idx, "recv_topk_idx")
    assert_equal(recv_w, ref_w, "recv_topk_weights")
    assert_equal(handle.recv_src_idx, ref_src, "recv_src_idx")
    # per-expert counts = all-reduced layout counts of this rank's experts
    glob = lay["num_tokens_per_expert"].clone()
    dist.all_reduce(glob, group=c.buf.group)
    El = E // c.R
    assert counts == glob[c.rank * El : (c.rank + 1) * El].tolist(), (counts, glob)
    assert counts == [int((recv_idx == e).sum()) for e in range(El)]
    # combine: bit-exact vs the reference, with weights and two biases
    y = (recv_x.float() * 1.5).to(torch.bfloat16)
    biases = (randn_bf16(c, T, H), randn_bf16(c, T, H))
    combined, combined_w, _ = c.buf.combine(y, handle, topk_weights=recv_w, bias=biases)
    ref_c, ref_cw = reference_combine(c.buf.group, y, state, T, recv_w, biases)
    assert_equal(combined, ref_c, "combined_x")
    assert_equal(combined_w, ref_cw, "combined_topk_weights")
    assert torch.equal(combined_w, torch.where(idx >= 0, w, 0.0)), "combined weights must sum back to the originals"
    # DeepEP's recipe: combined / (#ranks the token visited) ≈ x
    plain, _, _ = c.buf.combine(recv_x, handle)
    n = lay["is_token_in_rank"].sum(1, keepdim=True).clamp(min=1)
    reached = lay["is_token_in_rank"].any(1)
    d = calc_diff(plain.float()[reached] / n[reached], x.float()[reached])
    assert d < 5e-6, d
    assert torch.equal(plain[~reached], torch.zeros_like(plain[~reached]))


def check_rank_valued_order(c: Ctx) -> None:
    E = num_experts_for(c)
    T = num_tokens_for(c)
    _, idx, _ = make_inputs(c, T, 128, E, 4)
    x = torch.full((T, 128), float(c.rank), dtype=torch.bfloat16, device=c.dev)
    lay = layout_of(c, idx, E)
    recv_x, _, _, _, handle, _ = c.buf.dispatch(x, **lay)
    prefix = handle.rank_prefix_matrix
    total = torch.tensor([T])
    counts = lay["num_tokens_per_rank"].long()
    dist.all_reduce(counts, group=c.buf.group)
    assert recv_x.shape[0] == int(counts[c.rank]), "received count = all-reduced per-rank count"
    start = 0
    for i in range(c.R):
        end = int(prefix[i][c.rank])
        assert torch.all(recv_x[start:end] == i), f"rows {start}:{end} should come from rank {i}"
        src = handle.recv_src_idx[start:end]
        assert torch.all(src[1:] > src[:-1]), "source order is kept within a source rank"
        start = end
    assert start == recv_x.shape[0] and total.item() == T


def check_dispatch_fp8(c: Ctx) -> None:
    E = num_experts_for(c)
    T, H = num_tokens_for(c), 256
    x, idx, w = make_inputs(c, T, H, E, 4)
    q, s = per_token_cast_to_fp8(x)
    s_colmajor = s.T.contiguous().T  # DeepEP's tests pass the scales column-major
    lay = layout_of(c, idx, E)
    (rq, rs), recv_idx, recv_w, _, handle, _ = c.buf.dispatch((q, s_colmajor), topk_idx=idx, topk_weights=w, **lay)
    (fq, fs), ref_idx, ref_w, _, _ = reference_dispatch(c.buf.group, (q, s), idx, w, E)
    assert_equal((rq, rs), (fq, fs), "fp8 recv_x")
    assert_equal(recv_idx, ref_idx, "recv_topk_idx")
    # combine of the dequantized rows ≈ x · (#ranks)
    y = per_token_cast_back(rq, rs).to(torch.bfloat16)
    combined, _, _ = c.buf.combine(y, handle)
    n = lay["is_token_in_rank"].sum(1, keepdim=True)
    reached = n.squeeze(1) > 0
    d = calc_diff(combined.float()[reached] / n[reached], per_token_cast_back(q, s)[reached])
    assert d < 5e-6, d


def check_cached_dispatch(c: Ctx) -> None:
    E, T, H, x, idx, w, lay = routed_inputs(c)
    recv_x, _, _, _, handle, _ = c.buf.dispatch(x, topk_idx=idx, topk_weights=w, **lay)
    again, ri, rw, cnt, h2, _ = c.buf.dispatch(x, handle=handle)
    assert torch.equal(again, recv_x) and ri is None and rw is None and cnt is None and h2 is None
    x2 = randn_bf16(c, T, H)
    fresh, *_ = c.buf.dispatch(x2, **lay)
    cached, *_ = c.buf.dispatch(x2, handle=handle)
    assert torch.equal(fresh, cached)


def check_held_outputs_survive_later_calls(c: Ctx) -> None:
    # The Buffer reuses output memory across calls only when nothing else references it: outputs a caller still
    # holds must keep their values when later dispatches and combines run.
    E, T, H, x, idx, w, lay = routed_inputs(c)
    recv_x, _, _, _, handle, _ = c.buf.dispatch(x, topk_idx=idx, topk_weights=w, **lay)
    combined, _, _ = c.buf.combine(recv_x, handle)
    snap_recv, snap_comb = recv_x.clone(), combined.clone()
    for _ in range(2):
        other = randn_bf16(c, T, H)
        again, *_ = c.buf.dispatch(other, handle=handle)
        c.buf.combine(again, handle)
        del again
    assert torch.equal(recv_x, snap_recv), "a held recv_x was overwritten by a later dispatch"
    assert torch.equal(combined, snap_comb), "a held combine output was overwritten by a later combine"


def check_async_and_events(c: Ctx) -> None:
    E, T, H, x, idx, w, lay = routed_inputs(c)
    sync = c.buf.dispatch(x, topk_idx=idx, topk_weights=w, **lay)
    prev = Buffer.capture()
    recv_x, recv_idx, recv_w, counts, handle, ev = c.buf.dispatch(
        x, topk_idx=idx, topk_weights=w, previous_event=prev, async_finish=True, **lay
    )
    _ = torch.randn(64, 64) @ torch.randn(64, 64)  # overlapped work
    with ev:
        pass
    assert ev.is_completed()
    assert torch.equal(recv_x, sync[0]) and torch.equal(recv_idx, sync[1]) and torch.equal(recv_w, sync[2])
    assert counts == sync[3]
    comb, _, cev = c.buf.combine(recv_x, handle, async_finish=True, previous_event=ev)
    cev.current_stream_wait()
    comb_sync, _, _ = c.buf.combine(recv_x, handle)
    assert torch.equal(comb, comb_sync)


def check_worst_tokens_and_alignment(c: Ctx) -> None:
    E, T, H, x, idx, w, lay = routed_inputs(c)
    base = c.buf.dispatch(x, topk_idx=idx, topk_weights=w, **lay)
    n = base[0].shape[0]
    # The worst case of every rank: all tokens of every rank (T differs per rank), plus a few spare rows.
    most = torch.tensor([T], device=c.dev)
    dist.all_reduce(most, op=dist.ReduceOp.MAX, group=c.buf.group)
    worst = int(most) * c.R + 5
    rx, ri, rw, counts, handle, _ = c.buf.dispatch(x, topk_idx=idx, topk_weights=w, num_worst_tokens=worst, **lay)
    assert counts == [] and rx.shape[0] == worst
    assert torch.equal(rx[:n], base[0]) and torch.equal(ri[:n], base[1]) and torch.equal(rw[:n], base[2])
    assert torch.all(ri[n:] == -1), "padding top-k ids must be -1"
    y = rx.clone()
    y[n:] = float("nan")  # poisoned padding must not leak into combine
    comb, _, _ = c.buf.combine(y, handle)
    ref, _, _ = c.buf.combine(base[0], base[4])
    assert torch.equal(comb, ref)
    aligned = c.buf.dispatch(x, expert_alignment=8, **lay)[3]
    assert aligned == [(v + 7) // 8 * 8 for v in base[3]]
    try:
        c.buf.dispatch(x, num_worst_tokens=1, **lay)
    except ValueError as e:
        assert "num_worst_tokens" in str(e)
    else:
        raise AssertionError("num_worst_tokens too small must raise ValueError")


def _ll_inputs(c: Ctx, num_max: int, H: int, E: int):
    T = num_max - 3 - c.rank  # fewer tokens than the maximum, different per rank
    return T, *make_inputs(c, T, H, E, 4)


def check_low_latency_bf16(c: Ctx) -> None:
    E, num_max, H = num_experts_for(c), 16, 256
    T, x, idx, w = _ll_inputs(c, num_max, H, E)
    x[:, -128:] = torch.arange(T, dtype=torch.bfloat16, device=c.dev)[:, None]  # token index in the last 128
    stats = torch.zeros(E // c.R, dtype=torch.int32, device=c.dev)
    recv, count, handle, ev, hook = c.ll.low_latency_dispatch(
        x, idx, num_max, E, cumulative_local_expert_recv_stats=stats, use_fp8=False
    )
    ref, ref_count = reference_low_latency_dispatch(c.ll.group, x, idx, num_max, E, use_fp8=False)
    assert torch.equal(count, ref_count) and torch.equal(stats, count)
    assert_equal(valid_rows(recv, count), valid_rows(ref, count), "low-latency recv_x")
    src_info, layout_range = handle[0], handle[1]
    for e in range(E // c.R):
        k = int(count[e])
        assert torch.equal(recv[e, :k, -1].float(), src_info[e, :k].float()), "src_info matches token ids"
        ranges = [(int(v) >> 32, int(v) & 0xFFFFFFFF) for v in layout_range[e]]
        assert sum(n for _, n in ranges) == k and ranges[0][0] == 0
    y = recv.clone()
    for e in range(E // c.R):
        y[e, int(count[e]) :] = float("nan")  # rows past recv_count are garbage to combine
    comb, _, _ = c.ll.low_latency_combine(y, idx, w, handle)
    assert_equal(comb, reference_low_latency_combine(c.ll.group, recv, idx, w, num_max, E), "low-latency combine")
    want = x.float() * torch.where(idx >= 0, w, 0.0).sum(1, keepdim=True)
    d = calc_diff(comb.float(), want)
    assert d < 1e-5, d
    # Signed zeros: every copy of every third token becomes -0.0; the reference's sum starts at +0.0, so +0.0.
    y[(src_info[:, : y.shape[1]].long() % 3 == 0)] = -0.0
    comb, _, _ = c.ll.low_latency_combine(y, idx, w, handle)
    ref = reference_low_latency_combine(c.ll.group, y, idx, w, num_max, E)
    assert_equal(comb, ref, "low-latency combine with signed zeros")


def check_low_latency_fp8(c: Ctx) -> None:
    E, num_max, H = num_experts_for(c), 16, 256
    T, x, idx, w = _ll_inputs(c, num_max, H, E)
    (q, s), count, handle, _, _ = c.ll.low_latency_dispatch(x, idx, num_max, E, use_fp8=True)
    (fq, fs), ref_count = reference_low_latency_dispatch(c.ll.group, x, idx, num_max, E, use_fp8=True)
    assert torch.equal(count, ref_count)
    assert s.stride(1) == 1 and s.stride(2) == s.shape[1], "scales are column-major in the last two dims"
    assert_equal(valid_rows(q, count), valid_rows(fq, count), "low-latency fp8 recv")
    assert_equal(valid_rows(s, count), valid_rows(fs, count), "low-latency fp8 scales")
    y = per_token_cast_back(q, s).to(torch.bfloat16)
    comb, _, _ = c.ll.low_latency_combine(y, idx, w, handle)
    want = x.float() * torch.where(idx >= 0, w, 0.0).sum(1, keepdim=True)
    d = calc_diff(comb.float(), want)
    assert d < 9e-4, d
    x512 = randn_bf16(c, T, 512)
    (q8, s8), count8, h8, *_ = c.ll.low_latency_dispatch(x512, idx, num_max, E, round_scale=True, use_ue8m0=True)
    assert s8.dtype == torch.int32 and s8.shape[-1] == 512 // 512
    _, pow2 = per_token_cast_to_fp8(x512, round_scale=True)
    exps = torch.empty(s8.shape, dtype=torch.int32).copy_(s8).view(torch.uint8).view(*s8.shape[:2], 4).float()
    decoded, pow2, h8 = torch.exp2(exps - 127), pow2.cpu(), (h8[0].cpu(), h8[1].cpu())
    for e in range(E // c.R):
        begin, n = int(h8[1][e, c.rank]) >> 32, int(h8[1][e, c.rank]) & 0xFFFFFFFF
        for i in range(begin, begin + n):  # this rank's own tokens, located through layout_range and src_info
            assert torch.equal(decoded[e, i], pow2[int(h8[0][e, i])]), "UE8M0 exponents decode to the scales"


def check_low_latency_hook_async_zero_copy(c: Ctx) -> None:
    E, num_max, H = num_experts_for(c), 16, 128
    T, x, idx, w = _ll_inputs(c, num_max, H, E)
    base, bcount, bhandle, _, _ = c.ll.low_latency_dispatch(x, idx, num_max, E, use_fp8=False)
    recv, count, handle, _, hook = c.ll.low_latency_dispatch(x, idx, num_max, E, use_fp8=False, return_recv_hook=True)
    _ = torch.randn(64, 64) @ torch.randn(64, 64)  # work between send and receive
    hook()
    assert torch.equal(count, bcount) and torch.equal(valid_rows(recv, count), valid_rows(base, count))
    assert recv.data_ptr() != base.data_ptr(), "two low-latency results are alive at once (alternating buffers)"
    comb_ref, _, _ = c.ll.low_latency_combine(base, idx, w, bhandle)
    comb, ev, _ = c.ll.low_latency_combine(recv, idx, w, handle, async_finish=True)
    ev.current_stream_wait()
    assert torch.equal(comb, comb_ref)
    zbuf = c.ll.get_next_low_latency_combine_buffer(handle)
    zbuf.copy_(recv)
    out = torch.empty(T, H, dtype=torch.bfloat16, device=c.dev)
    comb2, _, hook2 = c.ll.low_latency_combine(None, idx, w, handle, zero_copy=True, return_recv_hook=True, out=out)
    hook2()
    assert comb2 is out and torch.equal(out, comb_ref)


def check_autograd(c: Ctx) -> None:
    from seekstack.ep import combine_with_grad

    E = num_experts_for(c)
    T, H = num_tokens_for(c), 64
    _, idx, w = make_inputs(c, T, H, E, 4)
    x = torch.randn(T, H, generator=c.gen).to(c.dev).requires_grad_(True)
    w = w.clone().requires_grad_(True)
    recv_x, recv_idx, recv_w, _, handle = dispatch_with_grad(c.buf, x, idx, w, E)
    y = recv_x * 2.0
    combined, combined_w = combine_with_grad(c.buf, y, handle, topk_weights=recv_w * 3.0)
    gy = torch.randn(T, H, generator=c.gen).to(c.dev)
    gw = torch.randn(T, 4, generator=c.gen).to(c.dev)
    ((combined * gy).sum() + (combined_w * gw).sum()).backward()
    n = (idx >= 0).any(1)  # combined = 2 · (#ranks reached) · x
    in_rank = torch.zeros(T, c.R, dtype=torch.bool, device=c.dev)
    valid = idx >= 0
    in_rank[valid.nonzero()[:, 0], idx[valid] // (E // c.R)] = True
    cnt = in_rank.sum(1, keepdim=True).float()
    assert torch.allclose(combined, 2 * cnt * x.detach()) and n.any()
    assert torch.allclose(x.grad, 2 * cnt * gy), "dispatch backward = combine of the gradients"
    assert torch.allclose(w.grad, 3 * gw * valid), "weight gradients reach only real top-k slots"


def check_rank_without_tokens(c: Ctx) -> None:
    """Rank 0 has no tokens at all; everyone else dispatches, combines and runs low latency as usual."""
    E = num_experts_for(c)
    T, H = (0 if c.rank == 0 else num_tokens_for(c)), 128
    x, idx, w = make_inputs(c, max(T, 4), H, E, 4)
    x, idx, w = x[:T], idx[:T], w[:T]
    lay = layout_of(c, idx, E)
    recv_x, recv_idx, recv_w, _, handle, _ = c.buf.dispatch(x, topk_idx=idx, topk_weights=w, **lay)
    ref_x, ref_idx, ref_w, _, state = reference_dispatch(c.buf.group, x, idx, w, E)
    assert_equal(recv_x, ref_x, "recv_x")
    assert_equal(recv_idx, ref_idx, "recv_topk_idx")
    combined, combined_w, _ = c.buf.combine(recv_x, handle, topk_weights=recv_w)
    ref_c, ref_cw = reference_combine(c.buf.group, recv_x, state, T, recv_w)
    assert_equal(combined, ref_c, "combined_x")
    assert_equal(combined_w, ref_cw, "combined_topk_weights")
    assert_equal(c.buf.dispatch(x, handle=handle)[0], recv_x, "cached recv_x")
    num_max = 23 + 7 * c.R  # more than any rank's tokens
    recv, count, ll_handle, _, _ = c.ll.low_latency_dispatch(x, idx, num_max, E, use_fp8=False)
    ref, ref_count = reference_low_latency_dispatch(c.ll.group, x, idx, num_max, E, use_fp8=False)
    assert torch.equal(count, ref_count)
    assert_equal(valid_rows(recv, count), valid_rows(ref, count), "low-latency recv_x")
    comb, _, _ = c.ll.low_latency_combine(recv, idx, w, ll_handle)
    assert_equal(comb, reference_low_latency_combine(c.ll.group, recv, idx, w, num_max, E), "low-latency combine")


def check_reduction_in_token_tiles(c: Ctx) -> None:
    """Combine sums tile by tile on CPU (~2 MiB of widened rows per tile): with tiles of a few tokens, both combines
    still match the references bit for bit, biases included."""
    import seekstack.ep.reduce as reduce

    E, T, H, x, idx, w, lay = routed_inputs(c)
    saved = reduce._TILE_BYTES
    reduce._TILE_BYTES = 4 * H * 3
    try:
        recv_x, _, recv_w, _, handle, _ = c.buf.dispatch(x, topk_idx=idx, topk_weights=w, **lay)
        _, _, _, _, state = reference_dispatch(c.buf.group, x, idx, w, E)
        y = (recv_x.float() * 0.75).to(torch.bfloat16)
        bias = randn_bf16(c, T, H)
        combined, combined_w, _ = c.buf.combine(y, handle, topk_weights=recv_w, bias=bias)
        ref_c, ref_cw = reference_combine(c.buf.group, y, state, T, recv_w, (bias,))
        assert_equal(combined, ref_c, "tiled combined_x")
        assert_equal(combined_w, ref_cw, "tiled combined_topk_weights")
        num_max = 16
        T_ll, lx, lidx, lw = _ll_inputs(c, num_max, H, E)
        recv, count, ll_handle, _, _ = c.ll.low_latency_dispatch(lx, lidx, num_max, E, use_fp8=False)
        comb, _, _ = c.ll.low_latency_combine(recv, lidx, lw, ll_handle)
        ref_ll = reference_low_latency_combine(c.ll.group, recv, lidx, lw, num_max, E)
        assert_equal(comb, ref_ll, "tiled low-latency combine")
    finally:
        reduce._TILE_BYTES = saved


def check_follows_input_device(c: Ctx) -> None:
    """Every tensor the Buffer creates follows its inputs' device, which is how the CUDA path is checked on CPU:
    with factories defaulting to the meta device, a missed `device=` yields a meta tensor and the call fails."""
    E = num_experts_for(c)
    T, H = num_tokens_for(c), 256
    x, idx, w = make_inputs(c, T, H, E, 4)
    q, s = per_token_cast_to_fp8(x)
    lay = layout_of(c, idx, E)
    bias = randn_bf16(c, T, H)
    want = c.buf.dispatch(x, topk_idx=idx, topk_weights=w, **lay)
    want_fp8 = c.buf.dispatch((q, s), topk_idx=idx, topk_weights=w, **lay)
    want_comb = c.buf.combine(want[0], want[4], topk_weights=want[2], bias=bias)
    num_max = 16
    lx, lidx, lw = x[:num_max], idx[:num_max], w[:num_max]
    want_ll, want_count, want_h, _, _ = c.ll.low_latency_dispatch(lx, lidx, num_max, E, use_fp8=False)
    want_ll = valid_rows(want_ll, want_count)
    y_ll = c.ll.get_next_low_latency_combine_buffer(want_h)
    want_llc = c.ll.low_latency_combine(y_ll, lidx, lw, want_h)
    with torch.device("meta"):
        lay2 = layout_of(c, idx, E)
        got = c.buf.dispatch(x, topk_idx=idx, topk_weights=w, **lay2, async_finish=True)
        got[5].current_stream_wait()
        got_fp8 = c.buf.dispatch((q, s), topk_idx=idx, topk_weights=w, **lay2)
        got_cached = c.buf.dispatch(x, handle=got[4])[0]
        got_comb = c.buf.combine(got[0], got[4], topk_weights=got[2], bias=bias)
        ll, count, h, _, hook = c.ll.low_latency_dispatch(lx, lidx, num_max, E, use_fp8=True, return_recv_hook=True)
        hook()
        ll_bf16, count_bf16, h_bf16, _, _ = c.ll.low_latency_dispatch(lx, lidx, num_max, E, use_fp8=False)
        got_llc = c.ll.low_latency_combine(y_ll, lidx, lw, h_bf16)
    for name, a, b in [
        ("recv_x", got[0], want[0]),
        ("recv_topk_idx", got[1], want[1]),
        ("recv_topk_weights", got[2], want[2]),
        ("fp8 recv_x", got_fp8[0], want_fp8[0]),
        ("cached recv_x", got_cached, want[0]),
        ("combined", got_comb[0], want_comb[0]),
        ("combined weights", got_comb[1], want_comb[1]),
        ("low-latency recv_x", valid_rows(ll_bf16, count_bf16), want_ll),
        ("low-latency combine", got_llc[0], want_llc[0]),
    ]:
        assert_equal(a, b, name)
    assert ll[0].device == x.device and ll[1].device == x.device and count.device == x.device
    assert torch.equal(count, want_count) and h[0].device == x.device


def check_transport_in_use(c: Ctx) -> None:
    """auto on a gloo group on one host is the shared-window path; explicit transports are what they say."""
    E, T, H, x, idx, w, lay = routed_inputs(c)
    c.buf.dispatch(x, topk_idx=idx, topk_weights=w, **lay)
    uses_windows = c.buf._windows is not None
    expected = c.buf.transport in ("auto", "shm") and dist.get_backend(c.buf.group) == "gloo"
    assert uses_windows == expected, (c.buf.transport, uses_windows)
    try:
        Buffer(c.buf.group, transport="nvlink")
    except ValueError as e:
        assert "transport" in str(e)
    else:
        raise AssertionError("an unknown transport must raise ValueError")


def check_window_growth_and_parity(c: Ctx) -> None:
    """Windows grow when a call needs more than the last one and alternate between calls: a run of dispatch,
    cached dispatch and combine calls of growing and shrinking sizes stays equal to the reference."""
    E = num_experts_for(c)
    for T, H in ((3, 128), (300, 1024), (5, 256), (700, 2048), (0, 128), (17, 384)):
        x, idx, w = make_inputs(c, T, H, E, 4)
        lay = layout_of(c, idx, E)
        recv_x, recv_idx, recv_w, _, handle, _ = c.buf.dispatch(x, topk_idx=idx, topk_weights=w, **lay)
        ref_x, ref_idx, ref_w, _, state = reference_dispatch(c.buf.group, x, idx, w, E)
        assert_equal(recv_x, ref_x, f"recv_x T={T} H={H}")
        assert_equal(recv_idx, ref_idx, f"recv_topk_idx T={T}")
        assert_equal(recv_w, ref_w, f"recv_topk_weights T={T}")
        q, s = per_token_cast_to_fp8(x)
        (cq, cs), *_ = c.buf.dispatch((q, s), handle=handle)
        (fq, fs), *_ = reference_dispatch(c.buf.group, (q, s), idx, w, E)
        assert_equal(cq.view(torch.uint8), fq.view(torch.uint8), f"cached fp8 recv_x T={T}")
        assert_equal(cs, fs, f"cached fp8 scales T={T}")
        y = (recv_x.float() * 0.5 - 1).to(torch.bfloat16)
        combined, combined_w, _ = c.buf.combine(y, handle, topk_weights=recv_w)
        ref_c, ref_cw = reference_combine(c.buf.group, y, state, T, recv_w)
        assert_equal(combined, ref_c, f"combined T={T} H={H}")
        assert_equal(combined_w, ref_cw, f"combined weights T={T}")


def check_combine_sparse_and_full_routing(c: Ctx) -> None:
    """Even ranks route each token to one expert, odd ranks to every rank (then every rank to one expert), with
    signed zeros among the expert outputs: combine equals the reference bit for bit (0 + -0 = +0 there)."""
    E = num_experts_for(c)
    T, H = num_tokens_for(c) + 40, 384
    for odd_dense in (True, False):
        x, idx, w = make_inputs(c, T, H, E, 4)
        if c.rank % 2 == 0 or not odd_dense:
            idx[:, 1:] = -1
        else:
            idx = (torch.arange(4).repeat(T, 1) * (E // 4)).to(
                c.dev
            )  # experts 0, E/4, E/2, 3E/4: one on each of 4 groups
            idx[5] = -1  # a token routed nowhere
        lay = layout_of(c, idx, E)
        recv_x, _, recv_w, _, handle, _ = c.buf.dispatch(x, topk_idx=idx, topk_weights=w, **lay)
        _, _, _, _, state = reference_dispatch(c.buf.group, x, idx, w, E)
        y = (recv_x.float() * -0.75).to(torch.bfloat16)
        y[::7] = -0.0  # signed zeros: 0 + -0 = +0 in the reference's sum
        bias = randn_bf16(c, T, H)
        combined, combined_w, _ = c.buf.combine(y, handle, topk_weights=recv_w, bias=bias)
        ref_c, ref_cw = reference_combine(c.buf.group, y, state, T, recv_w, (bias,))
        assert_equal(combined, ref_c, f"combined (odd ranks dense: {odd_dense})")
        assert_equal(combined_w, ref_cw, f"combined weights (odd ranks dense: {odd_dense})")
        plain, _, _ = c.buf.combine(y, handle)
        ref_plain, _ = reference_combine(c.buf.group, y, state, T)
        assert_equal(plain, ref_plain, f"combined without bias (odd ranks dense: {odd_dense})")


def _expect_comm_error(call, words: str, within_s: float | None = None) -> None:
    """`call()` must raise EPCommError naming `words` (within `within_s` seconds, if given)."""
    t0 = time.monotonic()
    try:
        call()
    except EPCommError as e:
        assert words in str(e), e
        assert within_s is None or time.monotonic() - t0 < within_s, f"took {time.monotonic() - t0:.1f} s"
    else:
        raise AssertionError(f"expected EPCommError naming {words!r}")


def check_windows_fall_back_when_unmappable(c: Ctx) -> None:
    """When one rank cannot open its peers' windows (as on another host), every rank agrees: "auto" falls back
    to per-peer sends with the same results, "shm" raises EPCommError on every rank."""
    from seekstack.ep import shared

    E, T, H, x, idx, w, lay = routed_inputs(c)
    want = c.buf.dispatch(x, topk_idx=idx, topk_weights=w, **lay)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "refused")

    real = shared.os.pidfd_open
    if c.rank == c.R - 1:
        shared.os.pidfd_open = refuse
    try:
        auto = Buffer(c.buf.group, timeout_s=60)
        got = auto.dispatch(x, topk_idx=idx, topk_weights=w, **lay)
        assert auto._windows is None and auto.p2p
        for name, a, b in (("recv_x", got[0], want[0]), ("recv_topk_idx", got[1], want[1])):
            assert_equal(a, b, f"fallback {name}")
        strict = Buffer(c.buf.group, timeout_s=60, transport="shm")
        _expect_comm_error(lambda: strict.dispatch(x, **lay), "cannot map")
    finally:
        shared.os.pidfd_open = real
    # A platform without memfd/pidfd: decided locally (every rank on one host sees the same), no collective.
    real_supported = shared.SharedWindows.supported
    shared.SharedWindows.supported = staticmethod(lambda: False)
    try:
        auto = Buffer(c.buf.group, timeout_s=60)
        assert_equal(auto.dispatch(x, topk_idx=idx, topk_weights=w, **lay)[0], want[0], "recv_x without windows")
        _expect_comm_error(lambda: Buffer(c.buf.group, timeout_s=60, transport="shm").dispatch(x, **lay), "memfd")
    finally:
        shared.SharedWindows.supported = real_supported


def check_bad_inputs(c: Ctx) -> None:
    E = num_experts_for(c)
    x, idx, w = make_inputs(c, 9, 128, E, 4)
    lay = layout_of(c, idx, E)
    cases = [
        ("topk_idx", lambda: c.buf.get_dispatch_layout(idx + E, E)),
        ("num_experts", lambda: c.buf.get_dispatch_layout(idx, E + 1)),
        ("is_token_in_rank", lambda: c.buf.dispatch(x, **{**lay, "is_token_in_rank": lay["is_token_in_rank"][:3]})),
        (
            "num_tokens_per_rank",
            lambda: c.buf.dispatch(x, **{**lay, "num_tokens_per_rank": lay["num_tokens_per_rank"] + 1}),
        ),
        ("expert_alignment", lambda: c.buf.dispatch(x, expert_alignment=0, **lay)),
        ("num_worst_tokens", lambda: c.buf.dispatch(x, num_worst_tokens=-1, **lay)),
        ("topk_weights", lambda: c.buf.dispatch(x, topk_idx=idx, topk_weights=w.double(), **lay)),
        ("topk_idx", lambda: c.buf.dispatch(x, topk_idx=idx + E, **lay)),
        ("bias", lambda: c.buf.combine(*c.buf.dispatch(x, **lay)[0:5:4], bias=x[:1])),
        ("x", lambda: c.buf.dispatch(x[0], **lay)),
        ("low_latency_mode", lambda: c.buf.low_latency_dispatch(x, idx, 16, E)),
        ("num_max_dispatch_tokens_per_rank", lambda: c.ll.low_latency_dispatch(x, idx, 4, E)),
        ("new_num_sms", lambda: Buffer.set_num_sms(3)),
        ("num_nvl_bytes", lambda: Buffer(c.buf.group, num_nvl_bytes=-1)),
    ]
    for name, fn in cases:
        try:
            fn()
        except ValueError as e:
            assert name in str(e), f"ValueError for {name} does not name it: {e}"
        else:
            raise AssertionError(f"bad {name} did not raise ValueError")


def check_mismatched_peer(c: Ctx) -> None:
    E = num_experts_for(c)
    H = 128 if c.rank == 0 else 256  # rank 0 disagrees on hidden
    x, idx, _ = make_inputs(c, 11, H, E, 4)
    try:
        c.buf.dispatch(x, **layout_of(c, idx, E))
    except EPCommError as e:
        assert "row bytes" in str(e), e
    else:
        raise AssertionError("mismatched peers must raise EPCommError on every rank")


def check_stuck_peer_times_out(c: Ctx) -> None:
    """A live peer that does not join: the waiting rank raises within the Buffer's timeout (socket transport)."""
    E = num_experts_for(c)
    x, idx, _ = make_inputs(c, 11, 128, E, 4)
    lay = layout_of(c, idx, E)
    if c.rank == 0:
        short = Buffer(c.buf.group, timeout_s=1.0, transport="p2p")
        _expect_comm_error(lambda: short.dispatch(x, **lay), "count exchange", within_s=10)
    else:
        time.sleep(3.0)
        # Every peer finally joins the count exchange rank 0 gave up on, so the group is left in step.
        gather_headers(c.buf.group, torch.zeros(6 + c.R + E, dtype=torch.int64), c.R, None, "late join")
    dist.barrier(group=c.buf.group)


def check_stuck_peer_times_out_shm(c: Ctx) -> None:
    """The same through shared windows: the exchange's barrier times out on the waiting rank."""
    E = num_experts_for(c)
    x, idx, _ = make_inputs(c, 11, 128, E, 4)
    lay = layout_of(c, idx, E)
    short = Buffer(c.buf.group, timeout_s=1.0, transport="shm")
    short.dispatch(x, **lay)  # every rank: sets the windows up
    if c.rank == 0:
        _expect_comm_error(lambda: short.dispatch(x, **lay), "token exchange (shared memory)", within_s=10)
    else:
        time.sleep(3.0)
        short._windows.barrier(None, "late join")  # joins the exchange barrier rank 0 gave up on
    dist.barrier(group=c.buf.group)


def check_compiled_sum_ran(c: Ctx) -> None:
    """With `SEEKSTACK_CPU_COMPILE=always` on CPU (and a C++ compiler), the combines above took the compiled sums
    (normal and low-latency)."""
    from seekstack import cpu_compile
    from seekstack.ep import fused_sum

    if cpu_compile.mode() == "always" and c.dev.type == "cpu" and (shutil.which("c++") or shutil.which("g++")):
        ran = (fused_sum.SUM.calls, fused_sum.WEIGHTED.calls)
        assert min(ran) > 0, f"compiled (normal, low-latency) sums run: {ran}"


CHECKS = [name for name in list(globals()) if name.startswith("check_")]
LAST_ONLY_2_RANKS = ["check_stuck_peer_times_out", "check_stuck_peer_times_out_shm"]
# Peers that disagree or stall: gloo's error paths; NCCL reports those through its own watchdog.
GLOO_ONLY = ["check_mismatched_peer", *LAST_ONLY_2_RANKS]
SHM_ONLY = ["check_stuck_peer_times_out_shm", "check_windows_fall_back_when_unmappable"]


def run_checks(
    rank: int, world_size: int, seed: int, names: list[str], transport: str = "auto"
) -> dict[str, tuple[bool, str]]:
    """Run the named checks; on an NCCL group the tensors live on this rank's current CUDA device."""
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    nccl = dist.get_backend() == "nccl"
    dev = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    buf = Buffer(timeout_s=60, transport=transport)
    c = Ctx(rank, world_size, gen, buf, Buffer(low_latency_mode=True, timeout_s=60, transport=transport), dev)
    results: dict[str, tuple[bool, str]] = {}
    for name in names:
        try:
            globals()[name](c)
            results[name] = (True, "")
        except Exception:
            results[name] = (False, traceback.format_exc())
    return results


def dead_peer(rank: int, world_size: int, seed: int, transport: str = "p2p") -> dict[str, object]:
    """Rank 1 exits in the middle of a dispatch (p2p: after the count exchange; shm: after the windows are set up
    and used once): rank 0 must get an error, not a hang."""
    import os

    c = Ctx(rank, world_size, torch.Generator().manual_seed(seed), Buffer(timeout_s=20, transport=transport), None)
    E = num_experts_for(c)
    x, idx, _ = make_inputs(c, 13, 128, E, 4)
    lay = layout_of(c, idx, E)
    if transport == "shm":
        c.buf.dispatch(x, **lay)
        if rank == 1:
            os._exit(0)
    elif rank == 1:
        header = torch.cat(
            [
                torch.tensor([0x45505F31, 1, 2 * 128 + 4, 0, 1, E]),
                lay["num_tokens_per_rank"].long(),
                lay["num_tokens_per_expert"].long(),
            ]
        )
        gather_headers(c.buf.group, header, world_size, None, "count exchange")
        os._exit(0)  # dies mid-dispatch, before the token exchange
    t0 = time.monotonic()
    try:
        c.buf.dispatch(x, **lay)
    except EPCommError as e:
        return {"error": str(e), "seconds": time.monotonic() - t0}
    return {"error": None, "seconds": time.monotonic() - t0}
