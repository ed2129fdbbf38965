"""Grouped GEMMs (contiguous, masked, K-grouped wgrad) on the CPU and reference paths."""

from __future__ import annotations

import pytest
import torch

from seekstack.gemm import (
    calc_diff,
    k_grouped_fp8_gemm_tn_contiguous,
    k_grouped_wgrad_gemm_fp8_fp8_fp32_nt,
    m_grouped_bf16_gemm_nt_contiguous,
    m_grouped_bf16_gemm_nt_masked,
    m_grouped_fp8_gemm_nt_contiguous,
    m_grouped_gemm_fp8_fp8_bf16_nt_contiguous,
    m_grouped_gemm_fp8_fp8_bf16_nt_masked,
    per_block_cast_to_fp8,
    per_channel_cast_to_fp8,
    per_token_cast_to_fp8,
)
from seekstack.gemm.testing import construct_contiguous, construct_masked, fp8_tolerance, group_sizes

BACKENDS = ["cpu", "reference"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_groups,expected_m,n,k", [(4, 96, 256, 384), (3, 40, 576, 300)])
def test_contiguous(seed, backend, num_groups, expected_m, n, k):
    sizes = group_sizes(num_groups, expected_m, empty=(1,))
    lhs, rhs, out, m_indices, ref = construct_contiguous(sizes, n, k)
    assert (m_indices == -1).any() and sizes[1] == 0
    m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, rhs, out, m_indices, backend=backend)
    assert torch.equal(out[m_indices == -1].float(), torch.zeros_like(out[m_indices == -1].float()))
    assert calc_diff(out, ref) < 1e-3


def test_contiguous_any_segmentation(seed):
    # Beyond DeepGEMM: groups not padded to 128 rows, interleaved runs, any M.
    m, n, k, g = 77, 130, 200, 3
    a, b = torch.randn(m, k), torch.randn(g, n, k)
    m_indices = torch.randint(-1, g, (m,), dtype=torch.int32)
    out = torch.full((m, n), float("nan"))
    m_grouped_fp8_gemm_nt_contiguous(per_token_cast_to_fp8(a), per_block_cast_to_fp8(b), out, m_indices)
    ref = torch.einsum("mk,mnk->mn", a, b[m_indices.clamp(min=0).long()]) * (m_indices >= 0)[:, None]
    assert calc_diff(out, ref) < 1e-3
    assert not out[m_indices == -1].any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sizes,m_max,n,k", [([20, 0, 64, 7], 64, 256, 384), ([1, 33], 48, 576, 300)])
def test_masked(seed, backend, sizes, m_max, n, k):
    lhs, rhs, out, masked_m, ref = construct_masked(sizes, m_max, n, k)
    m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, expected_m=max(sizes), backend=backend)
    for g, mm in enumerate(sizes):
        if mm:
            assert calc_diff(out[g, :mm], ref[g, :mm]) < fp8_tolerance(mm)
        assert out[g, mm:].isnan().all(), "padding rows must be left untouched"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_grouped(seed, backend):
    sizes = group_sizes(3, 50, empty=(2,))
    a, b, out, m_indices, ref = construct_contiguous(sizes, 192, 256, quantize=False)
    m_grouped_bf16_gemm_nt_contiguous(a, b, out, m_indices, backend=backend)
    assert calc_diff(out, ref) < 1e-5
    a, b, out, masked_m, ref = construct_masked([5, 0, 17], 24, 192, 256, quantize=False)
    m_grouped_bf16_gemm_nt_masked(a, b, out, masked_m, 17, backend=backend)
    assert calc_diff(out[0, :5], ref[0, :5]) < 1e-5 and calc_diff(out[2, :17], ref[2, :17]) < 1e-5
    assert out[1].isnan().all() and out[0, 5:].isnan().all()


