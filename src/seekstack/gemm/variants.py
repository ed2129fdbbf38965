"""DeepGEMM's other memory layouts (its SM100 API): NN, TN and TT, as views onto the NT kernels.

The letters give each operand's storage: "N" is A as [m, k] / B as [n, k] (K-major), "T" is A stored [k, m] / B
stored [k, n] (MN-major). Scale tensors always describe the logical operands, exactly as for NT: 1x128 scales
`[m, ceil(k/128)]` for A and 128x128 `[ceil(n/128), ceil(k/128)]` (or 1x128 `[n, ceil(k/128)]`) for B. The kernels
take strides, so no operand is copied.

>>> import torch
>>> from seekstack.gemm import per_token_cast_to_fp8, per_block_cast_to_fp8, calc_diff
>>> x, w = torch.randn(64, 256), torch.randn(128, 256)
>>> (xq, sx), (wq, sw) = per_token_cast_to_fp8(x), per_block_cast_to_fp8(w)
>>> d = torch.empty(64, 128)
>>> fp8_gemm_nn((xq, sx), (wq.T.contiguous(), sw), d)  # B stored [k, n]
>>> calc_diff(d, x @ w.T) < 1e-3
True
"""

from __future__ import annotations

from .dense import bf16_gemm_nt, fp8_gemm_nt
from .grouped import m_grouped_bf16_gemm_nt_contiguous, m_grouped_fp8_gemm_nt_contiguous


def _t(x):
    """The logical operand of a "T"-stored tensor (or `(tensor, scales)` pair): the last two axes swapped."""
    if isinstance(x, (tuple, list)) and len(x) == 2:
        return (_t(x[0]), x[1])
    return x.transpose(-2, -1) if hasattr(x, "transpose") and x.dim() >= 2 else x


def fp8_gemm_nn(a, b, d, c=None, recipe=None, recipe_a=None, recipe_b=None, compiled_dims="nk",
                disable_ue8m0_cast=False, *, backend=None) -> None:  # fmt: skip
    """`d = c + a @ b` with `a = (fp8 [m, k], sf)` and `b = (fp8 [k, n], sf of the logical [n, k])`."""
    fp8_gemm_nt(a, _t(b), d, c, recipe, recipe_a, recipe_b, compiled_dims, disable_ue8m0_cast, backend=backend)


def fp8_gemm_tn(a, b, d, c=None, recipe=None, recipe_a=None, recipe_b=None, compiled_dims="mn",
                disable_ue8m0_cast=False, *, backend=None) -> None:  # fmt: skip
    """`d = c + a.T @ b` with `a = (fp8 [k, m], sf [m, kb])` and `b = (fp8 [k, n], sf of the logical [n, k])`."""
    fp8_gemm_nt(_t(a), _t(b), d, c, recipe, recipe_a, recipe_b, compiled_dims, disable_ue8m0_cast, backend=backend)


def fp8_gemm_tt(a, b, d, c=None, recipe=None, recipe_a=None, recipe_b=None, compiled_dims="mn",
                disable_ue8m0_cast=False, *, backend=None) -> None:  # fmt: skip
    """`d = c + a.T @ b.T` with `a = (fp8 [k, m], sf [m, kb])` and `b = (fp8 [n, k], sf)`."""
    fp8_gemm_nt(_t(a), b, d, c, recipe, recipe_a, recipe_b, compiled_dims, disable_ue8m0_cast, backend=backend)


def bf16_gemm_nn(a, b, d, c=None, compiled_dims="nk", *, backend=None) -> None:
    """`d = c + a @ b` with bf16 `a [m, k]`, `b [k, n]`."""
    bf16_gemm_nt(a, _t(b), d, c, compiled_dims, backend=backend)


def bf16_gemm_tn(a, b, d, c=None, compiled_dims="mn", *, backend=None) -> None:
    """`d = c + a.T @ b` with bf16 `a [k, m]`, `b [k, n]`."""
    bf16_gemm_nt(_t(a), _t(b), d, c, compiled_dims, backend=backend)


def bf16_gemm_tt(a, b, d, c=None, compiled_dims="mn", *, backend=None) -> None:
    """`d = c + a.T @ b.T` with bf16 `a [k, m]`, `b [n, k]`."""
    bf16_gemm_nt(_t(a), b, d, c, compiled_dims, backend=backend)


def m_grouped_fp8_gemm_nn_contiguous(a, b, d, grouped_layout, recipe=None, recipe_a=None, recipe_b=None,
                                     compiled_dims="nk", disable_ue8m0_cast=False, use_psum_layout=False, *,
                                     backend=None) -> None:  # fmt: skip
    """Contiguous grouped FP8 GEMM with B stored `[G, k, n]` (scales of the logical `[G, n, k]`)."""
    m_grouped_fp8_gemm_nt_contiguous(a, _t(b), d, grouped_layout, recipe, recipe_a, recipe_b, compiled_dims,
                                     disable_ue8m0_cast, use_psum_layout, backend=backend)  # fmt: skip


def m_grouped_bf16_gemm_nn_contiguous(a, b, d, grouped_layout, compiled_dims="nk", *, backend=None) -> None:
    """Contiguous grouped bf16 GEMM with B stored `[G, k, n]`."""
    m_grouped_bf16_gemm_nt_contiguous(a, _t(b), d, grouped_layout, compiled_dims, backend=backend)
