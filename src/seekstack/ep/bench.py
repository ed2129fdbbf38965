"""`seekstack bench ep`: dispatch/combine bandwidth vs a raw `all_to_all_single` moving the same bytes, same run.

DeepEP's byte accounting: a token copy costs 2H bytes in bf16 and H + 4H/128 in fp8 (data + scales), local copies
included. The baseline is an uneven `all_to_all_single` of preallocated uint8 buffers with exactly those byte
splits, so `vs raw` is the fraction of the transport's bandwidth that dispatch/combine keep (target ≥ 0.9).
DeepEP's shape is 4 ranks, 4096 tokens, H = 7168, top-8 of 256 experts; the CPU default (gloo, 4 ranks on 127.0.0.1)
is scaled down. `--backend nccl` runs one rank per GPU on CUDA tensors at DeepEP's shape.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _bench_rank(rank: int, world_size: int, cfg: dict) -> dict:
    import statistics

    import torch
    import torch.distributed as dist

    from seekstack.bench.harness import measure
    from seekstack.ep import Buffer, fused_sum, per_token_cast_to_fp8

    T, H, E, K = cfg["tokens"], cfg["hidden"], cfg["experts"], cfg["topk"]
    dev = torch.device("cuda", torch.cuda.current_device()) if cfg["backend"] == "nccl" else torch.device("cpu")
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    g = torch.Generator().manual_seed(1234 + rank)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16).to(dev)
    idx = torch.topk(torch.randn(T, E, generator=g).abs() + 1, K, dim=1).indices.to(dev)
    w = torch.rand(T, K, generator=g).to(dev)
    buf = Buffer(timeout_s=300, transport=cfg["transport"])
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, **layout)
    fp8 = per_token_cast_to_fp8(x)
    send_tok = [int(v) for v in per_rank.tolist()]
    recv_tok = list(handle.recv_splits)

    def paired(op, base) -> tuple[float, float]:
        """Median seconds of `op` and of `base`, the slowest rank's. The two alternate call by call, so drifting
        load on a shared machine hits both alike, and the barrier before each call stays outside the timing."""
        times: tuple[list[float], list[float]] = ([], [])
        op(), base()  # warm-up
        for _ in range(cfg["repeats"]):
            for i, fn in enumerate((op, base)):
                dist.barrier()
                times[i].append(measure(fn, warmup=0, repeats=1, sync=sync))
        t = torch.tensor([statistics.median(times[0]), statistics.median(times[1])], device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t[0]), float(t[1])

    def raw(send_rows, recv_rows, bytes_per_row):
        send = torch.empty(sum(send_rows) * bytes_per_row, dtype=torch.uint8, device=dev)
        recv = torch.empty(sum(recv_rows) * bytes_per_row, dtype=torch.uint8, device=dev)
        s = [n * bytes_per_row for n in send_rows]
        r = [n * bytes_per_row for n in recv_rows]
        return lambda: dist.all_to_all_single(recv, send, r, s)

    def gbps(rows: int, bytes_per_row: int, seconds: float) -> float:
        total = torch.tensor([rows * bytes_per_row], dtype=torch.float64, device=dev)
        dist.all_reduce(total)  # all ranks' bytes over the slowest rank's time
        return float(total) / seconds / 1e9

    bf16_bytes, fp8_bytes = 2 * H, H + 4 * H // 128
    rows = []
    cases = [
        (
            "dispatch bf16",
            lambda: buf.dispatch(x, topk_idx=idx, topk_weights=w, **layout),
            send_tok,
            recv_tok,
            bf16_bytes,
        ),
        (
            "dispatch fp8",
            lambda: buf.dispatch(fp8, topk_idx=idx, topk_weights=w, **layout),
            send_tok,
            recv_tok,
            fp8_bytes,
        ),
        ("dispatch bf16 cached", lambda: buf.dispatch(x, handle=handle), send_tok, recv_tok, bf16_bytes),
        ("combine bf16", lambda: buf.combine(recv_x, handle, topk_weights=recv_w), recv_tok, send_tok, bf16_bytes),
    ]
    for name, fn, s_rows, r_rows, bpr in cases:
        t_op, t_raw = paired(fn, raw(s_rows, r_rows, bpr))
        n = sum(s_rows)
        rows.append([name, t_op * 1e3, gbps(n, bpr, t_op), t_raw * 1e3, gbps(n, bpr, t_raw), t_raw / t_op])

    # Low latency: 128 tokens per rank, fp8 dispatch, bf16 combine; latency next to the same bytes moved raw.
    ll = Buffer(low_latency_mode=True, timeout_s=300, transport=cfg["transport"])
    M = cfg["ll_tokens"]
    lx, lidx, lw = x[:M].contiguous(), idx[:M].contiguous(), w[:M].contiguous()
    recv, _, ll_handle, _, _ = ll.low_latency_dispatch(lx, lidx, M, E, use_fp8=False)
    row_bytes = fp8_bytes + 4 * K + 4  # the wire row: data + scales + int32 top-k ids + tag, a fixed block per peer
    ll_raw = raw([M] * world_size, [M] * world_size, row_bytes)
    t_d, t_draw = paired(lambda: ll.low_latency_dispatch(lx, lidx, M, E, use_fp8=True), ll_raw)
    n_copies = int((lidx >= 0).sum())
    rows.append(
        [
            "LL dispatch fp8",
            t_d * 1e3,
            gbps(n_copies, fp8_bytes + 16, t_d),
            t_draw * 1e3,
            gbps(n_copies, fp8_bytes + 16, t_draw),
            t_draw / t_d,
        ]
    )
    back = list(ll_handle.back_splits)
    El = E // world_size
    dest = (lidx[lidx >= 0] // El).bincount(minlength=world_size).tolist()
    t_c, t_craw = paired(lambda: ll.low_latency_combine(recv, lidx, lw, ll_handle), raw(back, dest, bf16_bytes))
    rows.append(
        [
            "LL combine bf16",
            t_c * 1e3,
            gbps(n_copies, bf16_bytes, t_c),
            t_craw * 1e3,
            gbps(n_copies, bf16_bytes, t_craw),
            t_craw / t_c,
        ]
    )
    return {"rows": rows, "compiled_sum": fused_sum.SUM.calls > 0}


def main(argv: list[str] | None = None) -> int:
    from seekstack.bench.harness import Report

    from .launch import run_ranks

    p = argparse.ArgumentParser(prog="seekstack bench ep", description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo", help="gloo on CPU; nccl: one rank per GPU")
    p.add_argument("--ranks", type=int, default=None, help="default: 4 (gloo), the GPU count (nccl)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per rank (default 1024; nccl: DeepEP's 4096)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (default 2048; nccl: DeepEP's 7168)")
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--ll-tokens", type=int, default=128, help="low-latency tokens per rank")
    p.add_argument("--repeats", type=int, default=9, help="timed calls of each case (alternating with its baseline)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument(
        "--transport",
        choices=("auto", "shm", "p2p", "all_to_all"),
        default="auto",
        help="normal-mode wire (auto: shared windows on one host with gloo; see seekstack.ep.Buffer)",
    )
    args = p.parse_args(argv)
    nccl = args.backend == "nccl"
    gpus = 0
    if nccl:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not gpus:
            p.error("--backend nccl needs CUDA")
        if args.ranks is not None and args.ranks > gpus:
            p.error(f"--ranks: NCCL needs one GPU per rank, {gpus} available")
    args.ranks = args.ranks if args.ranks is not None else (gpus if nccl else 4)
    args.tokens = args.tokens if args.tokens is not None else (4096 if nccl else 1024)
    args.hidden = args.hidden if args.hidden is not None else (7168 if nccl else 2048)
    for name in ("ranks", "tokens", "hidden", "experts", "topk", "ll_tokens", "repeats"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.hidden % 128 or args.experts % args.ranks or args.ll_tokens > args.tokens:
        p.error("--hidden must be a multiple of 128, --experts of --ranks, and --ll-tokens <= --tokens")
    keys = ("tokens", "hidden", "experts", "topk", "ll_tokens", "repeats", "backend", "transport")
    cfg = {k: getattr(args, k) for k in keys}
    result = run_ranks(
        str(Path(__file__).resolve()),
        "_bench_rank",
        args.ranks,
        args=(cfg,),
        timeout_s=900,
        threads=args.threads,
        backend=args.backend,
    )[0]
    rows, compiled = result["rows"], result["compiled_sum"]
    report = Report("ep", columns=["case", "ms", "GB/s", "raw a2a ms", "raw GB/s", "vs raw"])
    report.params = {"ranks": args.ranks, **cfg, "compiled_combine_sum": compiled}
    for r in rows:
        report.add(r[0], round(r[1], 3), round(r[2], 3), round(r[3], 3), round(r[4], 3), round(r[5], 3))
    normal = [r[5] for r in rows if not r[0].startswith("LL")]
    report.note(
        f"target: dispatch/combine >= 0.9 of raw all_to_all_single; worst normal-mode ratio {min(normal):.2f} "
        f"({'met' if min(normal) >= 0.9 else 'not met'})"
    )
    report.note(
        "combine sum: "
        + ("one compiled loop (seekstack.ep.fused_sum)" if compiled else "eager (widen, embedding_bag, cast)")
    )
    report.note("GB/s: DeepEP byte accounting (bf16 2H, fp8 H + 4H/128 per token copy), all ranks / slowest rank")
    report.emit()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
