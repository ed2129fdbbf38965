"""`seekstack demo` stage: FP8 GEMMs with fine-grained scaling on this machine's backend.

Quantises a DeepSeek-V3-like projection (scaled down), runs the dense, contiguous-grouped and masked-grouped FP8
GEMMs against fp32 matmuls of the unquantised inputs, and trains a small MLP with FP8Linear next to an fp32 twin.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .casting import per_block_cast_to_fp8, per_token_cast_to_fp8
from .dense import gemm_fp8_fp8_bf16_nt
from .grouped import m_grouped_gemm_fp8_fp8_bf16_nt_contiguous, m_grouped_gemm_fp8_fp8_bf16_nt_masked
from .linear import FP8Linear
from .numeric import calc_diff
from .testing import construct_contiguous, construct_masked, group_sizes


def _train(fp8: bool, steps: int = 15) -> list[float]:
    torch.manual_seed(0)
    x = torch.randn(128, 256)
    target = torch.sin(x @ torch.randn(256, 64) / 16)
    l1, l2 = torch.nn.Linear(256, 384), torch.nn.Linear(384, 64)
    if fp8:
        l1, l2 = FP8Linear.from_linear(l1), FP8Linear.from_linear(l2)
    opt = torch.optim.Adam([*l1.parameters(), *l2.parameters()], lr=3e-3)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(l2(F.gelu(l1(x))), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def run_demo(workdir: Path) -> dict[str, str]:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    m, n, k = 128, 528, 1792  # DeepSeek-V3's q_a_proj shape (2112 x 7168), scaled by 1/4
    x = torch.randn(m, k, dtype=torch.bfloat16)
    w = torch.randn(n, k, dtype=torch.bfloat16)
    lhs, rhs = per_token_cast_to_fp8(x), per_block_cast_to_fp8(w)
    out = torch.empty(m, n, dtype=torch.bfloat16)
    t0 = time.perf_counter()
    gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    t_fp8 = time.perf_counter() - t0
    dense_diff = calc_diff(out, x.float() @ w.float().T)

    sizes = group_sizes(4, 64, empty=(2,))
    glhs, grhs, gout, m_indices, gref = construct_contiguous(sizes, 256, 384)
    m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(glhs, grhs, gout, m_indices)
    contiguous_diff = calc_diff(gout, gref)

    masked = [17, 0, 40, 3]
    mlhs, mrhs, mout, masked_m, mref = construct_masked(masked, 64, 256, 384)
    m_grouped_gemm_fp8_fp8_bf16_nt_masked(mlhs, mrhs, mout, masked_m, expected_m=20)
    # One calc_diff over all valid rows: a 3-row group alone is too small a sample for the 1e-3 gate.
    valid = [(mout[g, :s], mref[g, :s]) for g, s in enumerate(masked) if s]
    masked_diff = calc_diff(torch.cat([o for o, _ in valid]), torch.cat([r for _, r in valid]))
    untouched = all(bool(mout[g, s:].isnan().all()) for g, s in enumerate(masked))

    fp8_losses, fp32_losses = _train(True), _train(False)
    result = {
        "dense": {"shape": [m, n, k], "calc_diff": dense_diff, "seconds": t_fp8},
        "contiguous": {"group_sizes": sizes, "calc_diff": contiguous_diff},
        "masked": {"masked_m": masked, "calc_diff": masked_diff, "padding_untouched": untouched},
        "fp8linear": {"fp8_losses": fp8_losses, "fp32_losses": fp32_losses},
    }
    (workdir / "gemm_demo.json").write_text(json.dumps(result, indent=2) + "\n")
    return {
        "dense FP8 GEMM": f"{m}x{n}x{k}, calc_diff {dense_diff:.1e} (DeepGEMM gate 1e-3), {t_fp8 * 1e3:.1f} ms",
        "grouped GEMMs": f"contiguous calc_diff {contiguous_diff:.1e}, masked {masked_diff:.1e}, "
        f"padding untouched: {untouched}",
        "FP8Linear MLP": f"loss {fp8_losses[0]:.4f} -> {fp8_losses[-1]:.4f} (fp32 twin: {fp32_losses[-1]:.4f})",
        "results": str(workdir / "gemm_demo.json"),
    }