def _k_grouped_inputs(m, n, ks):
    xs = [torch.randn(m, k, dtype=torch.bfloat16) for k in ks]
    ys = [torch.randn(n, k, dtype=torch.bfloat16) for k in ks]
    ref = torch.stack([x.float() @ y.float().T for x, y in zip(xs, ys)])
    qx = [per_token_cast_to_fp8(x) for x in xs]
    qy = [per_token_cast_to_fp8(y) for y in ys]
    lhs = (torch.cat([q.flatten() for q, _ in qx]), torch.cat([s.T for _, s in qx]))
    rhs = (torch.cat([q.flatten() for q, _ in qy]), torch.cat([s.T for _, s in qy]))
    return lhs, rhs, ref


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_grouped_wgrad_accumulates(seed, backend):
    m, n, ks = 128, 96, [256, 0, 130, 384]
    lhs, rhs, ref = _k_grouped_inputs(m, n, ks)
    prior = torch.randn(len(ks), m, n)
    out = prior.clone()
    k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(lhs, rhs, out, ks, backend=backend)
    assert torch.equal(out[1], prior[1])
    for g in (0, 2, 3):
        assert calc_diff(out[g] - prior[g], ref[g]) < 1e-3
    # The transposed scale layout ([m, sum(kb)]) is accepted as well.
    out2 = prior.clone()
    k_grouped_wgrad_gemm_fp8_fp8_fp32_nt((lhs[0], lhs[1].T), (rhs[0], rhs[1].T), out2, ks, backend=backend)
    assert torch.equal(out, out2)


def test_k_grouped_tn_contiguous(seed):
    m, n, ks = 64, 80, [200, 0, 128]
    grads = [torch.randn(k, m) for k in ks]
    acts = [torch.randn(k, n) for k in ks]
    qa = [per_channel_cast_to_fp8(x) for x in grads]
    qb = [per_channel_cast_to_fp8(x) for x in acts]
    a = (torch.cat([q for q, _ in qa]), torch.cat([s for _, s in qa]))
    b = (torch.cat([q for q, _ in qb]), torch.cat([s for _, s in qb]))
    c = torch.randn(3, m, n)
    d = torch.full((3, m, n), float("nan"))
    k_grouped_fp8_gemm_tn_contiguous(a, b, d, ks, torch.tensor(ks), c=c)
    for g in range(3):
        assert calc_diff(d[g], c[g] + grads[g].T @ acts[g]) < 1e-3
    assert torch.equal(d[1], c[1])


def test_grouped_bad_inputs():
    lhs, rhs, out, m_indices, _ = construct_contiguous([10, 5], 128, 256)
    with pytest.raises(ValueError, match="m_indices"):
        m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, rhs, out, m_indices.float())
    with pytest.raises(ValueError, match="m_indices"):
        m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, rhs, out, m_indices + 5)
    with pytest.raises(ValueError, match="rhs scales"):
        m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, (rhs[0], rhs[1][:1]), out, m_indices)
    with pytest.raises(ValueError, match="rhs: K"):
        m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, (rhs[0][..., :128], rhs[1]), out, m_indices)
    with pytest.raises(ValueError, match="use_psum_layout"):
        m_grouped_fp8_gemm_nt_contiguous(lhs, rhs, out, m_indices, use_psum_layout=True)
    lhs, rhs, out, masked_m, _ = construct_masked([3, 4], 8, 128, 256)
    with pytest.raises(ValueError, match="masked_m"):
        m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, torch.tensor([3, 9], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="expected_m"):
        m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, None)
    with pytest.raises(ValueError, match="out"):
        m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out[:1], masked_m, 4)
    with pytest.raises(ValueError, match="lhs"):
        m_grouped_gemm_fp8_fp8_bf16_nt_masked((lhs[0][:1], lhs[1][:1]), rhs, out, masked_m, 4)
    lhs, rhs, _ = _k_grouped_inputs(8, 8, [128])
    with pytest.raises(ValueError, match="batch_sizes"):
        k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(lhs, rhs, torch.zeros(1, 8, 8), [128, 0])
    with pytest.raises(ValueError, match="lhs"):
        k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(lhs, rhs, torch.zeros(1, 8, 8), [64])
