"""The split-KV plan: FlashMLA's scheduler, every token assigned once, pieces numbered by num_splits."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seekstack.mla import get_mla_metadata
from seekstack.mla.metadata import (
    BLOCK_SIZE_N,
    FIXED_OVERHEAD_NUM_BLOCKS,
    num_sm_parts_for,
    plan_segments,
    plan_splits,
)


def check_plan(seqlens: list[int], parts: int) -> None:
    rows, num_splits = plan_splits(seqlens, parts)
    assert len(rows) == parts and len(num_splits) == len(seqlens) + 1 and num_splits[0] == 0
    meta = torch.tensor(rows, dtype=torch.int32)
    pieces = plan_segments(meta, torch.tensor(num_splits, dtype=torch.int32), seqlens)
    seen: dict[int, list[tuple[int, int, int]]] = {}
    payload = -(-(sum(-(-n // BLOCK_SIZE_N) for n in seqlens) + FIXED_OVERHEAD_NUM_BLOCKS * len(seqlens)) // parts)
    for worker in pieces:
        load = 0
        for r, start, stop, split in worker:
            assert 0 <= start <= stop <= seqlens[r]
            seen.setdefault(r, []).append((start, stop, split))
            load += -(-(stop - start) // BLOCK_SIZE_N) + FIXED_OVERHEAD_NUM_BLOCKS
        assert load <= payload + 2 * FIXED_OVERHEAD_NUM_BLOCKS  # balanced to within the fixed overhead
    for r, n in enumerate(seqlens):
        got = sorted(seen[r])
        assert got[0][0] == 0 and got[-1][1] == n, (r, got)
        assert all(a[1] == b[0] for a, b in zip(got, got[1:])), "pieces must tile the request without gaps"
        assert [s for *_, s in got] == list(range(num_splits[r], num_splits[r + 1]))
        assert all(start < stop for start, stop, _ in got) or n == 0  # no empty piece in a non-empty request


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5000), min_size=1, max_size=40), st.integers(1, 140))
def test_plan_assigns_every_token_exactly_once(seqlens, parts):
    check_plan(seqlens, parts)


def test_known_plan():
    meta, splits = get_mla_metadata(torch.tensor([100, 700, 30], dtype=torch.int32), 16, 1, num_sms=4)
    assert splits.tolist() == [0, 1, 4, 5]
    assert meta.dtype == torch.int32 and meta.shape == (4, 8)
    assert meta[:, :5].tolist() == [[0, 0, 1, 64, 0], [1, 64, 1, 576, 1], [1, 576, 2, 30, 2], [3, 0, 2, 30, 0]]


def test_worker_count_follows_flashmla():
    assert num_sm_parts_for(132, 128, 1) == 66  # h_q = 128, s_q = 1 on an H800: 66 parts
    assert num_sm_parts_for(132, 16, 1) == 132
    assert num_sm_parts_for(132, 256, 1) == 33
    assert num_sm_parts_for(132, 8, 2) == 66
    assert num_sm_parts_for(2, 512, 4) == 1


def test_cpu_default_uses_torch_threads():
    meta, _ = get_mla_metadata(torch.tensor([10], dtype=torch.int32), 16, 1)
    assert meta.shape[0] == max(torch.get_num_threads(), 1)


def test_sparse_plan_has_one_request_per_query_token():
    meta, splits = get_mla_metadata(torch.zeros(3, dtype=torch.int32), 2 * 64, 1, num_heads_q=64, topk=2048, num_sms=16)
    assert splits.shape == (3 * 2 + 1,)
    check_plan([2048] * 6, meta.shape[0])


def test_bad_arguments():
    with pytest.raises(ValueError, match="cache_seqlens"):
        get_mla_metadata(torch.tensor([1, 2]), 16, 1)  # int64
    with pytest.raises(ValueError, match="cache_seqlens"):
        get_mla_metadata(torch.tensor([1, -2], dtype=torch.int32), 16, 1)
    with pytest.raises(ValueError, match="num_heads_q"):
        get_mla_metadata(torch.tensor([1], dtype=torch.int32), 16, 1, topk=64)
