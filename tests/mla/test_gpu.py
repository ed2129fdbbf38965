"""On a CUDA device: the Triton kernels compiled for real, with FlashMLA's recipe at FlashMLA's sizes."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from seekstack.mla import flash_mla_with_kvcache, get_mla_metadata
from seekstack.mla.testing import check_decode, make_case

pytestmark = pytest.mark.gpu

GRID = [
    (b, s_q, s_k, h_q, h_kv, block_size, causal)
    for (b, s_k), s_q, (h_q, h_kv), block_size, causal in itertools.product(
        [(2, 140), (6, 4096)], [1, 2, 4], [(1, 1), (16, 1), (16, 2), (128, 1), (128, 2)], [1, 16, 64], [False, True]
    )
]


def run_cuda(case, **kwargs):
    h_kv = case.k_cache.shape[2]
    s_q, h_q = case.q.shape[1], case.q.shape[2]
    meta, splits = get_mla_metadata(case.cache_seqlens, s_q * h_q // h_kv, h_kv)
    got = flash_mla_with_kvcache(*case.args(), meta, splits, **case.kwargs(), **kwargs)
    ref = flash_mla_with_kvcache(*case.args(), **case.kwargs(), **kwargs, backend="reference")
    check_decode(*got, *ref)
    return got


@pytest.mark.parametrize("b,s_q,s_k,h_q,h_kv,block_size,causal", GRID)
def test_recipe_cuda(gen, b, s_q, s_k, h_q, h_kv, block_size, causal):
    case = make_case(b, s_q, h_q, h_kv, s_k, block_size=block_size, varlen=True, causal=causal, device="cuda",
                     generator=gen)  # fmt: skip
    run_cuda(case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_dtypes_cuda(gen, dtype):
    case = make_case(4, 2, 128, 1, 1000, dtype=dtype, varlen=True, causal=True, device="cuda", generator=gen)
    assert run_cuda(case)[0].dtype == dtype


def test_corner_case_cuda(gen):
    """FlashMLA's corner grid: b = 128, s_q = 2, s_k = 4096, varlen, some lengths 0."""
    case = make_case(128, 2, 128, 1, 4096, varlen=True, zero_lengths=9, causal=True, device="cuda", generator=gen)
    run_cuda(case)


@pytest.mark.parametrize("topk", [None, 512])
def test_fp8_cuda(gen, topk):
    case = make_case(8, 2, 128, 1, 2000, fp8=True, topk=topk, varlen=True, zero_lengths=1, causal=topk is None,
                     device="cuda", generator=gen)  # fmt: skip
    got = flash_mla_with_kvcache(*case.args(), **case.kwargs())
    check_decode(*got, *flash_mla_with_kvcache(*case.args(), **case.kwargs(), backend="reference"))


def test_cpu_path_on_cuda_tensors(gen):
    case = make_case(3, 2, 16, 1, 500, varlen=True, causal=True, device="cuda", generator=gen)
    got = flash_mla_with_kvcache(*case.args(), **case.kwargs(), backend="cpu")
    check_decode(*got, *flash_mla_with_kvcache(*case.args(), **case.kwargs(), backend="reference"))


def test_bench_quick_cuda(tmp_path):
    from seekstack.mla.bench import main

    assert main(["--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "mla.json").read_text())
    assert data["params"]["backend"] == "triton" and data["rows"]
