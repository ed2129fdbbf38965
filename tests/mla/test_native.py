"""The CPU path's C kernel (`seekstack.mla.native`) against the fp32 reference with FlashMLA's recipe and tolerances
(the same grid as test_cpu.py's PyTorch steps): permuted block tables, NaN in unused slots and blocks, varlen and
zero-length requests, s_q in {1, 2, 4}, causal on and off, h_q in {1, 16, 128} over h_kv in {1, 2}, block sizes
{1, 16, 64}; plus fp16 / fp32, FP8 caches, sparse slot lists, other head dims, rows that see no key, thread
counts, and the cases it hands back."""

from __future__ import annotations

import pytest
import torch

from seekstack.mla import cpu as cpu_path
from seekstack.mla import flash_mla_with_kvcache, native
from seekstack.mla.interface import validate
from seekstack.mla.testing import RECIPE, check_decode, make_case, recipe_case

pytestmark = pytest.mark.skipif(not native.available(), reason="needs a C compiler and AVX-512")


def _problem(case, **kwargs):
    kwargs = {**case.kwargs(), **kwargs}
    return validate(*case.args(), kwargs.pop("softmax_scale", None), **kwargs)


def run_native(case, split_keys=0, rows_in_lanes=None, **kwargs):
    ref = flash_mla_with_kvcache(*case.args(), **{**case.kwargs(), **kwargs}, backend="reference")
    got = native.decode(_problem(case, **kwargs), split_keys, rows_in_lanes)
    assert got is not None, "the C kernel should take this case"
    check_decode(*got, *ref)
    return got, ref


@pytest.mark.parametrize("s_q,causal,h_q,h_kv,block_size", RECIPE)
def test_recipe(gen, s_q, causal, h_q, h_kv, block_size):
    run_native(recipe_case(gen, s_q, causal, h_q, h_kv, block_size))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("s_q,causal,h_q,h_kv,block_size", RECIPE[::3])
def test_recipe_fp16_and_fp32(gen, dtype, s_q, causal, h_q, h_kv, block_size):
    case = make_case(4, s_q, h_q, h_kv, 140, block_size=block_size, varlen=True, zero_lengths=1, causal=causal,
                     dtype=dtype, generator=gen)  # fmt: skip
    (out, _), _ = run_native(case)
    assert out.dtype == dtype


