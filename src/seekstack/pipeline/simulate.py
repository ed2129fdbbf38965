"""Discrete-event simulation of a schedule: each rank runs its actions in order, waiting for its data.

It proves a set of per-rank schedules deadlock-free (receives block, sends do not, as in the executor) and gives
the ideal makespan and per-rank bubble for chosen F, B, W and F&B durations, the yardstick for measured runs.

>>> from seekstack.pipeline.schedules import dualpipe, dualpipe_topology
>>> sim = simulate([dualpipe(r, 4, 8) for r in range(4)], [dualpipe_topology(r, 4) for r in range(4)])
>>> sim.makespan > 0
True
"""

from __future__ import annotations

from dataclasses import dataclass, field

from seekstack.pipeline.schedules import Action, Topology


@dataclass
class SimResult:
    makespan: float
    busy: list[float]
    events: list[dict] = field(default_factory=list)

    @property
    def bubble(self) -> list[float]:
        """Idle time of each rank between the first start and the last end of the whole step."""
        return [self.makespan - b for b in self.busy]


class DeadlockError(RuntimeError):
    """The schedules wait on each other in a cycle."""


def durations(f: float = 1.0, b: float = 2.0, w: float = 1.0, fb: float | None = None) -> dict[str, float]:
    """Op durations; `b` is a full backward, `b - w` a backward with its weight gradients deferred."""
    return {"F": f, "B": b, "Bz": b - w, "W": w, "FB": f + b if fb is None else fb}


def simulate(
    schedules: list[list[Action]], topologies: list[Topology], times: dict[str, float] | None = None
) -> SimResult:
    """Run the compute actions of all ranks; raise DeadlockError if some rank can never proceed."""
    times = times or durations()
    n = len(schedules)
    done: dict[tuple, float] = {}  # ("F"|"B", rank, slot, chunk) -> finish time
    clock = [0.0] * n
    busy = [0.0] * n
    pos = [0] * n
    acts = [[a for a in s if a.op in ("F", "B", "W", "FB")] for s in schedules]
    events: list[dict] = []

    def ready_time(rank: int, kind: str, slot: int, chunk: int) -> float | None:
        topo = topologies[rank]
        if kind == "F":
            src = topo.prev[slot]
            if src == "data":
                return 0.0
            key = ("F", rank, slot ^ 1, chunk) if src == "local" else ("F", src, slot, chunk)
        else:
            dst = topo.next[slot]
            if dst == "loss":
                return done.get(("F", rank, slot, chunk))
            key = ("B", rank, slot ^ 1, chunk) if dst == "local" else ("B", dst, slot, chunk)
        return done.get(key)

    progress = True
    while progress:
        progress = False
        for r in range(n):
            while pos[r] < len(acts[r]):
                a = acts[r][pos[r]]
                deps: list[float | None] = []
                if a.op in ("F", "FB"):
                    deps.append(ready_time(r, "F", a.phase, a.chunk))
                if a.op == "B":
                    deps.append(ready_time(r, "B", a.phase, a.chunk))
                if a.op == "FB":
                    deps.append(ready_time(r, "B", a.b_phase, a.b_chunk))
                if any(d is None for d in deps):
                    break
                start = max([clock[r], *deps])
                dur = times["Bz"] if (a.op == "B" and a.zb) else times[a.op]
                end = start + dur
                if a.op in ("F", "FB"):
                    done[("F", r, a.phase, a.chunk)] = end
                if a.op == "B":
                    done[("B", r, a.phase, a.chunk)] = end
                if a.op == "FB":
                    done[("B", r, a.b_phase, a.b_chunk)] = end
                events.append(
                    {"rank": r, "label": str(a), "op": a.op, "phase": a.phase, "zb": a.zb, "start": start, "end": end}
                )
                clock[r] = end
                busy[r] += dur
                pos[r] += 1
                progress = True
    stuck = [r for r in range(n) if pos[r] < len(acts[r])]
    if stuck:
        raise DeadlockError(f"ranks {stuck} wait forever at {[str(acts[r][pos[r]]) for r in stuck]}")
    return SimResult(makespan=max(clock), busy=busy, events=events)


def dualpipe_bubble_formula(pp: int, f_and_b: float, b: float, w: float) -> float:
    """The README's DualPipe/DualPipeV bubble (PP/2-1)(F&B+B-3W), PP being the number of stages (even)."""
    return (pp / 2 - 1) * (f_and_b + b - 3 * w)


def linear_bubble_formula(schedule: str, pp: int, f: float, b: float, w: float) -> float:
    """The README's 1F1B bubble (PP-1)(F+B) and ZB1P bubble (PP-1)(F+B-2W)."""
    if schedule in ("1f1b", "gpipe"):
        return (pp - 1) * (f + b)
    if schedule == "zb1p":
        return (pp - 1) * (f + b - 2 * w)
    raise ValueError(f"schedule: no formula for {schedule!r}")
