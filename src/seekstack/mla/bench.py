"""`seekstack bench mla`: MLA decoding against the roofline and against the reference path.

FlashMLA's formulas (`tests/test_flash_mla_dense_decoding.py`), with S the mean cached length:
    FLOPs = 2 * b * s_q * h_q * S * (d + dv)
    bytes = b * (s_q * h_q * d * e + S * h_kv * kv_bytes_per_token + s_q * h_q * dv * e)    (e = 2 for bf16)
Both ceilings are measured in the same run, on the same device and with the same torch thread count as the
decode: copy bandwidth from a large tensor copy (2 x bytes per copy), matmul rate from torch.matmul on a square
matrix (the best of fp32 and bf16). Each is measured before and after the rows and the better value kept: a
ceiling is the most the machine delivers, and a neighbour's burst must not lower it. The roofline time is
max(bytes / bandwidth, FLOPs / matmul rate); a row's "% roof" is roofline time / measured (median) time. On CPU
the params also give the rate of the two matmuls alone at the decode's own shapes (keys [2048, d] x q^T [d, M],
P [M, 2048] x V [2048, dv]), which small M cannot reach the square matrix's rate with.

The decode is timed on a validated problem (the argument checks, one host sync, are left out, as FlashMLA times its
kernel alone); the plan (`get_mla_metadata`) is built once per shape, as an engine builds it once per step.
"""

from __future__ import annotations

import argparse
import functools

import torch

from seekstack.bench import Report, measure
from seekstack.mla.fp8_cache import fp8_bytes_per_token
from seekstack.mla.interface import default_backend, validate
from seekstack.mla.metadata import get_mla_metadata
from seekstack.mla.reference import mla_decode_reference
from seekstack.mla.testing import make_case

D, DV = 576, 512
CPU_TARGET = 0.60  # fraction of the roofline
GPU_MEMORY_TARGET = 0.80  # fraction of measured copy bandwidth, memory-bound shapes
GPU_COMPUTE_TARGET = 0.50  # fraction of measured matmul rate at h_q = 128


def flops_and_bytes(b, s_q, h_q, h_kv, mean_sk, elem=2, kv_bytes_per_token=None, d=D, dv=DV) -> tuple[float, float]:
    kv = d * elem if kv_bytes_per_token is None else kv_bytes_per_token
    flops = 2.0 * b * s_q * h_q * mean_sk * (d + dv)
    nbytes = b * (s_q * h_q * d * elem + mean_sk * h_kv * kv + s_q * h_q * dv * elem)
    return flops, float(nbytes)


def _sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else None


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes per second of a large device copy, counting the read and the write."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), warmup=2, repeats=10, sync=_sync(device))
    return 2 * nbytes / t


def matmul_rate(device: torch.device, n: int, dtypes: tuple[torch.dtype, ...]) -> tuple[float, str]:
    """The best FLOP/s of torch.matmul on n x n matrices over `dtypes`, and which dtype gave it."""
    best, which = 0.0, ""
    for dtype in dtypes:
        a = torch.randn(n, n, device=device).to(dtype)
        bm = torch.randn(n, n, device=device).to(dtype)
        t = measure(functools.partial(torch.matmul, a, bm), warmup=2, repeats=5, sync=_sync(device))
        if 2 * n**3 / t > best:
            best, which = 2 * n**3 / t, str(dtype).removeprefix("torch.")
    return best, which


def decode_matmul_rate(device: torch.device, m: int, tokens: int = 2048, d: int = D, dv: int = DV) -> float:
    """FLOP/s of the decode's two fp32 matmuls at their own shapes for M query rows: keys @ q^T and P @ V."""
    keys = torch.randn(tokens, d, device=device)
    q_t = torch.randn(m, d, device=device).t()
    probs_t = torch.rand(tokens, m, device=device).t()
    scores, out = torch.empty(tokens, m, device=device), torch.empty(m, dv, device=device)

    def both():
        torch.matmul(keys, q_t, out=scores)
        torch.matmul(probs_t, keys[:, :dv], out=out)

    t = measure(both, warmup=2, repeats=10, sync=_sync(device))
    return 2 * m * tokens * (d + dv) / t


