"""Sparse decoding: each query token attends to its own top-k cache slots (block_id * block_size + offset, -1 = skip),
as FlashMLA's `indices` define them; block_table and cache_seqlens are then ignored."""

from __future__ import annotations

import math

import pytest
import torch

from seekstack.mla import flash_mla_with_kvcache
from seekstack.mla.testing import check_decode, make_case


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("block_size", [1, 16, 64])
@pytest.mark.parametrize("s_q,h_q,h_kv", [(1, 16, 1), (2, 128, 1), (3, 16, 2)])
def test_sparse_matches_reference(gen, fp8, block_size, s_q, h_q, h_kv):
    case = make_case(4, s_q, h_q, h_kv, 300, block_size=block_size, fp8=fp8, topk=128, varlen=True, zero_lengths=1,
                     generator=gen)  # fmt: skip
    got = flash_mla_with_kvcache(*case.args(), **case.kwargs(), backend="cpu")
    check_decode(*got, *flash_mla_with_kvcache(*case.args(), **case.kwargs(), backend="reference"))


def test_sparse_over_every_position_equals_dense(gen):
    """Indices listing every cached token (padded with -1, in any order) give the dense, non-causal result."""
    case = make_case(3, 2, 16, 1, 100, block_size=16, varlen=True, generator=gen)
    page = 16
    topk = max(256, int(case.cache_seqlens.max()) + 8)  # varlen lengths can exceed 256 (seen in CI: 267)
    indices = torch.full((3, 2, topk), -1, dtype=torch.int32)
    for i in range(3):
        n = int(case.cache_seqlens[i])
        pos = torch.arange(n)
        slots = case.block_table[i, pos // page] * page + pos % page
        for s in range(2):
            indices[i, s, torch.randperm(topk, generator=gen)[:n]] = slots.to(torch.int32)
    dense = flash_mla_with_kvcache(*case.args())
    sparse = flash_mla_with_kvcache(case.q, case.k_cache, None, None, 512, indices=indices)
    check_decode(*sparse, *dense)


def test_all_invalid_indices_give_zero_and_inf(gen):
    case = make_case(2, 2, 16, 1, 100, topk=32, generator=gen)
    case.indices[1] = -1
    out, lse = flash_mla_with_kvcache(*case.args(), **case.kwargs())
    assert torch.all(out[1] == 0) and torch.all(lse[1] == math.inf)
    assert torch.all(lse[0].isfinite())
    check_decode(out, lse, *flash_mla_with_kvcache(*case.args(), **case.kwargs(), backend="reference"))


def test_long_topk_is_chunked(gen):
    from seekstack.mla import cpu as cpu_path
    from seekstack.mla.interface import validate

    case = make_case(2, 2, 16, 1, 3000, topk=2048, generator=gen)
    p = validate(*case.args(), None, **case.kwargs())
    got = cpu_path.mla_decode_cpu(p, tokens_per_step=300)
    check_decode(*got, *flash_mla_with_kvcache(*case.args(), **case.kwargs(), backend="reference"))
