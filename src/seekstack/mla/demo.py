"""`seekstack demo` stage: MLA decoding over a paged latent cache, checked against the fp32 reference.

One decoding step of a small DeepSeek-shaped batch (d = 576, dv = 512, 16 heads, 2 query tokens for MTP, causal,
varlen, 64-token pages, NaN in every unused slot): the split-KV plan, the device's own backend, the 656-byte FP8
cache, sparse top-k decoding and, when Triton is installed, the Triton kernels (interpreted on CPU).
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import torch

from seekstack.mla import flash_mla_with_kvcache, get_mla_metadata, pack_fp8_kvcache
from seekstack.mla.interface import default_backend
from seekstack.mla.testing import check_decode, make_case


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    finite = b.isfinite()
    return float((a.float()[finite] - b.float()[finite]).abs().max())


def run_demo(workdir: Path) -> dict[str, str]:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    b, s_q, h_q, s_k = 8, 2, 16, 512
    case = make_case(b, s_q, h_q, 1, s_k, varlen=True, zero_lengths=1, causal=True, device=device, generator=gen)
    summary: dict[str, str] = {}

    meta, splits = get_mla_metadata(case.cache_seqlens, s_q * h_q, 1)
    summary["batch"] = f"b={b} s_q={s_q} h_q={h_q} lengths {case.cache_seqlens.tolist()} (one empty), page 64"
    meta132, splits132 = get_mla_metadata(case.cache_seqlens, s_q * h_q, 1, num_sms=132)
    summary["plan"] = (
        f"{meta.shape[0]} workers here, pieces per request {(splits[1:] - splits[:-1]).tolist()}; "
        f"on a 132-SM GPU {meta132.shape[0]} workers, pieces {(splits132[1:] - splits132[:-1]).tolist()}"
    )

    backend = default_backend(torch.device(device))
    ref = flash_mla_with_kvcache(*case.args(), **case.kwargs(), backend="reference")
    flash_mla_with_kvcache(*case.args(), meta, splits, **case.kwargs())  # warm-up
    t0 = time.perf_counter()
    out, lse = flash_mla_with_kvcache(*case.args(), meta, splits, **case.kwargs())
    elapsed = time.perf_counter() - t0
    check_decode(out, lse, *ref)
    empty = int((case.cache_seqlens == 0).nonzero()[0])
    summary[backend] = (
        f"{elapsed * 1e3:.1f} ms, matches the fp32 reference (max |out - ref| {_max_err(out, ref[0]):.1e}, "
        f"max |lse - ref| {_max_err(lse, ref[1]):.1e}); empty request {empty}: out = "
        f"{float(out[empty].abs().max()):g}, lse = {float(lse[empty].min())}"
    )

    packed = pack_fp8_kvcache(case.k_cache)
    out8, lse8 = flash_mla_with_kvcache(*case.args()[:1], packed, *case.args()[2:], is_fp8_kvcache=True, causal=True)
    check_decode(out8, lse8, *flash_mla_with_kvcache(*case.args()[:1], packed, *case.args()[2:], is_fp8_kvcache=True,
                                                     causal=True, backend="reference"))  # fmt: skip
    bf16_bytes = case.k_cache.shape[-1] * case.k_cache.element_size()
    summary["fp8 cache"] = (
        f"{packed.shape[-1]} bytes/token vs {bf16_bytes} in bf16 ({packed.shape[-1] / bf16_bytes:.0%}); matches the "
        f"reference on the dequantized cache; max |out_fp8 - out_bf16| {_max_err(out8, out):.1e}"
    )

    sparse = make_case(b, s_q, h_q, 1, s_k, topk=64, fp8=True, device=device, generator=gen)
    out_s, lse_s = flash_mla_with_kvcache(*sparse.args(), **sparse.kwargs())
    check_decode(out_s, lse_s, *flash_mla_with_kvcache(*sparse.args(), **sparse.kwargs(), backend="reference"))
    skipped = int((sparse.indices < 0).sum())
    summary["sparse"] = f"top-64 slots per query token ({skipped} of {sparse.indices.numel()} are -1), FP8 cache: ok"

    if importlib.util.find_spec("triton") is None:  # not imported here: the interpreter must be set up first
        summary["triton"] = "not installed (pip install seekstack[triton])"
    elif backend != "triton":  # on CUDA the kernels already ran above
        small = make_case(3, 2, 16, 1, 200, block_size=16, varlen=True, causal=True, generator=gen)
        m, sp = get_mla_metadata(small.cache_seqlens, 2 * 16, 1, num_sms=8)
        t0 = time.perf_counter()
        out_t, lse_t = flash_mla_with_kvcache(*small.args(), m, sp, **small.kwargs(), backend="triton")
        elapsed = time.perf_counter() - t0
        check_decode(out_t, lse_t, *flash_mla_with_kvcache(*small.args(), **small.kwargs(), backend="reference"))
        summary["triton"] = f"interpreted split-KV + combine, {int(sp[-1])} pieces / 3 requests: ok in {elapsed:.1f} s"

    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
