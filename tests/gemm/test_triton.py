"""The Triton kernels: under TRITON_INTERPRET=1 on small shapes (<= 1e8 multiply-adds per case), and on CUDA."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from seekstack.gemm import (  # noqa: E402
    bf16_gemm_nt,
    calc_diff,
    fp8_gemm_nt,
    gemm_fp8_fp8_bf16_nt,
    get_col_major_tma_aligned_tensor,
    m_grouped_bf16_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_contiguous,
    m_grouped_gemm_fp8_fp8_bf16_nt_contiguous,
    m_grouped_gemm_fp8_fp8_bf16_nt_masked,
    per_block_cast_to_fp8,
    per_token_cast_to_fp8,
    reference,  # noqa: E402
    wgrad_gemm_fp8_fp8_fp32_nt,
)
from seekstack.gemm.testing import construct_contiguous, construct_dense, construct_masked, fp8_tolerance  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("m,n,k", [(7, 576, 3884), (130, 384, 1024), (1, 200, 129)])
def test_dense_fp8(seed, m, n, k):
    lhs, rhs, out, ref = construct_dense(m, n, k, device=DEVICE)
    gemm_fp8_fp8_bf16_nt((lhs[0], get_col_major_tma_aligned_tensor(lhs[1])), rhs, out, backend="triton")
    assert out.isfinite().all()
    assert calc_diff(out, ref) < fp8_tolerance(m)
    want = torch.empty(m, n, device=DEVICE)
    reference.gemm(*lhs, *rhs, 128, want, None)
    assert calc_diff(out, want) < 1e-5  # only the bf16 output rounding is left


@pytest.mark.skipif(DEVICE == "cuda", reason="interpreter path selection")
def test_fp8_cast_path(seed, monkeypatch):
    # The default interpreter path decodes int8 bits; mode 3 loads e4m3 and widens it with a cast instead.
    from seekstack.gemm import triton_gemm

    monkeypatch.setattr(triton_gemm, "FP8_MODE", 3)
    lhs, rhs, out, ref = construct_dense(64, 256, 300)
    gemm_fp8_fp8_bf16_nt(lhs, rhs, out, backend="triton")
    assert calc_diff(out, ref) < 1e-3
    want = torch.empty(64, 256)
    reference.gemm(*lhs, *rhs, 128, want, None)
    assert calc_diff(out, want) < 1e-5


def test_dense_fp32_out_with_c_and_bf16(seed):
    lhs, rhs, d, ref = construct_dense(64, 256, 512, out_dtype=torch.float32, device=DEVICE)
    c = torch.randn(64, 256, device=DEVICE)
    fp8_gemm_nt(lhs, rhs, d, c=c, backend="triton")
    assert calc_diff(d, ref + c) < 1e-3
    a = torch.randn(64, 512, dtype=torch.bfloat16, device=DEVICE)
    b = torch.randn(96, 512, dtype=torch.bfloat16, device=DEVICE)
    out = torch.full((64, 96), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    bf16_gemm_nt(a, b, out, backend="triton")
    assert calc_diff(out, a.float() @ b.float().T) < 1e-5


def test_wgrad_accumulates(seed):
    a = torch.randn(128, 300, dtype=torch.bfloat16, device=DEVICE)
    b = torch.randn(130, 300, dtype=torch.bfloat16, device=DEVICE)
    prior = torch.randn(128, 130, device=DEVICE)
    out = prior.clone()
    wgrad_gemm_fp8_fp8_fp32_nt(per_token_cast_to_fp8(a), per_token_cast_to_fp8(b), out, backend="triton")
    assert calc_diff(out - prior, a.float() @ b.float().T) < 1e-3


def test_contiguous(seed):
    lhs, rhs, out, m_indices, ref = construct_contiguous([70, 0, 100], 256, 256, device=DEVICE)
    m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, rhs, out, m_indices, backend="triton")
    assert not out[m_indices == -1].float().any()
    assert calc_diff(out, ref) < 1e-3
    a, b, out, m_indices, ref = construct_contiguous([30, 50], 128, 256, quantize=False, device=DEVICE)
    m_grouped_bf16_gemm_nt_contiguous(a, b, out, m_indices, backend="triton")
    assert calc_diff(out, ref) < 1e-5


def test_contiguous_any_segmentation(seed):
    m, n, k, g = 77, 130, 200, 3
    a, b = torch.randn(m, k, device=DEVICE), torch.randn(g, n, k, device=DEVICE)
    m_indices = torch.randint(-1, g, (m,), dtype=torch.int32, device=DEVICE)
    out = torch.full((m, n), float("nan"), device=DEVICE)
    m_grouped_fp8_gemm_nt_contiguous(
        per_token_cast_to_fp8(a), per_block_cast_to_fp8(b), out, m_indices, backend="triton"
    )
    ref = torch.einsum("mk,mnk->mn", a, b[m_indices.clamp(min=0).long()]) * (m_indices >= 0)[:, None]
    assert calc_diff(out, ref) < 1e-3
    assert not out[m_indices == -1].any()


def test_masked(seed):
    sizes = [20, 0, 64]
    lhs, rhs, out, masked_m, ref = construct_masked(sizes, 64, 256, 384, device=DEVICE)
    lhs = (lhs[0], get_col_major_tma_aligned_tensor(lhs[1]))  # [G, m_max, kb] scales, TMA-aligned layout
    m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, 32, backend="triton")
    for g, mm in enumerate(sizes):
        if mm:
            assert calc_diff(out[g, :mm], ref[g, :mm]) < fp8_tolerance(mm)
        assert out[g, mm:].isnan().all()


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(64, 2112, 7168), (4096, 7168, 2048), (130, 576, 3884)])
def test_gpu_published_shapes(seed, m, n, k):
    lhs, rhs, out, ref = construct_dense(m, n, k, device="cuda")
    gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    assert calc_diff(out, ref) < 1e-3


@pytest.mark.gpu
def test_gpu_grouped(seed):
    lhs, rhs, out, m_indices, ref = construct_contiguous([4000, 0, 3000, 4500], 4096, 7168, device="cuda")
    m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, rhs, out, m_indices)
    assert calc_diff(out, ref) < 1e-3 and not out[m_indices == -1].float().any()
    lhs, rhs, out, masked_m, ref = construct_masked([192, 0, 20, 1], 256, 4096, 7168, device="cuda")
    m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, 192)
    assert calc_diff(out[0, :192], ref[0, :192]) < 1e-3 and out[0, 192:].isnan().all()


def test_kernel_compiles_for_hopper_and_ampere(tmp_path):
    # No GPU here: compile for sm_90 (FP8 wgmma) and sm_80 (the int8-decoding path) with the bundled ptxas.
    import os
    import subprocess
    import sys

    code = (
        "from seekstack.gemm.triton_aot import compile_for\n"
        "k = compile_for(90, layout='dense')\n"
        "assert 'wgmma' in k.asm['ptx'] and len(k.asm['cubin']) > 0\n"
        "k = compile_for(80, layout='contiguous', block_m=64, num_stages=2)\n"
        "assert 'mma' in k.asm['ptx'] and 'wgmma' not in k.asm['ptx']\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # explicit 0: `import seekstack` would otherwise choose 1
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
