"""Pipeline schedules as data: pure functions `(rank, num_ranks, num_chunks) -> list[Action]`.

Every schedule here is run by the same executor (`seekstack.pipeline.executor`). A rank holds one or two local
*slots* (stage modules); `Action.phase` is the slot index (0 or 1), `Action.chunk` the micro-batch index within
that slot's stream. Compute ops:

- ``F``  forward of one chunk;
- ``B``  backward of one chunk (``zb=True``: weight gradients are deferred into the `WeightGradStore`);
- ``W``  run the oldest group of deferred weight gradients;
- ``FB`` one forward chunk and one backward chunk overlapped (`b_phase`/`b_chunk` name the backward one).

`with_comm` lowers a compute-only list by inserting ``RECV_F``/``SEND_F``/``RECV_B``/``SEND_B`` from a
`Topology`, which says where each slot's input comes from and where its output goes.

>>> acts = dualpipe(rank=0, num_ranks=8, num_chunks=20)
>>> step_counts(acts)
(6, 1, 3, 3, 3, 1, 3, 1)
>>> str(acts[0]), str(with_comm(acts, dualpipe_topology(0, 8))[1])
('F0.0', 'SEND_F0.0')
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

COMPUTE_OPS = ("F", "B", "W", "FB")
COMM_OPS = ("RECV_F", "SEND_F", "RECV_B", "SEND_B")


@dataclass(frozen=True)
class Action:
    """One entry of a rank's schedule. `step` is the DualPipe step (1..8) it belongs to, 0 for the baselines."""

    op: str
    phase: int = -1
    chunk: int = -1
    zb: bool = False
    b_phase: int = -1
    b_chunk: int = -1
    step: int = 0

    def __str__(self) -> str:
        if self.op == "W":
            return "W"
        if self.op == "FB":
            return f"F{self.phase}.{self.chunk}&B{self.b_phase}.{self.b_chunk}"
        return f"{self.op}{self.phase}.{self.chunk}{'z' if self.zb else ''}"


@dataclass(frozen=True)
class Topology:
    """Where each local slot's data comes from and goes to.

    `prev[p]` is ``"data"`` (the user's inputs), ``"local"`` (the other slot on this rank) or a PP rank;
    `next[p]` is ``"loss"`` (criterion and outputs), ``"local"`` or a PP rank.
    """

    prev: tuple
    next: tuple


# --------------------------------------------------------------------------------------------------------------
# DualPipe / DualPipeV: the same eight steps, parametrised by the rank's distance h from its entry end.


def _eight_step_counts(h: int, half: int, per_phase: int) -> tuple[int, ...]:
    """Repeat counts of the eight steps for a rank at distance `h` from the entry, `half` ranks per direction."""
    tail = half - h - 1
    return (2 * tail, h + 1, tail, per_phase - 2 * half + h + 1, tail, h + 1, tail, h + 1)


def _eight_steps(h: int, half: int, per_phase: int, swap: bool) -> list[Action]:
    """The bidirectional schedule of one rank in logical phases (0 = the direction this rank is early in).

    `swap` maps logical phase p to slot p ^ 1 (DualPipe's second-half ranks). The ranks at the far end of both
    directions (h == half - 1) run their first main-step F0/B1 pair sequentially, which shrinks the bubble.
    """
    counts = _eight_step_counts(h, half, per_phase)
    fwd = [0, 0]
    bwd = [0, 0]
    out: list[Action] = []

    def slot(p: int) -> int:
        return p ^ 1 if swap else p

    def f(p: int, step: int) -> None:
        out.append(Action("F", slot(p), fwd[p], step=step))
        fwd[p] += 1

    def b(p: int, step: int, zb: bool = False) -> None:
        out.append(Action("B", slot(p), bwd[p], zb=zb, step=step))
        bwd[p] += 1

    def fb(pf: int, pb: int, step: int) -> None:
        out.append(Action("FB", slot(pf), fwd[pf], b_phase=slot(pb), b_chunk=bwd[pb], step=step))
        fwd[pf] += 1
        bwd[pb] += 1

    def w(step: int) -> None:
        out.append(Action("W", step=step))

    n1, n2, n3, n4, n5, n6, n7, n8 = counts
    for _ in range(n1):
        f(0, 1)
    for _ in range(n2):
        f(0, 2)
        f(1, 2)
    for _ in range(n3):
        b(1, 3, zb=True)
        w(3)
        f(1, 3)
    for i in range(n4):
        if i == 0 and h == half - 1:
            f(0, 4)
            b(1, 4)
        else:
            fb(0, 1, 4)
        fb(1, 0, 4)
    for _ in range(n5):
        b(1, 5)
        fb(1, 0, 5)
    # Step 6: of its 2*n6 backward chunks, the last n6 defer their weight gradients (drained by step 8).
    for i in range(n6):
        b(1, 6, zb=2 * i >= n6)
        b(0, 6, zb=2 * i + 1 >= n6)
    for _ in range(n7):
        w(7)
        b(0, 7, zb=True)
    for _ in range(n8):
        w(8)
    return out


