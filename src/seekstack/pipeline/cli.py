"""`seekstack pipeline ...`: print schedules, simulate them, and record real runs as timelines.

seekstack pipeline schedule --schedule dualpipe --ranks 8 --chunks 20 [--out sim.png]
seekstack pipeline timeline --schedule dualpipe --ranks 4 --chunks 10 --out dualpipe.png
"""

from __future__ import annotations

import argparse

from seekstack.pipeline import schedules as S

NAMES = list(S.SCHEDULES)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--schedule", choices=NAMES, default="dualpipe")
    p.add_argument("--ranks", type=int, default=4, help="pipeline ranks (processes)")
    p.add_argument("--chunks", type=int, default=10, help="micro-batches per step")


def _schedule(args) -> int:
    from seekstack.pipeline.simulate import simulate
    from seekstack.pipeline.timeline import bubble_stats, plot

    n, c = args.ranks, args.chunks
    acts = [S.SCHEDULES[args.schedule](r, n, c) for r in range(n)]
    for r, a in enumerate(acts):
        counts = f" steps {S.step_counts(a)}" if args.schedule.startswith("dualpipe") else ""
        print(f"rank {r}:{counts}")
        print("   " + " ".join(str(x) for x in a))
    sim = simulate(acts, [S.TOPOLOGIES[args.schedule](r, n) for r in range(n)])
    stats = bubble_stats(sim.events, args.schedule, n)
    print(f"simulated with F=1 B=2 W=1 F&B=F+B: makespan {sim.makespan:g}, "
          f"max bubble {stats['bubble_max']:g}, README formula {stats['formula']:g}")  # fmt: skip
    if args.out:
        print(f"wrote {plot(sim.events, args.out, f'{args.schedule} (simulated)')}")
    return 0


def _timeline(args) -> int:
    from seekstack.pipeline.launch import spawn
    from seekstack.pipeline.timeline import bubble_stats, plot
    from seekstack.pipeline.workloads import RunConfig, record_many

    S.SCHEDULES[args.schedule](0, args.ranks, args.chunks)  # argument errors before spawning anything
    cfg = RunConfig(args.schedule, args.chunks, args.model, args.f, args.b, args.w, warmup=1, repeats=1)
    run = spawn(record_many, args.ranks, [cfg])[0][0]
    st = bubble_stats(run["events"], args.schedule, args.ranks)
    title = f"{args.schedule}: {args.ranks} ranks, {args.chunks} micro-batches ({args.model} model)"
    path = plot(run["events"], args.out, title)
    print(title)
    print(f"  step {run['step_time'] * 1e3:.1f} ms; op times (ms) F {st['F'] * 1e3:.2f}  B {st['B'] * 1e3:.2f}  "
          f"W {st['W'] * 1e3:.2f}  F&B {st['F&B'] * 1e3:.2f}")  # fmt: skip
    formula = "(PP/2-1)(F&B+B-3W)" if args.schedule.startswith("dualpipe") else "(PP-1)(F+B[-2W])"
    print(f"  measured bubble: max {st['bubble_max'] * 1e3:.1f} ms, mean {st['bubble_mean'] * 1e3:.1f} ms "
          f"({st['bubble_fraction']:.1%} of rank-time); formula {formula} = {st['formula'] * 1e3:.1f} ms")  # fmt: skip
    print(f"  wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="seekstack pipeline", description="DualPipe schedules and timelines")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("schedule", help="print each rank's actions and simulate the schedule")
    _add_common(p)
    p.add_argument("--out", help="also draw the simulated timeline into this PNG")
    p = sub.add_parser("timeline", help="record a real run on spawned gloo ranks and draw it")
    _add_common(p)
    p.add_argument("--model", choices=["sleep", "mlp"], default="sleep")
    p.add_argument("--f", type=float, default=0.08, help="sleep model: forward seconds per micro-batch, whole model")
    p.add_argument("--b", type=float, default=0.16, help="sleep model: full backward seconds (includes W)")
    p.add_argument("--w", type=float, default=0.08, help="sleep model: weight-gradient seconds")
    p.add_argument("--out", default="pipeline-timeline.png")
    args = parser.parse_args(argv)
    try:
        return _schedule(args) if args.cmd == "schedule" else _timeline(args)
    except ValueError as exc:
        parser.error(str(exc))
    return 2
