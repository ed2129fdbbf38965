"""seekstack.gemm: DeepGEMM's FP8 GEMMs with fine-grained scaling, on CPU and on any GPU through Triton.

DeepGEMM V1 names are the primary API; its current names are aliases with the current signatures.

- Casting: `per_token_cast_to_fp8` (1x128), `per_block_cast_to_fp8` (128x128), `per_channel_cast_to_fp8` (128x1),
  optional UE8M0 (power-of-two) scales; `calc_diff` is DeepGEMM's accuracy metric (gate: < 1e-3 for FP8).
- GEMMs `D = C + A @ B.T`: dense (`gemm_fp8_fp8_bf16_nt` / `fp8_gemm_nt`), wgrad (`wgrad_gemm_fp8_fp8_fp32_nt`),
  MoE contiguous / masked / K-grouped layouts, BF16 counterparts, and the NN/TN/TT layouts.
- `FP8Linear`: FP8 forward, dgrad and wgrad (DeepSeek-V3's recipe); loads `weight_scale_inv` checkpoints.
- Backends (keyword `backend=`, or `SEEKSTACK_GEMM_BACKEND`): "triton" (default for CUDA tensors; any GPU, FP8
  tensor cores from SM89, an exact int8-decoding path below), "cpu" (default otherwise; vectorised dequantisation
  into fp32 matmuls) and "reference" (plain PyTorch, the tests' oracle). Triton is imported only when used.
- Beyond DeepGEMM: any M, N, K (no 128 or TMA alignment rules), CPU, GPUs without FP8 support, and any
  segmentation of the contiguous layout.

>>> import torch
>>> from seekstack.gemm import per_token_cast_to_fp8, per_block_cast_to_fp8, gemm_fp8_fp8_bf16_nt, calc_diff
>>> x, w = torch.randn(64, 512, dtype=torch.bfloat16), torch.randn(256, 512, dtype=torch.bfloat16)
>>> out = torch.empty(64, 256, dtype=torch.bfloat16)
>>> gemm_fp8_fp8_bf16_nt(per_token_cast_to_fp8(x), per_block_cast_to_fp8(w), out)
>>> calc_diff(out, x.float() @ w.float().T) < 1e-3
True
"""

from .casting import (
    ceil_to_ue8m0,
    pack_ue8m0_to_int,
    per_block_cast_to_fp8,
    per_channel_cast_to_fp8,
    per_token_cast_to_fp8,
    unpack_ue8m0_from_int,
)
from .dense import (
    bf16_gemm_nt,
    cublaslt_gemm_nt,
    fp8_gemm_nt,
    gemm_fp8_fp8_bf16_nt,
    wgrad_gemm_fp8_fp8_fp32_nt,
)
from .grouped import (
    m_grouped_bf16_gemm_nt_contiguous,
    m_grouped_bf16_gemm_nt_masked,
    m_grouped_fp8_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_masked,
    m_grouped_gemm_fp8_fp8_bf16_nt_contiguous,
    m_grouped_gemm_fp8_fp8_bf16_nt_masked,
)
from .k_grouped import k_grouped_fp8_gemm_tn_contiguous, k_grouped_wgrad_gemm_fp8_fp8_fp32_nt
from .layout import (
    ceil_div,
    get_col_major_tma_aligned_tensor,
    get_m_alignment_for_contiguous_layout,
    get_mk_alignment_for_contiguous_layout,
    get_mn_major_tma_aligned_tensor,
    get_num_sms,
    get_tma_aligned_size,
    set_mk_alignment_for_contiguous_layout,
    set_num_sms,
)
from .linear import FP8Linear
from .numeric import calc_diff
from .variants import (
    bf16_gemm_nn,
    bf16_gemm_tn,
    bf16_gemm_tt,
    fp8_gemm_nn,
    fp8_gemm_tn,
    fp8_gemm_tt,
    m_grouped_bf16_gemm_nn_contiguous,
    m_grouped_fp8_gemm_nn_contiguous,
)

# DeepGEMM's current names for the FP8 x FP8 GEMMs (which it also exposes as fp8_fp4_*).
fp8_fp4_gemm_nt = fp8_gemm_nt
fp8_fp4_gemm_nn = fp8_gemm_nn
fp8_fp4_gemm_tn = fp8_gemm_tn
fp8_fp4_gemm_tt = fp8_gemm_tt
m_grouped_fp8_fp4_gemm_nt_contiguous = m_grouped_fp8_gemm_nt_contiguous
m_grouped_fp8_fp4_gemm_nt_masked = m_grouped_fp8_gemm_nt_masked


__all__ = [
    "FP8Linear",
    "bf16_gemm_nn",
    "bf16_gemm_nt",
    "bf16_gemm_tn",
    "bf16_gemm_tt",
    "calc_diff",
    "ceil_div",
    "ceil_to_ue8m0",
    "cublaslt_gemm_nt",
    "fp8_fp4_gemm_nn",
    "fp8_fp4_gemm_nt",
    "fp8_fp4_gemm_tn",
    "fp8_fp4_gemm_tt",
    "fp8_gemm_nn",
    "fp8_gemm_nt",
    "fp8_gemm_tn",
    "fp8_gemm_tt",
    "gemm_fp8_fp8_bf16_nt",
    "get_col_major_tma_aligned_tensor",
    "get_m_alignment_for_contiguous_layout",
    "get_mk_alignment_for_contiguous_layout",
    "get_mn_major_tma_aligned_tensor",
    "get_num_sms",
    "get_tma_aligned_size",
    "k_grouped_fp8_gemm_tn_contiguous",
    "k_grouped_wgrad_gemm_fp8_fp8_fp32_nt",
    "m_grouped_bf16_gemm_nn_contiguous",
    "m_grouped_bf16_gemm_nt_contiguous",
    "m_grouped_bf16_gemm_nt_masked",
    "m_grouped_fp8_fp4_gemm_nt_contiguous",
    "m_grouped_fp8_fp4_gemm_nt_masked",
    "m_grouped_fp8_gemm_nn_contiguous",
    "m_grouped_fp8_gemm_nt_contiguous",
    "m_grouped_fp8_gemm_nt_masked",
    "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous",
    "m_grouped_gemm_fp8_fp8_bf16_nt_masked",
    "pack_ue8m0_to_int",
    "per_block_cast_to_fp8",
    "per_channel_cast_to_fp8",
    "per_token_cast_to_fp8",
    "set_mk_alignment_for_contiguous_layout",
    "set_num_sms",
    "unpack_ue8m0_from_int",
    "wgrad_gemm_fp8_fp8_fp32_nt",
]
