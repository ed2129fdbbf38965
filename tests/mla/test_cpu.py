"""The CPU path against the reference, with FlashMLA's recipe: permuted block tables, NaN in every unused slot and
block, varlen and zero-length requests, s_q in {1, 2, 4}, causal on and off, h_q in {1, 16, 128} over h_kv in {1, 2},
block sizes {1, 16, 64}, and FlashMLA's tolerances (out: abs 8e-4 or rel 2.01/128, cos diff 5e-6; lse: abs 1e-6
or rel 8.01/65536)."""

from __future__ import annotations

import pytest
import torch

from seekstack.mla import cpu as cpu_path
from seekstack.mla import flash_mla_with_kvcache
from seekstack.mla.interface import validate
from seekstack.mla.testing import RECIPE, check_decode, make_case, recipe_case


def run_both(case, tokens_per_step=cpu_path.DEFAULT_TOKENS_PER_STEP, **kwargs):
    kwargs = {**case.kwargs(), **kwargs}
    ref = flash_mla_with_kvcache(*case.args(), **kwargs, backend="reference")
    p = validate(*case.args(), kwargs.pop("softmax_scale", None), **kwargs)
    got = cpu_path.mla_decode_cpu(p, tokens_per_step, native=False)  # the PyTorch steps (test_native: the C kernel)
    check_decode(*got, *ref)
    return got, ref


@pytest.mark.parametrize("s_q,causal,h_q,h_kv,block_size", RECIPE)
def test_recipe(gen, s_q, causal, h_q, h_kv, block_size):
    run_both(recipe_case(gen, s_q, causal, h_q, h_kv, block_size))


@pytest.mark.parametrize("tokens_per_step", [7, 48, 64, 200])
@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_requests_longer_than_a_step_are_merged_exactly(gen, tokens_per_step, block_size):
    case = make_case(5, 2, 16, 1, 300, block_size=block_size, varlen=True, zero_lengths=1, causal=True, generator=gen)
    run_both(case, tokens_per_step)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes(gen, dtype):
    case = make_case(3, 2, 16, 1, 200, dtype=dtype, varlen=True, causal=True, generator=gen)
    (out, lse), _ = run_both(case)
    assert out.dtype == dtype and lse.dtype == torch.float32


@pytest.mark.parametrize("d,dv", [(576, 512), (320, 256), (192, 128), (128, 128), (96, 40)])
def test_head_dims(gen, d, dv):
    case = make_case(3, 2, 16, 2, 130, d=d, dv=dv, block_size=16, varlen=True, causal=True, generator=gen)
    (out, _), _ = run_both(case)
    assert out.shape == (3, 2, 16, dv)


@pytest.mark.parametrize("block_size", [3, 61, 128])
def test_odd_block_sizes(gen, block_size):
    case = make_case(3, 3, 9, 3, 150, block_size=block_size, varlen=True, causal=True, generator=gen)
    run_both(case, tokens_per_step=100)


@pytest.mark.parametrize(
    "s_q,s_k,block_size,tokens_per_step",
    [(3, 184, 61, 61), (4, 50, 1, 7), (4, 50, 16, 16), (2, 129, 64, 64)],
)
def test_causal_tail_across_chunks(gen, s_q, s_k, block_size, tokens_per_step):
    """A long request's last s_q - 1 keys (hidden from its earlier query tokens) split over two chunks: each chunk
    masks its own part of that tail (chunks of 61 put 182 and 183 of 184 keys in different chunks)."""
    case = make_case(2, s_q, 16, 1, s_k, block_size=block_size, causal=True, generator=gen)
    run_both(case, tokens_per_step)


def test_flashmla_corner_case(gen):
    """FlashMLA's corner grid, b = 128, s_q = 2, varlen, some lengths 0; s_k = 512, not 4096, on CPU: the recipe
    allocates b * max_len tokens of NaN-poisoned cache (2.6 GB of fp32 at 4096). test_gpu.py runs 4096."""
    case = make_case(128, 2, 16, 1, 512, varlen=True, zero_lengths=9, causal=True, generator=gen)
    run_both(case)


def test_long_request_h128(gen):
    case = make_case(2, 1, 128, 1, 4096, generator=gen)
    run_both(case)


def test_softmax_scale(gen):
    case = make_case(2, 2, 16, 1, 100, varlen=True, causal=True, generator=gen)
    run_both(case, softmax_scale=0.1)


def test_default_backend_on_cpu_is_the_cpu_path(gen):
    case = make_case(2, 1, 16, 1, 100, generator=gen)
    auto = flash_mla_with_kvcache(*case.args(), **case.kwargs())
    explicit = flash_mla_with_kvcache(*case.args(), **case.kwargs(), backend="cpu")
    assert torch.equal(auto[0], explicit[0]) and torch.equal(auto[1], explicit[1])


def test_non_contiguous_cache(gen):
    """FlashMLA's FP8 helper leaves a padded block stride ([nb, bs + 1, ...][:, :bs]); any strided cache works."""
    case = make_case(3, 2, 16, 1, 150, block_size=16, varlen=True, causal=True, generator=gen)
    padded = torch.full((case.k_cache.shape[0], 17, 1, 576), float("nan"), dtype=case.k_cache.dtype)
    padded[:, :16] = case.k_cache
    case.k_cache = padded[:, :16]
    run_both(case)