def check_dualpipe_args(num_ranks: int, num_chunks: int) -> None:
    """Raise ValueError unless DualPipe can run `num_chunks` micro-batches on `num_ranks` ranks."""
    if num_ranks < 2 or num_ranks % 2:
        raise ValueError(f"num_ranks: DualPipe needs an even number of ranks >= 2, got {num_ranks}")
    if num_chunks <= 0 or num_chunks % 2 or num_chunks < 2 * num_ranks:
        raise ValueError(
            f"num_chunks: DualPipe needs an even num_chunks >= 2 * num_ranks = {2 * num_ranks}, got {num_chunks}"
        )


def check_dualpipev_args(num_ranks: int, num_chunks: int) -> None:
    """Raise ValueError unless DualPipeV can run `num_chunks` micro-batches on `num_ranks` ranks."""
    if num_ranks < 1:
        raise ValueError(f"num_ranks: must be >= 1, got {num_ranks}")
    if num_chunks <= 0 or num_chunks < 2 * num_ranks:
        raise ValueError(f"num_chunks: DualPipeV needs num_chunks >= 2 * num_ranks = {2 * num_ranks}, got {num_chunks}")


def _check_rank(rank: int, num_ranks: int) -> None:
    if not 0 <= rank < num_ranks:
        raise ValueError(f"rank: must be in [0, {num_ranks}), got {rank}")