def shapes(device: torch.device, quick: bool) -> list[tuple[int, int, int, int]]:
    """(b, h_q, s_q, s_k): the issue's grid on a GPU, scaled down on CPU (b / 8, s_k / 4)."""
    if quick:
        return [(2, 16, 1, 256), (2, 128, 2, 256)]
    if device.type == "cuda":
        b, sks = 128, (1024, 4096, 16384)
    else:
        b, sks = 16, (256, 1024, 4096)
    return [(b, h_q, s_q, s_k) for h_q in (16, 128) for s_q in (1, 2) for s_k in sks]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="seekstack bench mla", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default=None, help="reference, cpu or triton (default: the device's own)")
    ap.add_argument("--fp8", action="store_true", help="FP8 KV cache (656 bytes per token)")
    ap.add_argument("--quick", action="store_true", help="two tiny shapes (a smoke test)")
    ap.add_argument("--no-reference", action="store_true", help="skip timing the reference path")
    ap.add_argument("--out", default=None, help="directory for mla.json (default benchmarks/results)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    backend = args.backend or default_backend(device)
    is_gpu = device.type == "cuda"

    copy_bytes = (64 if args.quick else 1024 if is_gpu else 512) << 20
    dtypes = (torch.bfloat16,) if is_gpu else (torch.float32, torch.bfloat16)  # CPU: the faster of the two
    square = 1024 if args.quick else 8192 if is_gpu else 2048
    bandwidth = copy_bandwidth(device, copy_bytes)
    rate, rate_dtype = matmul_rate(device, square, dtypes)

    report = Report(
        "mla",
        columns=["b", "h_q", "s_q", "s_k", "ms", "GB/s", "TFLOP/s", "roof ms", "% roof", "bound", "x ref"],
    )
    report.params.update(device=str(device), backend=backend, fp8=args.fp8, torch_threads=torch.get_num_threads())
    if backend == "cpu":  # the C kernel, or the PyTorch steps (no compiler or AVX-512, or switched off)
        from seekstack.mla.native import available

        report.params["cpu_kernel"] = "native" if available() else "pytorch"
    sync = _sync(device)
    rows = []
    for b, h_q, s_q, s_k in shapes(device, args.quick):
        case = make_case(b, s_q, h_q, 1, s_k, varlen=True, causal=True, fp8=args.fp8, device=device, poison=False)
        p = validate(*case.args(), None, **case.kwargs())
        kv_per_token = fp8_bytes_per_token(D, DV) if args.fp8 else None
        flops, nbytes = flops_and_bytes(b, s_q, h_q, 1, float(case.cache_seqlens.float().mean()), 2, kv_per_token)
        reference = functools.partial(mla_decode_reference, *case.args(), causal=p.causal, is_fp8_kvcache=args.fp8)
        if backend == "triton":
            from seekstack.mla.triton_decode import mla_decode_triton

            meta, splits = get_mla_metadata(case.cache_seqlens, p.rows, p.h_kv)
            run = functools.partial(mla_decode_triton, p, meta, splits)
        elif backend == "cpu":
            from seekstack.mla.cpu import mla_decode_cpu

            run = functools.partial(mla_decode_cpu, p)
        else:
            run = reference
        # CPU: at least 5 runs and 1 s (median), so one burst of a neighbour's work moves a row little.
        t = measure(run, warmup=2 if is_gpu else 1, repeats=20 if is_gpu else 5, sync=sync,
                    min_time=0.0 if is_gpu or args.quick else 1.0)  # fmt: skip
        speedup = "-"
        if not args.no_reference and backend != "reference":
            speedup = round(measure(reference, warmup=0, repeats=1, sync=sync) / t, 2)
        rows.append((b, h_q, s_q, s_k, flops, nbytes, t, speedup))

    # The ceilings again, after the rows: keep the better of the two measurements of each.
    bandwidth = max(bandwidth, copy_bandwidth(device, copy_bytes))
    rate_after, dtype_after = matmul_rate(device, square, dtypes)
    if rate_after > rate:
        rate, rate_dtype = rate_after, dtype_after
    report.params.update(copy_GBps=round(bandwidth / 1e9, 2), matmul_TFLOPs=round(rate / 1e12, 4),
                         matmul_dtype=rate_dtype)  # fmt: skip
    if not is_gpu:
        for m in sorted({s_q * h_q for _, h_q, s_q, *_ in rows}):
            report.params[f"decode_matmuls_TFLOPs_M{m}"] = round(decode_matmul_rate(device, m) / 1e12, 4)
    met = total = 0
    for b, h_q, s_q, s_k, flops, nbytes, t, speedup in rows:
        t_mem, t_flop = nbytes / bandwidth, flops / rate
        roof = max(t_mem, t_flop)
        bound = "memory" if t_mem >= t_flop else "compute"
        report.add(b, h_q, s_q, s_k, round(t * 1e3, 3), round(nbytes / t / 1e9, 1), round(flops / t / 1e12, 3),
                   round(roof * 1e3, 3), round(100 * roof / t, 1), bound, speedup)  # fmt: skip
        if is_gpu:
            if bound == "memory":
                total, met = total + 1, met + (nbytes / t >= GPU_MEMORY_TARGET * bandwidth)
            if h_q == 128:
                total, met = total + 1, met + (flops / t >= GPU_COMPUTE_TARGET * rate)
        else:
            total, met = total + 1, met + (roof / t >= CPU_TARGET)

    report.note(
        f"ceilings, same run, {torch.get_num_threads()} threads: copy {bandwidth / 1e9:.1f} GB/s, "
        f"matmul {rate / 1e12:.3f} TFLOP/s ({rate_dtype}, best of before and after the rows)"
    )
    if is_gpu:
        report.note(
            f"targets: memory-bound rows >= {GPU_MEMORY_TARGET:.0%} of copy bandwidth, h_q = 128 rows >= "
            f"{GPU_COMPUTE_TARGET:.0%} of the matmul rate: {met}/{total} met"
        )
    else:
        report.note(f"target: >= {CPU_TARGET:.0%} of the roofline: {met}/{total} rows met")
    report.note(f"backend {backend}, {'fp8' if args.fp8 else 'bf16'} KV, varlen lengths ~ Normal(s_k, s_k/2), causal")
    report.emit(args.out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
