"""`seekstack bench pipeline`: step time and bubble of DualPipe, DualPipeV, 1F1B, ZB1P and GPipe in one run.

All schedules get the same model (the same work per micro-batch, split into their number of stages), the same
ranks and the same micro-batches. Figures are ratios to 1F1B measured in the same run, and each measured bubble
is set against the README formula evaluated with the op times measured in that run.
"""

from __future__ import annotations

import argparse

from seekstack.bench import Report
from seekstack.pipeline.launch import spawn
from seekstack.pipeline.timeline import bubble_stats
from seekstack.pipeline.workloads import RunConfig, record_many

ORDER = ["1f1b", "zb1p", "dualpipe", "dualpipev", "torch-1f1b"]  # "gpipe" on request


def _has_torch_pipelining() -> bool:
    try:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="seekstack bench pipeline", description=__doc__)
    p.add_argument("--ranks", type=int, default=4)
    # The bubble formulas do not depend on the number of micro-batches, but the P2P hops on the critical path do:
    # few chunks and long ops keep the fixed per-message cost (gloo latency, executor bookkeeping) small
    # next to the bubble itself, so the measured bubble can be held against the formula.
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--model", choices=["sleep", "mlp"], default="sleep")
    p.add_argument("--f", type=float, default=0.8, help="sleep model: forward seconds per micro-batch, whole model")
    p.add_argument("--b", type=float, default=1.6)
    p.add_argument("--w", type=float, default=0.8)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--schedules", default=",".join(ORDER), help="torch-1f1b is torch.distributed.pipelining's")
    args = p.parse_args(argv)
    names = [s for s in args.schedules.split(",") if s and (s != "torch-1f1b" or _has_torch_pipelining())]
    if "1f1b" not in names:
        names.insert(0, "1f1b")  # the baseline every ratio refers to
    cfgs = [
        RunConfig(s, args.chunks, args.model, args.f, args.b, args.w, warmup=args.warmup, repeats=args.repeats)
        for s in names
    ]
    runs = spawn(record_many, args.ranks, cfgs, timeout_s=600)[0]
    base = next(r for r in runs if r["schedule"] == "1f1b")["step_time"]
    report = Report(
        "pipeline",
        ["schedule", "step_ms", "step_vs_1f1b", "bubble_frac", "bubble_ms", "formula_ms", "bubble_vs_formula"],
    )
    report.params = vars(args)
    for run in runs:
        if not run["events"]:  # torch.distributed.pipelining: step time only
            nan = float("nan")
            report.add(run["schedule"], run["step_time"] * 1e3, run["step_time"] / base, nan, nan, nan, nan)
            continue
        st = bubble_stats(run["events"], run["schedule"], args.ranks)
        ratio = st["bubble_max"] / st["formula"] if st["formula"] > 0 else float("nan")
        report.add(
            run["schedule"], run["step_time"] * 1e3, run["step_time"] / base, st["bubble_fraction"],
            st["bubble_max"] * 1e3, st["formula"] * 1e3, ratio,
        )  # fmt: skip
    dual = next((r["step_time"] for r in runs if r["schedule"] == "dualpipe"), None)
    if dual is not None:
        verdict = "met" if dual <= base else "missed"
        report.note(f"target DualPipe step <= 1F1B step: {verdict} ({dual / base:.3f}x)")
    report.note("bubble_ms: worst rank's idle time (step span minus its busy time) in the recorded step; nothing is")
    report.note("  subtracted: P2P wire latency and executor bookkeeping on the critical path count as bubble.")
    report.note("formula_ms: README formula with the F, B, W, F&B medians measured in the same step (an action's")
    report.note("  time runs from its inputs being ready to its sends being issued).")
    report.emit()
    return 0
