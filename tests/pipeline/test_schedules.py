"""Schedules as data: the reference document's per-step counts, invariants, and a simulated run per schedule."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seekstack.pipeline import schedules as S
from seekstack.pipeline.simulate import (
    DeadlockError,
    dualpipe_bubble_formula,
    durations,
    linear_bubble_formula,
    simulate,
)

# deepseek-ai/DualPipe, 8 ranks x 20 chunks: repeat counts of steps 1..8 (shared/reference/dualpipe.md §1.3).
ORACLE_8x20 = {
    0: (6, 1, 3, 3, 3, 1, 3, 1),
    1: (4, 2, 2, 4, 2, 2, 2, 2),
    2: (2, 3, 1, 5, 1, 3, 1, 3),
    3: (0, 4, 0, 6, 0, 4, 0, 4),
}


@pytest.mark.parametrize("rank", range(8))
def test_dualpipe_oracle_8x20(rank):
    want = ORACLE_8x20[min(rank, 7 - rank)]
    assert S.dualpipe_step_counts(rank, 8, 20) == want
    assert S.step_counts(S.dualpipe(rank, 8, 20)) == want


@pytest.mark.parametrize("rank", range(4))
def test_dualpipev_is_dualpipe_cut_in_half(rank):
    v = S.dualpipev(rank, 4, 10)
    d = S.dualpipe(rank, 8, 20)
    assert S.step_counts(v) == S.dualpipev_step_counts(rank, 4, 10) == ORACLE_8x20[rank]
    assert [str(a) for a in v] == [str(a) for a in d]  # the first-half ranks' actions are identical


def test_second_half_mirrors_first_half_with_slots_swapped():
    for rank in range(4):
        a, b = S.dualpipe(rank, 8, 20), S.dualpipe(7 - rank, 8, 20)
        assert [(x.op, x.chunk, x.b_chunk, x.zb) for x in a] == [(x.op, x.chunk, x.b_chunk, x.zb) for x in b]
        assert all(x.phase == y.phase ^ 1 for x, y in zip(a, b) if x.op != "W")


def _check_invariants(actions, slots, per_slot):
    fwd, bwd = defaultdict(list), defaultdict(list)
    queued = 0
    for a in actions:
        if a.op == "B":
            assert a.chunk in fwd[a.phase], "a chunk's backward comes after its forward"
            bwd[a.phase].append(a.chunk)
            queued += a.zb
        if a.op == "FB":
            assert a.b_chunk in fwd[a.b_phase]
            bwd[a.b_phase].append(a.b_chunk)
        if a.op in ("F", "FB"):
            fwd[a.phase].append(a.chunk)
        if a.op == "W":
            queued -= 1
            assert queued >= 0, "W before any deferred B"
    for p in slots:
        assert fwd[p] == list(range(per_slot)), "every forward runs once per chunk, in order"
        assert bwd[p] == list(range(per_slot))
    assert queued == 0, "every deferred B is matched by exactly one W"


@settings(max_examples=60, deadline=None)
@given(half=st.integers(1, 6), extra=st.integers(0, 6), rank_frac=st.floats(0, 0.999))
def test_dualpipe_invariants_and_deadlock_free(half, extra, rank_frac):
    n = 2 * half
    chunks = 2 * n + 2 * extra
    acts = [S.dualpipe(r, n, chunks) for r in range(n)]
    _check_invariants(acts[int(rank_frac * n)], (0, 1), chunks // 2)
    sim = simulate(acts, [S.dualpipe_topology(r, n) for r in range(n)], durations(1, 2, 1))
    assert max(sim.bubble) == pytest.approx(dualpipe_bubble_formula(n, 3, 2, 1))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 8), extra=st.integers(0, 7))
def test_dualpipev_invariants_and_deadlock_free(n, extra):
    chunks = 2 * n + extra
    acts = [S.dualpipev(r, n, chunks) for r in range(n)]
    for a in acts:
        _check_invariants(a, (0, 1), chunks)
    sim = simulate(acts, [S.dualpipev_topology(r, n) for r in range(n)], durations(1, 2, 1))
    # DualPipeV on N ranks is DualPipe's bubble with PP = 2N stages.
    assert max(sim.bubble) == pytest.approx(dualpipe_bubble_formula(2 * n, 3, 2, 1))


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb1p"])
@pytest.mark.parametrize("n, chunks", [(1, 1), (2, 3), (4, 8), (5, 11), (8, 20)])
def test_baselines_simulated_bubble_matches_readme(name, n, chunks):
    acts = [S.SCHEDULES[name](r, n, chunks) for r in range(n)]
    for a in acts:
        _check_invariants(a, (0,), chunks)
    f, b, w = 1.0, 2.0, 1.0
    sim = simulate(acts, [S.linear_topology(r, n) for r in range(n)], durations(f, b, w))
    assert max(sim.bubble) == pytest.approx(linear_bubble_formula(name, n, f, b, w))


def test_dualpipe_formula_with_real_overlap():
    # When F&B is cheaper than F + B (true overlap), the worst rank's bubble is still the README formula.
    n, chunks = 8, 20
    times = durations(1, 2, 1, fb=2.0)
    sim = simulate([S.dualpipe(r, n, chunks) for r in range(n)], [S.dualpipe_topology(r, n) for r in range(n)], times)
    assert max(sim.bubble) == pytest.approx(dualpipe_bubble_formula(n, 2.0, 2.0, 1.0))


def test_comm_is_matched_in_order():
    """Every SEND has a RECV on the peer for the same slot and chunk, in the same order per stream."""
    n, chunks = 4, 10
    for name, topo_fn in [("dualpipe", S.dualpipe_topology), ("dualpipev", S.dualpipev_topology)]:
        sent, recv = defaultdict(list), defaultdict(list)
        for r in range(n):
            topo = topo_fn(r, n)
            for a in S.with_comm(S.SCHEDULES[name](r, n, chunks), topo):
                if a.op == "SEND_F":
                    sent[(r, topo.next[a.phase], "F", a.phase)].append(a.chunk)
                elif a.op == "SEND_B":
                    sent[(r, topo.prev[a.phase], "B", a.phase)].append(a.chunk)
                elif a.op == "RECV_F":
                    recv[(topo.prev[a.phase], r, "F", a.phase)].append(a.chunk)
                elif a.op == "RECV_B":
                    recv[(topo.next[a.phase], r, "B", a.phase)].append(a.chunk)
        assert sent == recv and sent


def test_forward_only_drops_backward_and_weights():
    acts = S.forward_only(S.with_comm(S.dualpipe(1, 4, 8), S.dualpipe_topology(1, 4)))
    assert Counter(a.op for a in acts) == {"F": 8, "RECV_F": 8, "SEND_F": 8}


def test_deadlock_is_detected():
    bad = [[S.Action("B", 0, 0), S.Action("F", 0, 0)], [S.Action("F", 0, 0), S.Action("B", 0, 0)]]
    with pytest.raises(DeadlockError):
        simulate(bad, [S.linear_topology(r, 2) for r in range(2)])


@pytest.mark.parametrize(
    "fn, args, arg",
    [
        (S.dualpipe, (0, 3, 12), "num_ranks"),
        (S.dualpipe, (0, 4, 7), "num_chunks"),
        (S.dualpipe, (0, 4, 6), "num_chunks"),
        (S.dualpipe, (4, 4, 8), "rank"),
        (S.dualpipev, (0, 3, 5), "num_chunks"),
        (S.one_f_one_b, (0, 2, 0), "num_chunks"),
    ],
)
def test_schedule_value_errors(fn, args, arg):
    with pytest.raises(ValueError, match=f"^{arg}:"):
        fn(*args)
