"""Single-process pieces: layout, fp8 casting, packing, config and events (no process group needed)."""

from __future__ import annotations

import pytest
import torch

from seekstack.ep import Config, EventOverlap, compute_dispatch_layout, per_token_cast_back, per_token_cast_to_fp8
from seekstack.ep.fp8 import pack_ue8m0
from seekstack.ep.transport import pack_rows, unpack_field


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


def test_pack_unpack_nan_poisoned_rows(seed):
    x = torch.randn(9, 6, dtype=torch.bfloat16)
    x[2] = float("nan")
    ids = torch.arange(9 * 3).view(9, 3)
    order = torch.tensor([8, 0, 2])
    rows = pack_rows([x, ids], order)
    assert rows.shape == (3, 6 * 2 + 3 * 8)
    got_x = unpack_field(rows, 0, (6,), torch.bfloat16)
    got_ids = unpack_field(rows, 12, (3,), torch.int64)
    assert torch.equal(got_x.view(torch.int16), x[order].view(torch.int16)) and torch.equal(got_ids, ids[order])


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
