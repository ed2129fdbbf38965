"""Single-process pieces: layout, fp8 casting, packing, config and events (no process group needed)."""

from __future__ import annotations

import pytest
import torch

from seekstack.ep import Config, EventOverlap, compute_dispatch_layout, per_token_cast_back, per_token_cast_to_fp8
from seekstack.ep.fp8 import pack_ue8m0
from seekstack.ep.reduce import sum_bags, tile_bounds
from seekstack.ep.transport import split_offsets


def test_layout_matches_loops(seed):
    T, E, R, K = 37, 24, 4, 5
    idx = torch.topk(torch.rand(T, E), K, dim=1).indices
    idx[torch.rand(T, K) < 0.2] = -1
    per_rank, per_rdma, per_expert, in_rank = compute_dispatch_layout(idx, E, R)
    want_rank = torch.zeros(T, R, dtype=torch.bool)
    want_expert = torch.zeros(E, dtype=torch.int32)
    for t in range(T):
        for e in idx[t].tolist():
            if e >= 0:
                want_rank[t, e // (E // R)] = True
                want_expert[e] += 1
    assert torch.equal(in_rank, want_rank) and torch.equal(per_expert, want_expert)
    assert torch.equal(per_rank, want_rank.sum(0).int()) and per_rdma is None


def test_layout_rdma_ranks():
    idx = torch.tensor([[0, 17], [31, -1]])
    per_rank, per_rdma, _, _ = compute_dispatch_layout(idx, 32, 16)
    assert per_rdma.tolist() == [1, 2] and per_rank.sum() == 3


@pytest.mark.parametrize("bad", [torch.tensor([[0, 9]]), torch.tensor([0, 1]), torch.tensor([[0.0, 1.0]])])
def test_layout_rejects_bad_topk_idx(bad):
    with pytest.raises(ValueError, match="topk_idx"):
        compute_dispatch_layout(bad, 8, 2)


def test_fp8_roundtrip_and_ue8m0(seed):
    x = torch.randn(7, 512, dtype=torch.bfloat16) * 5
    q, s = per_token_cast_to_fp8(x)
    back = per_token_cast_back(q, s)
    assert (back - x.float()).abs().max() <= x.float().abs().max() / 448 * 32  # within fp8 e4m3 spacing
    _, p2 = per_token_cast_to_fp8(x, round_scale=True)
    assert torch.equal(torch.exp2(torch.log2(p2).round()), p2)
    packed = pack_ue8m0(p2)
    assert packed.shape == (7, 1) and packed.dtype == torch.int32
    with pytest.raises(ValueError, match="hidden"):
        per_token_cast_to_fp8(torch.randn(2, 100))


def test_sum_bags_is_a_left_to_right_fp32_sum(seed):
    # Sums of a few bf16 values land exactly halfway between two bf16 numbers often; magnitudes 2^±12 apart make
    # fp32 absorb small terms, so any other order or rounding (e.g. a bf16 kernel rounding ties away from zero)
    # shows up here.
    n_tok, hidden = 300, 64
    counts = torch.randint(0, 5, (n_tok,))
    rows = (torch.randn(int(counts.sum()) + 3, hidden) * torch.exp2(torch.randint(-12, 12, (1, hidden)))).bfloat16()
    rows[-3:] = float("nan")  # rows no bag points at must not matter
    rows[::7, ::5] = -0.0
    perm = torch.randperm(rows.shape[0] - 3)
    offsets = torch.tensor(split_offsets(counts.tolist())[:-1])
    got = sum_bags(rows.float(), perm, offsets)
    want = torch.zeros(n_tok, hidden)
    for t, (o, c) in enumerate(zip(offsets.tolist(), counts.tolist(), strict=True)):
        for i in perm[o : o + c].tolist():
            want[t] += rows[i].float()
    assert torch.equal(got, want)
    assert torch.equal(got.bfloat16().view(torch.int16), want.bfloat16().view(torch.int16))
    empty = sum_bags(torch.empty(0, hidden), torch.empty(0, dtype=torch.int64), torch.zeros(4, dtype=torch.int64))
    assert torch.equal(empty, torch.zeros(4, hidden))


def test_tile_bounds_cover_every_token_once():
    cpu, many = torch.device("cpu"), 100_000
    for tokens, rows, hidden in [(0, 0, 128), (1, 4, 128), (1024, 3700, 2048), (4096, 15000, 7168), (7, 70, 64)]:
        bounds = tile_bounds(tokens, rows, hidden, cpu)
        assert bounds[0] == 0 and bounds[-1] == tokens and len(bounds) >= 2  # no tokens: one empty tile
        assert all(a < b for a, b in zip(bounds, bounds[1:], strict=False)) or tokens == 0
        assert len(bounds) - 1 <= 64
    assert tile_bounds(many, 4 * many, 7168, torch.device("meta")) == [0, many]  # one tile off the CPU


def test_split_offsets():
    assert split_offsets([3, 0, 2]) == [0, 3, 3, 5] and split_offsets([]) == [0]


def test_config_validation():
    assert Config(24).get_rdma_buffer_size_hint(7168 * 2, 8) == 0
    assert Config(24).get_rdma_buffer_size_hint(7168 * 2, 16) > 0
    with pytest.raises(ValueError, match="num_sms"):
        Config(3)
    with pytest.raises(ValueError, match="num_max_nvl_chunked_recv_tokens"):
        Config(20, 6, 0)


def test_event_runs_finisher_once():
    calls = []
    ev = EventOverlap(finish=lambda: calls.append(1))
    assert not ev.is_completed()
    with ev:
        pass
    ev.current_stream_wait()
    assert calls == [1] and ev.is_completed()