@pytest.mark.parametrize("block_size", [1, 64])
@pytest.mark.parametrize("h_q,h_kv", [(16, 1), (128, 2)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("s_q", [1, 2])
def test_fp8_cache(gen, s_q, causal, h_q, h_kv, block_size):
    # DeepSeek-V3.2's 656-byte layout (e4m3 NoPE, fp32 tile scales, bf16 RoPE), NaN in unused slots; the reference
    # decodes the same bytes.
    case = make_case(4, s_q, h_q, h_kv, 140, block_size=block_size, varlen=True, zero_lengths=1, causal=causal,
                     fp8=True, generator=gen)  # fmt: skip
    run_native(case)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("block_size,topk", [(1, 16), (64, 40), (16, 128)])
@pytest.mark.parametrize("h_q,h_kv", [(16, 1), (128, 2), (1, 1)])
@pytest.mark.parametrize("s_q", [1, 2])
def test_sparse(gen, s_q, h_q, h_kv, block_size, topk, fp8):
    # Each query position attends its own slot list, -1 entries anywhere (and NaN in unused cache slots).
    case = make_case(3, s_q, h_q, h_kv, 300, block_size=block_size, topk=topk, fp8=fp8, generator=gen)
    run_native(case)


@pytest.mark.parametrize("fp8", [False, True])
def test_sparse_split_into_pieces(gen, fp8):
    case = make_case(2, 2, 128, 2, 300, block_size=16, topk=100, fp8=fp8, generator=gen)
    run_native(case, split_keys=16)


def test_sparse_all_skipped(gen):
    case = make_case(2, 2, 16, 1, 100, topk=24, generator=gen)
    case.indices[1, 0] = -1  # this query position sees no key: out = 0, lse = +inf
    (out, lse), _ = run_native(case)
    assert torch.isinf(lse[1, :, 0]).all() and not out[1, 0].any() and torch.isfinite(lse[1, :, 1]).all()


def test_fp8_cache_other_head_dims(gen):
    case = make_case(3, 1, 16, 1, 200, d=320, dv=256, fp8=True, varlen=True, generator=gen)
    run_native(case)


@pytest.mark.parametrize("d,dv", [(576, 512), (320, 256), (96, 64), (128, 128)])
def test_other_head_dims_and_a_softmax_scale(gen, d, dv):
    case = make_case(3, 2, 16, 1, 300, d=d, dv=dv, block_size=16, varlen=True, causal=True, generator=gen)
    run_native(case, softmax_scale=0.3)


def test_long_requests_over_many_tiles_and_pages(gen):
    # 1000-3000 keys: many 16-key tiles, tiles straddling pages of 7 (not a power of two), prefetch past the end.
    case = make_case(3, 1, 16, 1, 2000, block_size=7, varlen=True, generator=gen)
    run_native(case)


def test_rows_that_see_no_key(gen):
    # Causal with lengths below s_q: the first query positions see no key (out = 0, lse = +inf), as do zero-length
    # requests.
    case = make_case(4, 4, 16, 1, 8, block_size=16, causal=True, generator=gen)
    case.cache_seqlens.copy_(torch.tensor([0, 1, 2, 3], dtype=torch.int32))
    (out, lse), _ = run_native(case)
    assert torch.isinf(lse[0]).all() and not out[0].any()
    assert torch.isinf(lse[1, :, :3]).all() and torch.isfinite(lse[1, :, 3]).all()


def test_a_strided_block_table(gen):
    case = make_case(3, 2, 16, 1, 200, block_size=16, varlen=True, generator=gen)
    wide = torch.full((3, case.block_table.shape[1] + 5), -7, dtype=torch.int32)
    wide[:, : case.block_table.shape[1]] = case.block_table
    case.block_table = wide[:, : case.block_table.shape[1]]
    assert not case.block_table.is_contiguous()
    run_native(case)


# s_q, h_q, h_kv: 1-16 rows per item
ROW_SHAPES = [(1, 16, 1), (1, 9, 1), (2, 8, 1), (4, 4, 1), (3, 5, 1), (2, 16, 2), (1, 1, 1)]


@pytest.mark.parametrize("s_q,h_q,h_kv", ROW_SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_rows_in_lanes_and_in_blocks(gen, s_q, h_q, h_kv, causal):
    # Items of at most 16 rows run with the rows in one vector's lanes (by default from 13 rows) or in 4 x 4 blocks:
    # both paths on the same problems, whole and split into pieces, with per-row causal limits (s_q > 1), unused
    # lanes (< 16 rows), tails of tiles and a zero-length request.
    case = make_case(4, s_q, h_q, h_kv, 150, block_size=16, varlen=True, zero_lengths=1, causal=causal,
                     generator=gen)  # fmt: skip
    results = {}
    for lanes in (True, False):
        for split_keys in (0, 32):
            results[lanes, split_keys], _ = run_native(case, split_keys, rows_in_lanes=lanes)
    # the two paths sum in different orders: close, not equal
    torch.testing.assert_close(results[True, 0][1], results[False, 0][1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_lengths_at_the_edges_of_tiles_and_chunks(gen, causal):
    # The lanes path widens the next 16-key tile inside the score loop and runs P V per chunk of 128 keys in one of
    # two alternating buffers: lengths on both sides of those edges, whole and split at odd offsets.
    case = make_case(8, 2, 8, 1, 300, block_size=16, causal=causal, generator=gen)
    case.cache_seqlens.copy_(torch.tensor([1, 15, 16, 17, 127, 128, 129, 257], dtype=torch.int32))
    run_native(case)
    run_native(case, split_keys=48)


@pytest.mark.parametrize("fp8", [False, True])
def test_sparse_rows_in_lanes(gen, fp8):
    case = make_case(3, 2, 4, 1, 300, block_size=16, topk=40, fp8=fp8, generator=gen)
    run_native(case, rows_in_lanes=True)
    run_native(case, split_keys=16, rows_in_lanes=True)


@pytest.mark.parametrize("s_q,causal,h_q,h_kv,block_size", RECIPE[::4])
def test_recipe_with_keys_split_into_pieces(gen, s_q, causal, h_q, h_kv, block_size):
    # Pieces of 16 and 48 keys, merged (rows that see no key in a piece, or in any, included).
    case = recipe_case(gen, s_q, causal, h_q, h_kv, block_size)
    run_native(case, split_keys=16)
    run_native(case, split_keys=48)


@pytest.mark.parametrize("fp8,topk", [(False, None), (True, None), (False, 100), (True, 100)])
def test_one_long_request_uses_every_thread(gen, fp8, topk):
    # A batch of one: split-KV by default with several threads (FlashMLA's reason for its scheduler).
    case = make_case(1, 2, 16, 1, 3000, block_size=64, causal=topk is None, fp8=fp8, topk=topk, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        run_native(case)
    finally:
        torch.set_num_threads(threads)


def test_thread_counts_give_the_same_bits(gen):
    # With a fixed piece size the work is cut the same way whatever the thread count.
    case = make_case(5, 2, 128, 1, 300, block_size=64, varlen=True, causal=True, generator=gen)
    p = _problem(case)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(native.decode(p, split_keys=64))
    finally:
        torch.set_num_threads(threads)
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])


def test_cases_it_hands_back_to_the_pytorch_steps(gen, monkeypatch):
    small_dv = make_case(2, 1, 16, 1, 50, d=64, dv=32, generator=gen)
    odd_d = make_case(2, 1, 16, 1, 50, d=80, dv=64, generator=gen)
    for case in (small_dv, odd_d):
        assert native.decode(_problem(case)) is None
    bf16 = make_case(2, 1, 16, 1, 50, generator=gen)
    monkeypatch.setenv("SEEKSTACK_CPU_COMPILE", "off")
    assert native.decode(_problem(bf16)) is None
    # ... and the CPU backend still answers, through the PyTorch steps
    ref = flash_mla_with_kvcache(*bf16.args(), **bf16.kwargs(), backend="reference")
    check_decode(*flash_mla_with_kvcache(*bf16.args(), **bf16.kwargs(), backend="cpu"), *ref)


def test_the_cpu_backend_uses_it(gen, monkeypatch):
    calls = []
    real = native.decode
    monkeypatch.setattr(native, "decode", lambda p: calls.append(p) or real(p))
    case = make_case(2, 1, 16, 1, 50, generator=gen)
    ref = flash_mla_with_kvcache(*case.args(), **case.kwargs(), backend="reference")
    check_decode(*cpu_path.mla_decode_cpu(_problem(case)), *ref)
    assert len(calls) == 1
