"""Dense FP8/BF16 GEMMs on the CPU and reference paths, with DeepGEMM's recipe and tolerances."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from seekstack.gemm import (
    bf16_gemm_nt,
    calc_diff,
    cublaslt_gemm_nt,
    fp8_gemm_nt,
    gemm_fp8_fp8_bf16_nt,
    get_col_major_tma_aligned_tensor,
    pack_ue8m0_to_int,
    per_block_cast_to_fp8,
    per_token_cast_to_fp8,
    reference,
    wgrad_gemm_fp8_fp8_fp32_nt,
)
from seekstack.gemm.testing import construct_dense, fp8_tolerance

MS = [1, 7, 64, 130, 256]
NKS = [(576, 3884), (384, 1024), (200, 129)]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("n,k", NKS)
@pytest.mark.parametrize("m", MS)
def test_fp8_gemm_matches_prequantisation_reference(seed, backend, m, n, k):
    lhs, rhs, out, ref = construct_dense(m, n, k)
    gemm_fp8_fp8_bf16_nt(lhs, rhs, out, backend=backend)
    assert out.isfinite().all()
    assert calc_diff(out, ref) < fp8_tolerance(m)


@pytest.mark.parametrize("m,n,k", [(7, 576, 3884), (130, 200, 129), (256, 384, 1024)])
def test_cpu_path_equals_dequantised_reference(seed, m, n, k):
    lhs, rhs, out, _ = construct_dense(m, n, k, out_dtype=torch.float32)
    # The V1 name is bf16-only; the current name also takes fp32 outputs (no output rounding to hide errors).
    fp8_gemm_nt(lhs, rhs, out, backend="cpu")
    want = torch.empty_like(out)
    reference.gemm(*lhs, *rhs, 128, want, None)
    assert calc_diff(out, want) < 1e-10


def test_ue8m0_scales_and_tma_aligned_scale_layout(seed):
    (a, sfa), (b, sfb), out, ref = construct_dense(130, 576, 640, use_ue8m0=True)
    assert torch.equal(sfa, 2.0 ** torch.log2(sfa).round())
    col = get_col_major_tma_aligned_tensor(sfa)
    assert col.stride(0) == 1
    gemm_fp8_fp8_bf16_nt((a, col), (b, sfb), out)
    plain = torch.empty_like(out)
    gemm_fp8_fp8_bf16_nt((a, sfa), (b, sfb), plain)
    assert torch.equal(out, plain)
    assert calc_diff(out, ref) < 1e-3


def test_packed_ue8m0_scales(seed):
    # SM100's format: power-of-two scales, four exponents per int32 along K.
    (a, sfa), (b, sfb), out, ref = construct_dense(40, 200, 512, use_ue8m0=True)
    packed = torch.empty_like(out)
    fp8_gemm_nt((a, pack_ue8m0_to_int(sfa)), (b, pack_ue8m0_to_int(sfb)), packed)
    gemm_fp8_fp8_bf16_nt((a, sfa), (b, sfb), out)
    assert torch.equal(packed, out) and calc_diff(out, ref) < 1e-3


def test_fp8_gemm_nt_with_c_and_fp32_output(seed):
    lhs, rhs, d, ref = construct_dense(64, 256, 384, out_dtype=torch.float32)
    c = torch.randn(64, 256) * 10
    fp8_gemm_nt(lhs, rhs, d, c=c, recipe=(1, 128, 128))
    assert calc_diff(d, ref + c) < 1e-3
    # 1x128 scales on B too (recipe (1, 1, 128)), inferred from the scale shape.
    b = torch.randn(256, 384)
    b_fp8, sfb = per_token_cast_to_fp8(b)
    a = torch.randn(64, 384)
    fp8_gemm_nt(per_token_cast_to_fp8(a), (b_fp8, sfb), d)
    assert calc_diff(d, a @ b.T) < 1e-3


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("m,n,k", [(128, 256, 512), (64, 130, 300), (7, 96, 129)])
def test_wgrad_accumulates_into_fp32_out(seed, backend, m, n, k):
    a = torch.randn(m, k, dtype=torch.bfloat16)
    b = torch.randn(n, k, dtype=torch.bfloat16)
    prior = torch.randn(m, n) * 5
    out = prior.clone()
    wgrad_gemm_fp8_fp8_fp32_nt(per_token_cast_to_fp8(a), per_token_cast_to_fp8(b), out, backend=backend)
    assert calc_diff(out - prior, a.float() @ b.float().T) < fp8_tolerance(m)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("m,n,k", [(1, 576, 3884), (130, 384, 1024), (64, 200, 129)])
def test_bf16_gemm(seed, backend, m, n, k):
    a = torch.randn(m, k, dtype=torch.bfloat16)
    b = torch.randn(n, k, dtype=torch.bfloat16)
    ref = a.float() @ b.float().T
    d = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
    bf16_gemm_nt(a, b, d, backend=backend)
    assert calc_diff(d, ref) < 1e-5
    c = torch.randn(m, n)
    d32 = torch.empty(m, n)
    bf16_gemm_nt(a, b, d32, c=c, backend=backend)
    assert calc_diff(d32, ref + c) < 1e-5
    cublaslt_gemm_nt(a, b, d)
    assert calc_diff(d, ref) < 1e-5


def _pair(m, k):
    return per_token_cast_to_fp8(torch.randn(m, k))


def test_bad_inputs_raise_value_error_naming_the_argument():
    lhs, rhs, out = _pair(8, 256), per_block_cast_to_fp8(torch.randn(64, 256)), torch.empty(8, 64, dtype=torch.bfloat16)
    gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    cases = [
        (("x", rhs, out), "lhs"),
        (((lhs[0].float(), lhs[1]), rhs, out), "lhs"),
        ((lhs, (rhs[0][:, :128], rhs[1]), out), "rhs: K=128"),
        ((lhs, rhs, out.float()), "out"),
        ((lhs, rhs, out[:, :32]), "out"),
        (((lhs[0], lhs[1][:, :1]), rhs, out), "lhs scales"),
        (((lhs[0], lhs[1].double()), rhs, out), "lhs scales"),
        ((lhs, (rhs[0], rhs[1][:, :1]), out), "rhs scales"),
        ((lhs, (rhs[0], torch.ones(64, 2)), out), "rhs scales"),  # 1x128 scales: not the V1 dense recipe
    ]
    for args, name in cases:
        with pytest.raises(ValueError, match=name):
            gemm_fp8_fp8_bf16_nt(*args)
    with pytest.raises(ValueError, match="recipe"):
        fp8_gemm_nt(lhs, rhs, out, recipe=(1, 2, 3))
    with pytest.raises(ValueError, match="recipe_b"):
        fp8_gemm_nt(lhs, rhs, out, recipe_a=(1, 128), recipe_b=(2, 2))
    fp8_gemm_nt(lhs, rhs, out, recipe_a=(1, 128), recipe_b=(128, 128))
    with pytest.raises(ValueError, match="c"):
        fp8_gemm_nt(lhs, rhs, out.float(), c=torch.zeros(8, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="backend"):
        gemm_fp8_fp8_bf16_nt(lhs, rhs, out, backend="cuda")
    with pytest.raises(ValueError, match="out"):
        wgrad_gemm_fp8_fp8_fp32_nt(lhs, _pair(64, 256), out)
    with pytest.raises(ValueError, match="b: K"):
        bf16_gemm_nt(
            torch.zeros(4, 8, dtype=torch.bfloat16),
            torch.zeros(4, 9, dtype=torch.bfloat16),
            torch.zeros(4, 4, dtype=torch.bfloat16),
        )


def _poisoned_view(t: torch.Tensor, extra_cols: int) -> torch.Tensor:
    """`t` as a column slice of a wider buffer whose other columns are NaN (0x7F bytes for fp8)."""
    buf = torch.full((t.shape[0], t.shape[1] + extra_cols), float("nan"), dtype=torch.float32)
    if t.dtype == torch.float8_e4m3fn:
        buf = buf.to(torch.float8_e4m3fn)
    buf[:, : t.shape[1]] = t
    return buf[:, : t.shape[1]]


_INTERPRETED_TRITON = pytest.param(
    "triton",
    marks=pytest.mark.skipif(
        torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
        reason="CPU tensors through Triton need its interpreter (set without a GPU)",
    ),
)


@pytest.mark.parametrize("backend", ["cpu", "reference", _INTERPRETED_TRITON])
def test_strided_inputs_in_nan_poisoned_memory(seed, backend):
    (a, sfa), (b, sfb), out, ref = construct_dense(33, 160, 300)
    a, b = _poisoned_view(a, 61), _poisoned_view(b, 3)
    sfb = _poisoned_view(sfb, 2)
    # Column-major scales whose padding rows (M 33 -> 36) hold NaN.
    store = torch.full((sfa.shape[1], 36), float("nan"))
    col = store.T[:33]
    col.copy_(sfa)
    assert a.stride(0) == 361 and col.stride() == (1, 36)
    gemm_fp8_fp8_bf16_nt((a, col), (b, sfb), out, backend=backend)
    assert out.isfinite().all()
    assert calc_diff(out, ref) < 1e-3


def test_import_does_not_need_triton():
    import subprocess
    import sys

    code = "import sys, seekstack.gemm as g; assert 'triton' not in sys.modules and g.FP8Linear"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