def test_memory_is_bounded_by_the_step(gen):
    """However long the batch, the gathered keys never exceed one step of tokens."""
    step = 256
    cpu_path.clear_workspace()  # earlier tests grew it
    case = make_case(6, 1, 16, 1, 2000, varlen=True, generator=gen)
    run_both(case, tokens_per_step=step)
    sizes = cpu_path.workspace_sizes()  # per thread (the lanes each have their own)
    assert sizes["keys"] <= step * 576 and sizes["rows"] <= step * 576
    assert sizes["scores"] <= step * 16 and sizes["probs"] <= step * 16  # [tokens, rows] of one step
    assert int(case.cache_seqlens.sum()) > 10 * step


def test_short_requests_with_big_pages_stay_within_the_step(gen):
    """Dense groups gather whole pages: 200 one-token requests on 64-token pages must not gather 200 pages."""
    cpu_path.clear_workspace()
    case = make_case(200, 1, 16, 1, 1, block_size=64, generator=gen)
    run_both(case, tokens_per_step=256)
    assert 0 < cpu_path.workspace_sizes()["rows"] <= 256 * 576


def _contiguous(case):
    """The same problem with each request's blocks laid out one after another in the cache (block table = arange),
    unused blocks still NaN: how an engine that allocates pages in runs leaves them."""
    bt = case.block_table.long()
    b, per_seq = bt.shape
    page = case.k_cache.shape[1]
    cache = torch.full((b * per_seq, *case.k_cache.shape[1:]), float("nan"), dtype=case.k_cache.dtype)
    for i in range(b):
        used = -(-int(case.cache_seqlens[i]) // page)
        cache[i * per_seq : i * per_seq + used] = case.k_cache[bt[i, :used]]
    case.k_cache = cache
    case.block_table = torch.arange(b * per_seq, dtype=torch.int32).view(b, per_seq)
    return case


@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_contiguous_pages_are_read_in_place(gen, block_size):
    """Chunks whose pages are consecutive in the cache are read with no gather (no "rows" buffer is ever used)."""
    case = _contiguous(make_case(3, 2, 16, 1, 300, block_size=block_size, causal=True, generator=gen))
    cpu_path.clear_workspace()
    (out, _), _ = run_both(case, tokens_per_step=128)  # every request spans several steps: one request per step
    assert not out.isnan().any()
    names = set(cpu_path.workspace_sizes())
    assert "keys" in names and "rows" not in names


def test_some_contiguous_runs(gen):
    """A table mixing runs and scattered pages: runs are read in place, the rest gathered, the result the same."""
    case = _contiguous(make_case(4, 1, 16, 2, 400, block_size=16, varlen=True, zero_lengths=1, generator=gen))
    case.block_table[1] = case.block_table[1].flip(0)  # request 1: pages in reverse, no longer a run
    case.k_cache[case.block_table[1].long()] = case.k_cache[case.block_table[1].flip(0).long()].clone()
    (out, _), _ = run_both(case, tokens_per_step=96)
    assert not out.isnan().any()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("s_q", [1, 2])
def test_many_short_requests_share_a_step(gen, s_q, causal):
    """More than ITEM_LOOP_MAX requests in one step: padding and masks are vectorised, results scattered at once."""
    case = make_case(80, s_q, 16, 1, 12, block_size=1, varlen=True, zero_lengths=3, causal=causal, generator=gen)
    p = validate(*case.args(), None, **case.kwargs())
    plan = cpu_path._Decode(p, cpu_path.DEFAULT_TOKENS_PER_STEP).plan
    assert max(grp.r1 - grp.r0 for grp in plan.groups) > cpu_path.ITEM_LOOP_MAX
    assert any(min(grp.lens) < grp.length for grp in plan.groups)  # some padding to mask
    run_both(case)


@pytest.mark.parametrize("rows", [1, 3, 16, 20, 32, 64])
@pytest.mark.parametrize("keys", [1, 5, 64, 67])
def test_max_over_keys(rows, keys):
    scores = torch.randn(3, 2, keys + 5, rows)[:, :, :keys]  # a slice, as the step buffers are
    assert torch.equal(cpu_path._max_over_keys(scores), scores.amax(dim=-2, keepdim=True))


def test_lanes_keep_a_long_request_in_order_and_match_one_thread(gen):
    """Lanes (one torch thread each) and the single-thread path give the same result within the reference's
    tolerances; a long request's chunks stay in one unit, in order."""
    case = make_case(8, 2, 128, 1, 400, block_size=16, zero_lengths=1, causal=True, generator=gen)  # ~8 ms of work
    p = validate(*case.args(), None, **case.kwargs())
    run = cpu_path._Decode(p, 128)
    units = cpu_path._lane_units(run.plan, p.rows)
    assert len(units) >= 2 and sorted(n for u in units for n in u) == list(range(len(run.plan.groups)))
    for unit in units:
        assert unit == sorted(unit) and len({run.plan.groups[n].r0 for n in unit}) == 1
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = run_both(case, tokens_per_step=128)
    finally:
        torch.set_num_threads(threads)
    lanes, _ = run_both(case, tokens_per_step=128)
    assert torch.get_num_threads() == threads
    check_decode(*lanes, *one)


def test_one_dominant_request_runs_without_lanes():
    plan = cpu_path.make_plan([4000, 10, 10], step=512, page=1)
    assert cpu_path._lane_units(plan, 128) == []