def dualpipe(rank: int, num_ranks: int, num_chunks: int) -> list[Action]:
    """DualPipe's schedule for one rank: `num_chunks / 2` micro-batches enter from each end.

    >>> [str(a) for a in dualpipe(0, 2, 4)]
    ['F0.0', 'F1.0', 'F0.1&B1.0', 'F1.1&B0.0', 'B1.1', 'B0.1z', 'W']
    """
    check_dualpipe_args(num_ranks, num_chunks)
    _check_rank(rank, num_ranks)
    half = num_ranks // 2
    second = rank >= half
    h = num_ranks - 1 - rank if second else rank
    return _eight_steps(h, half, num_chunks // 2, swap=second)


def dualpipev(rank: int, num_ranks: int, num_chunks: int) -> list[Action]:
    """DualPipeV ("cut-in-half"): rank r holds stage r (slot 0) and stage 2N-1-r (slot 1)."""
    check_dualpipev_args(num_ranks, num_chunks)
    _check_rank(rank, num_ranks)
    return _eight_steps(rank, num_ranks, num_chunks, swap=False)


def dualpipe_step_counts(rank: int, num_ranks: int, num_chunks: int) -> tuple[int, ...]:
    """Repeat counts of DualPipe's eight steps on `rank` (the oracle of the reference document)."""
    check_dualpipe_args(num_ranks, num_chunks)
    _check_rank(rank, num_ranks)
    h = min(rank, num_ranks - 1 - rank)
    return _eight_step_counts(h, num_ranks // 2, num_chunks // 2)


def dualpipev_step_counts(rank: int, num_ranks: int, num_chunks: int) -> tuple[int, ...]:
    """Repeat counts of DualPipeV's eight steps on `rank`."""
    check_dualpipev_args(num_ranks, num_chunks)
    _check_rank(rank, num_ranks)
    return _eight_step_counts(rank, num_ranks, num_chunks)


_STEP_BODY = {1: 1, 2: 2, 3: 3, 4: 2, 5: 2, 6: 2, 7: 2, 8: 1}  # compute actions per repetition of each step


def step_counts(actions: list[Action]) -> tuple[int, ...]:
    """Recover the eight step repeat counts from a DualPipe/DualPipeV action list."""
    per_step = Counter(a.step for a in actions if a.op in COMPUTE_OPS)
    return tuple(per_step[s] // _STEP_BODY[s] for s in range(1, 9))


# --------------------------------------------------------------------------------------------------------------
# Baselines: one stage per rank.


def _check_linear(rank: int, num_ranks: int, num_chunks: int) -> None:
    if num_ranks < 1:
        raise ValueError(f"num_ranks: must be >= 1, got {num_ranks}")
    _check_rank(rank, num_ranks)
    if num_chunks < 1:
        raise ValueError(f"num_chunks: must be >= 1, got {num_chunks}")


def gpipe(rank: int, num_ranks: int, num_chunks: int) -> list[Action]:
    """GPipe: all forwards, then all backwards."""
    _check_linear(rank, num_ranks, num_chunks)
    return [Action("F", 0, i) for i in range(num_chunks)] + [Action("B", 0, i) for i in range(num_chunks)]


def one_f_one_b(rank: int, num_ranks: int, num_chunks: int) -> list[Action]:
    """1F1B: `num_ranks - rank - 1` warm-up forwards, then alternate one forward and one backward."""
    _check_linear(rank, num_ranks, num_chunks)
    warm = min(num_ranks - rank - 1, num_chunks)
    out = [Action("F", 0, i) for i in range(warm)]
    for i in range(num_chunks - warm):
        out += [Action("F", 0, warm + i), Action("B", 0, i)]
    out += [Action("B", 0, i) for i in range(num_chunks - warm, num_chunks)]
    return out


def zb1p(rank: int, num_ranks: int, num_chunks: int) -> list[Action]:
    """ZB1P (zero-bubble ZB-H1): 1F1B order with each backward split into B (input grads, sent at once) and W.

    Rank r holds back up to `r` weight-gradient groups during the steady phase and spends them in the cool-down
    gaps, where it would otherwise wait for the next input gradient; activation memory stays that of 1F1B.
    """
    _check_linear(rank, num_ranks, num_chunks)
    warm = min(num_ranks - rank - 1, num_chunks)
    out = [Action("F", 0, i) for i in range(warm)]
    pending = 0
    for i in range(num_chunks - warm):
        out += [Action("F", 0, warm + i), Action("B", 0, i, zb=True)]
        pending += 1
        if pending > rank:
            out.append(Action("W"))
            pending -= 1
    for i in range(num_chunks - warm, num_chunks):
        out.append(Action("B", 0, i, zb=True))
        pending += 1
        out.append(Action("W"))
        pending -= 1
    out += [Action("W")] * pending
    return out


SCHEDULES = {"dualpipe": dualpipe, "dualpipev": dualpipev, "gpipe": gpipe, "1f1b": one_f_one_b, "zb1p": zb1p}


# --------------------------------------------------------------------------------------------------------------
# Topologies and lowering to communication.


def dualpipe_topology(rank: int, num_ranks: int) -> Topology:
    """Slot 0 is stage `rank` of the pipeline fed at rank 0; slot 1 is stage `N-1-rank` of the one fed at N-1."""
    last = num_ranks - 1
    return Topology(
        prev=("data" if rank == 0 else rank - 1, "data" if rank == last else rank + 1),
        next=("loss" if rank == last else rank + 1, "loss" if rank == 0 else rank - 1),
    )


def dualpipev_topology(rank: int, num_ranks: int) -> Topology:
    """Slot 0 is stage `rank` (going down), slot 1 stage `2N-1-rank` (coming back); the last rank turns locally."""
    last = num_ranks - 1
    return Topology(
        prev=("data" if rank == 0 else rank - 1, "local" if rank == last else rank + 1),
        next=("local" if rank == last else rank + 1, "loss" if rank == 0 else rank - 1),
    )


def linear_topology(rank: int, num_ranks: int) -> Topology:
    """One slot: stage `rank` of a plain pipeline."""
    return Topology(
        prev=("data" if rank == 0 else rank - 1,),
        next=("loss" if rank == num_ranks - 1 else rank + 1,),
    )


TOPOLOGIES = {
    "dualpipe": dualpipe_topology,
    "dualpipev": dualpipev_topology,
    "gpipe": linear_topology,
    "1f1b": linear_topology,
    "zb1p": linear_topology,
}


def with_comm(actions: list[Action], topo: Topology) -> list[Action]:
    """Insert receives before and sends after every compute action whose neighbour is another rank."""
    out: list[Action] = []
    for a in actions:
        recvs: list[Action] = []
        sends: list[Action] = []
        if a.op in ("F", "FB") and isinstance(topo.prev[a.phase], int):
            recvs.append(Action("RECV_F", a.phase, a.chunk))
        if a.op in ("F", "FB") and isinstance(topo.next[a.phase], int):
            sends.append(Action("SEND_F", a.phase, a.chunk))
        bp, bc = (a.b_phase, a.b_chunk) if a.op == "FB" else (a.phase, a.chunk)
        if a.op in ("B", "FB") and isinstance(topo.next[bp], int):
            recvs.append(Action("RECV_B", bp, bc))
        if a.op in ("B", "FB") and isinstance(topo.prev[bp], int):
            sends.append(Action("SEND_B", bp, bc))
        out += recvs + [a] + sends
    return out


def forward_only(actions: list[Action]) -> list[Action]:
    """The schedule with every backward and weight step removed (inference)."""
    out: list[Action] = []
    for a in actions:
        if a.op == "FB":
            out.append(Action("F", a.phase, a.chunk, step=a.step))
        elif a.op in ("F", "RECV_F", "SEND_F"):
            out.append(a)
    return out
