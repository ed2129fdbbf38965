"""`seekstack bench gemm`: FP8 GEMMs next to the torch matmul of the same shape, measured in the same run.

Shapes are DeepGEMM's published ones (M in {64, 128, 4096}; six (N, K) pairs) and its grouped shapes. On CPU they
are scaled down (M 4096 -> 1024, N and K / 4) so the run takes about a minute; `--full` keeps them. The baseline
is an fp32 matmul on CPU and a bf16 cuBLAS matmul on CUDA. Targets: CPU FP8 time <= 1.5x the fp32 matmul time;
on an H200, >= 1.2x the bf16 cuBLAS rate on the M = 4096 shapes.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from seekstack.bench import Report, measure

from .casting import per_block_cast_to_fp8, per_token_cast_to_fp8
from .dense import gemm_fp8_fp8_bf16_nt
from .grouped import m_grouped_gemm_fp8_fp8_bf16_nt_contiguous, m_grouped_gemm_fp8_fp8_bf16_nt_masked
from .numeric import calc_diff
from .testing import construct_contiguous, construct_masked

DENSE_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
DENSE_M = [64, 128, 4096]
# (groups, rows per group, N, K): DeepGEMM's contiguous and masked benchmark shapes.
CONTIGUOUS = [(4, 8192, 4096, 7168), (8, 4096, 7168, 2048)]
MASKED = [(1, 1024, 4096, 7168), (2, 512, 7168, 2048), (4, 256, 4096, 7168)]
COLUMNS = [
    "case", "M", "N", "K", "fp8 ms", "fp8 TFLOP/s", "base ms", "base TFLOP/s", "fp8/base time", "calc_diff"
]  # fmt: skip


def _scale(shape: tuple[int, ...], full: bool, divisor: int) -> tuple[int, ...]:
    return shape if full else tuple(max(1, s // divisor) for s in shape)


def _bmm_baseline(groups: int, rows: int, n: int, k: int, device, dtype):
    """The unquantised grouped GEMM of the same shape: one batched matmul over the G weight matrices."""
    a = torch.randn(groups, rows, k, device=device, dtype=dtype)
    b = torch.randn(groups, n, k, device=device, dtype=dtype)
    return partial(torch.bmm, a, b.transpose(1, 2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="seekstack bench gemm", description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="DeepGEMM's shapes unscaled (for a GPU)")
    p.add_argument("--backend", choices=["cpu", "triton", "reference"], default=None)
    p.add_argument("--repeats", type=int, default=9, help="alternating rounds per case (best of)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: ratios stay stable when other processes share the cores; 0: torch's)",
    )
    p.add_argument("--quick", action="store_true", help="one shape per table (smoke test)")
    args = p.parse_args(argv)

    if args.threads and not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    full = args.full
    # --quick (a smoke test) shrinks everything a further 4x.
    nk_div, rows_div = (16, 16) if args.quick else (4, 4)
    sync = torch.cuda.synchronize if cuda else None
    base_dtype = torch.bfloat16 if cuda else torch.float32
    base_name = "bf16 cuBLAS" if cuda else "fp32 torch.mm"
    # Times are each side's best of `repeats` alternating calls (see `row`).
    report = Report("gemm", COLUMNS)
    report.params = {
        "device": device,
        "full": full,
        "baseline": base_name,
        "backend": args.backend or "default",
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
    }
    if not cuda:  # which CPU decode ran: the C pass or the eager torch passes (no compiler, or switched off)
        from .native_decode import available

        report.params["cpu_decode"] = "native" if available() else "eager"

    small: list[float] = []  # ratios where each weight matrix meets <= 256 rows (memory-bound side)
    large: list[float] = []

    def row(case, m, n, k, fn_fp8, fn_base, diff, rows_per_weight=None):
        # The two sides alternate call by call, and each side's time is its best of `repeats`: on a shared CPU a
        # preempted call measures the neighbours, not the code (medians of 1-ms cases swung 0.5x..5x here).
        measure(fn_fp8, warmup=1, repeats=1, sync=sync)
        measure(fn_base, warmup=1, repeats=1, sync=sync)
        t8s, tbs = [], []
        for _ in range(args.repeats):
            t8s.append(measure(fn_fp8, warmup=0, repeats=1, sync=sync))
            tbs.append(measure(fn_base, warmup=0, repeats=1, sync=sync))
        t8, tb = min(t8s), min(tbs)
        ratio = t8 / tb
        flops = 2 * m * n * k
        report.add(
            case,
            m,
            n,
            k,
            round(t8 * 1e3, 3),
            round(flops / t8 / 1e12, 4),
            round(tb * 1e3, 3),
            round(flops / tb / 1e12, 4),
            round(ratio, 2),
            f"{diff:.1e}",
        )
        (small if (rows_per_weight or m) <= 256 else large).append(ratio)
        return ratio

    ms = [m if full else min(m, 1024) for m in DENSE_M]
    nks = DENSE_NK[:1] if args.quick else DENSE_NK
    ratios_4096 = []
    for m in ms[:1] if args.quick else ms:
        for n0, k0 in nks:
            n, k = _scale((n0, k0), full, nk_div)
            a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            b = torch.randn(n, k, device=device, dtype=torch.bfloat16)
            lhs, rhs = per_token_cast_to_fp8(a), per_block_cast_to_fp8(b)
            out = torch.empty(m, n, device=device, dtype=torch.bfloat16)
            gemm_fp8_fp8_bf16_nt(lhs, rhs, out, backend=args.backend)
            diff = calc_diff(out, a.float() @ b.float().T)
            r = row(
                "dense",
                m,
                n,
                k,
                partial(gemm_fp8_fp8_bf16_nt, lhs, rhs, out, backend=args.backend),
                partial(torch.mm, a.to(base_dtype), b.to(base_dtype).T),
                diff,
            )
            if m == ms[-1]:
                ratios_4096.append(r)

    for g0, mg0, n0, k0 in CONTIGUOUS[:1] if args.quick else CONTIGUOUS:
        (mg,), (n, k) = _scale((mg0,), full, 4 * rows_div), _scale((n0, k0), full, nk_div)
        lhs, rhs, out, m_indices, ref = construct_contiguous([mg] * g0, n, k, device=device)
        m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, rhs, out, m_indices, backend=args.backend)
        diff = calc_diff(out, ref)
        row(
            f"contiguous {g0}x{mg}",
            out.shape[0],
            n,
            k,
            partial(m_grouped_gemm_fp8_fp8_bf16_nt_contiguous, lhs, rhs, out, m_indices, backend=args.backend),
            _bmm_baseline(g0, mg, n, k, device, base_dtype),
            diff,
            rows_per_weight=mg,
        )

    for g0, mg0, n0, k0 in MASKED[:1] if args.quick else MASKED:
        (mg,), (n, k) = _scale((mg0,), full, rows_div), _scale((n0, k0), full, nk_div)
        lhs, rhs, out, masked_m, ref = construct_masked([mg] * g0, mg, n, k, device=device)
        m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, mg, backend=args.backend)
        diff = calc_diff(out, ref)
        row(
            f"masked {g0}x{mg}",
            g0 * mg,
            n,
            k,
            partial(m_grouped_gemm_fp8_fp8_bf16_nt_masked, lhs, rhs, out, masked_m, mg, backend=args.backend),
            _bmm_baseline(g0, mg, n, k, device, base_dtype),
            diff,
            rows_per_weight=mg,
        )

    if cuda:
        speed = [1 / r for r in ratios_4096]
        report.note(f"M={ms[-1]}: FP8 rate / bf16 cuBLAS rate = {min(speed):.2f}..{max(speed):.2f} (target >= 1.2)")
    else:
        for label, ratios in (("M <= 256", small), ("M > 256", large)):
            if ratios:
                worst = max(ratios)
                verdict = "met" if worst <= 1.5 else "NOT met"
                report.note(f"{label}: FP8 time / fp32 time worst {worst:.2f} (target <= 1.5: {verdict})")
        report.note("grouped baselines: torch.bmm over the same G weight matrices")
    report.emit()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
