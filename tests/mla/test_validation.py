"""Bad inputs raise ValueError naming the argument."""

from __future__ import annotations

import pytest
import torch

from seekstack.mla import flash_mla_with_kvcache, get_mla_metadata
from seekstack.mla.testing import make_case


@pytest.fixture
def case(gen):
    return make_case(2, 2, 16, 2, 100, block_size=16, generator=gen)


def call(case, **over):
    args = dict(q=case.q, k_cache=case.k_cache, block_table=case.block_table, cache_seqlens=case.cache_seqlens,
                head_dim_v=512)  # fmt: skip
    args.update(over)
    return flash_mla_with_kvcache(**args)


@pytest.mark.parametrize(
    "change,name",
    [
        (lambda c: dict(q=c.q[0]), "q"),
        (lambda c: dict(q=c.q.to(torch.int32)), "q"),
        (lambda c: dict(k_cache=c.k_cache.half()), "k_cache"),
        (lambda c: dict(k_cache=c.k_cache[..., :500]), "k_cache"),
        (lambda c: dict(k_cache=c.k_cache.to("meta")), "k_cache"),
        (lambda c: dict(block_table=c.block_table.long()), "block_table"),
        (lambda c: dict(block_table=c.block_table[:1]), "block_table"),
        (lambda c: dict(block_table=c.block_table.to("meta")), "block_table"),
        (lambda c: dict(cache_seqlens=c.cache_seqlens.long()), "cache_seqlens"),
        (lambda c: dict(cache_seqlens=c.cache_seqlens[:1]), "cache_seqlens"),
        (lambda c: dict(cache_seqlens=c.cache_seqlens * 0 - 1), "cache_seqlens"),
        (lambda c: dict(cache_seqlens=c.cache_seqlens + 10_000), "cache_seqlens"),
        (lambda c: dict(head_dim_v=577), "head_dim_v"),
        (lambda c: dict(head_dim_v=0), "head_dim_v"),
        (lambda c: dict(q=c.q[:, :, :3]), "h_q"),
        (lambda c: dict(softmax_scale=float("nan")), "softmax_scale"),
        (lambda c: dict(is_fp8_kvcache=True), "k_cache"),
        (lambda c: dict(indices=torch.zeros(2, 2, 8, dtype=torch.int64)), "indices"),
        (lambda c: dict(indices=torch.zeros(2, 3, 8, dtype=torch.int32)), "indices"),
        (lambda c: dict(indices=torch.full((2, 2, 8), 10**6, dtype=torch.int32)), "indices"),
        (lambda c: dict(indices=torch.full((2, 2, 8), -2, dtype=torch.int32)), "indices"),
        (lambda c: dict(indices=torch.zeros(2, 2, 8, dtype=torch.int32), causal=True), "causal"),
        (lambda c: dict(backend="cuda"), "backend"),
    ],
)
def test_bad_argument_is_named(case, change, name):
    with pytest.raises(ValueError, match=name):
        call(case, **change(case))


def test_block_id_out_of_range(case):
    table = case.block_table.clone()
    table[1, 0] = case.k_cache.shape[0]
    with pytest.raises(ValueError, match="block_table"):
        call(case, block_table=table)
    table[1, 0] = -1
    with pytest.raises(ValueError, match="block_table"):
        call(case, block_table=table)


def test_unused_block_table_entries_are_not_checked(case):
    """FlashMLA's tests fill unused entries with 2147480000; only entries covering cached tokens must be valid."""
    assert (case.block_table == 2147480000).any()
    call(case)


def test_empty_batch(case):
    out, lse = call(case, q=case.q[:0], block_table=case.block_table[:0], cache_seqlens=case.cache_seqlens[:0])
    assert out.shape == (0, 2, 16, 512) and lse.shape == (0, 16, 2)


@pytest.mark.parametrize(
    "meta,splits,name",
    [
        (lambda m, s: m.long(), lambda m, s: s, "tile_scheduler_metadata"),
        (lambda m, s: m[:, :4], lambda m, s: s, "tile_scheduler_metadata"),
        (lambda m, s: m, lambda m, s: s[:-1], "num_splits"),
        (lambda m, s: m, lambda m, s: s.long(), "num_splits"),
    ],
)
def test_bad_plan_is_named(case, meta, splits, name):
    pytest.importorskip("triton")
    m, s = get_mla_metadata(case.cache_seqlens, 2 * 16 // 2, 2)
    with pytest.raises(ValueError, match=name):
        flash_mla_with_kvcache(*case.args(), meta(m, s), splits(m, s), backend="triton")


def test_value_checks_can_be_skipped(case):
    """check_values=False drops only the checks that read tensor values (a host sync on a GPU)."""
    table = case.block_table.clone()
    table[1, 0] = 10**6
    with pytest.raises(ValueError, match="block_table"):
        call(case, block_table=table)
    with pytest.raises(ValueError, match="k_cache"):
        call(case, k_cache=case.k_cache.half(), check_values=False)
    good = call(case, check_values=False)
    torch.testing.assert_close(good[0], call(case)[0])
