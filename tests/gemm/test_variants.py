"""NN/TN/TT layouts: the same products as NT on transposed storage, scales on the logical operands."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from seekstack.gemm import (
    bf16_gemm_nn,
    bf16_gemm_tn,
    bf16_gemm_tt,
    calc_diff,
    fp8_gemm_nn,
    fp8_gemm_tn,
    fp8_gemm_tt,
    m_grouped_bf16_gemm_nn_contiguous,
    m_grouped_fp8_gemm_nn_contiguous,
    per_block_cast_to_fp8,
    per_token_cast_to_fp8,
)
from seekstack.gemm.testing import construct_contiguous

BACKENDS = [
    "cpu",
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(
            torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
            reason="CPU tensors through Triton need its interpreter (set without a GPU)",
        ),
    ),
]


def _store_t(pair):
    """A (fp8, scales) pair with the tensor stored transposed (contiguous [k, rows])."""
    return (pair[0].T.contiguous(), pair[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_and_bf16_layouts(seed, backend):
    m, n, k = 40, 136, 300
    a = torch.randn(m, k, dtype=torch.bfloat16)
    b = torch.randn(n, k, dtype=torch.bfloat16)
    ref = a.float() @ b.float().T
    qa, qb = per_token_cast_to_fp8(a), per_block_cast_to_fp8(b)
    for fn, lhs, rhs in (
        (fp8_gemm_nn, qa, _store_t(qb)),
        (fp8_gemm_tn, _store_t(qa), _store_t(qb)),
        (fp8_gemm_tt, _store_t(qa), qb),
    ):
        d = torch.full((m, n), float("nan"))
        fn(lhs, rhs, d, backend=backend)
        assert calc_diff(d, ref) < 1e-3, fn.__name__
    for fn, lhs, rhs in ((bf16_gemm_nn, a, b.T.contiguous()), (bf16_gemm_tn, a.T.contiguous(), b.T.contiguous()),
                         (bf16_gemm_tt, a.T.contiguous(), b)):  # fmt: skip
        d = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
        fn(lhs, rhs, d, backend=backend)
        assert calc_diff(d, ref) < 1e-5, fn.__name__


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_nn(seed, backend):
    lhs, rhs, out, m_indices, ref = construct_contiguous([50, 0, 20], 128, 256)
    m_grouped_fp8_gemm_nn_contiguous(lhs, (rhs[0].transpose(1, 2).contiguous(), rhs[1]), out, m_indices,
                                     backend=backend)  # fmt: skip
    assert calc_diff(out, ref) < 1e-3
    a, b, out, m_indices, ref = construct_contiguous([30, 10], 64, 128, quantize=False)
    m_grouped_bf16_gemm_nn_contiguous(a, b.transpose(1, 2).contiguous(), out, m_indices, backend=backend)
    assert calc_diff(out, ref) < 1e-5


def test_layout_bad_input():
    qa = per_token_cast_to_fp8(torch.randn(8, 256))
    qb = per_block_cast_to_fp8(torch.randn(64, 256))
    with pytest.raises(ValueError, match="b: K"):
        fp8_gemm_nn(qa, qb, torch.empty(8, 64))  # B given K-major to the NN variant: its K is 64, not 256
