"""DualPipe over MoE stages with expert parallelism: F&B overlaps one chunk's EP all-to-all with the other's compute.

One spawned 4-rank job (2 PP x 2 EP, separate process groups) runs the overlapped and the non-overlapped stage
and a single-process reference; the tests assert bit-exact losses, grads within upstream's cos-diff, and that the
recorded communication intervals of each chunk of an F&B contain compute of the other chunk.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from seekstack.pipeline.launch import spawn
from seekstack.pipeline.moe import MoEStage
from seekstack.pipeline.timeline import bubble_stats, plot

sys.path.insert(0, str(Path(__file__).parent))
import moe_spawn_workers as workers  # noqa: E402

pytestmark = pytest.mark.distributed
GRAD_TOL = 1e-13


@pytest.fixture(scope="module")
def moe4():
    return spawn(workers.run_moe, 4, timeout_s=120)


@pytest.mark.parametrize("variant", ["overlap", "plain"])
def test_loss_bit_exact_and_grads_match_single_process_reference(moe4, variant):
    for r in moe4:
        case = r[variant]
        assert case["uses_hook"] == (variant == "overlap")
        assert case["loss_ok"] and case["infer_ok"], r["rank"]
        assert case["grad_diff"] < GRAD_TOL, case["grad_diff"]


def test_overlapped_equals_non_overlapped(moe4):
    for r in moe4:
        assert r["losses_equal"]
        assert r["overlap_vs_plain_grad_diff"] < GRAD_TOL


def _intervals(events, role, op):
    return [(e["start"], e["end"]) for e in events if e["role"] == role and e["op"] == op]


def _intersects(a, bs):
    return any(max(a[0], b[0]) < min(a[1], b[1]) for b in bs)


def test_comm_of_one_chunk_overlaps_compute_of_the_other(moe4):
    checked = 0
    for r in moe4:
        fbs = [e for e in r["overlap"]["events"] if e["op"] == "FB"]
        assert fbs, "the DualPipe schedule of 6 chunks on 2 PP ranks has F&B steps"
        for fb in fbs:
            inside = [e for e in r["overlap"]["sub_events"] if fb["start"] <= e["start"] and e["end"] <= fb["end"]]
            labels = {e["label"] for e in inside if e["op"] == "COMM"}
            assert labels == {"dispatch(F)", "combine(F)", "combine(B)", "dispatch(B)"}
            for role, other in (("F", "B"), ("B", "F")):
                comp_other = _intervals(inside, other, "COMP")
                for comm in _intervals(inside, role, "COMM"):
                    if role == "F" and comm == _intervals(inside, "F", "COMM")[-1]:
                        continue  # combine(F) is the last exchange: the backward chunk has finished by then
                    assert _intersects(comm, comp_other), (role, comm, comp_other)
                    checked += 1
    assert checked > 0


def test_non_overlapped_stage_waits_at_once(moe4):
    # Without the hook, every exchange is waited for right after it starts: no other compute inside it.
    for r in moe4:
        sub = r["plain"]["sub_events"]
        comms = [e for e in sub if e["op"] == "COMM"]
        comps = [(e["start"], e["end"]) for e in sub if e["op"] == "COMP"]
        assert comms and all(not _intersects((c["start"], c["end"]), comps) for c in comms)


def test_sent_outputs_are_freed(moe4):
    # Per step each PP rank sends CHUNKS / 2 forward messages (its other slot ends in the loss), MB x SEQ x H fp32
    # each; all of them are released once sent.
    for r in moe4:
        for variant in ("overlap", "plain"):
            assert r[variant]["freed_bytes"] == workers.CHUNKS // 2 * workers.MB * workers.SEQ * workers.H * 4


def test_timeline_png_draws_comm_spans(moe4, tmp_path):
    events = [dict(e, rank=r["rank"]) for r in moe4 for e in r["overlap"]["events"]]
    subs = [dict(e, rank=r["rank"]) for r in moe4 for e in r["overlap"]["sub_events"]]
    st = bubble_stats(events + subs, "dualpipe", 4)  # sub-events are ignored by the bubble
    assert st == bubble_stats(events, "dualpipe", 4)
    path = plot(events + subs, tmp_path / "moe.png", "MoE DualPipe")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_moe_stage_arguments():
    with pytest.raises(ValueError, match="^num_experts:"):
        MoEStage(8, 16, 0, 1)
    with pytest.raises(ValueError, match="^topk:"):
        MoEStage(8, 16, 4, 5)
    m = MoEStage(8, 16, 4, 2)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        y0 = m(x)
    y = m(x)
    assert torch.equal(y, y0)
    y.sum().backward()
    assert all(p.grad is not None for p in (m.dense.weight, m.router.weight))
