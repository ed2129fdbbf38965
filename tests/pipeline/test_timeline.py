"""Timelines: a recorded run on 2 gloo ranks (structure only; timings are never asserted), the PNG and the CLI."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from seekstack.pipeline import cli
from seekstack.pipeline import schedules as S
from seekstack.pipeline.launch import spawn
from seekstack.pipeline.simulate import durations, simulate
from seekstack.pipeline.timeline import bubble_stats, plot
from seekstack.pipeline.workloads import RunConfig, record_many

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def recorded():
    cfgs = [RunConfig(s, 4, "sleep", 0.004, 0.008, 0.004, warmup=0, repeats=1) for s in ("dualpipev", "zb1p")]
    return spawn(record_many, 2, cfgs, timeout_s=120)[0]


@pytest.mark.distributed
def test_recorded_events_follow_the_schedule(recorded):
    for run in recorded:
        name = run["schedule"]
        for r in range(2):
            want = [str(a) for a in S.SCHEDULES[name](r, 2, 4)]
            got = [e["label"] for e in sorted(run["events"], key=lambda e: e["start"]) if e["rank"] == r]
            assert got == want
        for e in run["events"]:
            assert e["end"] >= e["start"]


@pytest.mark.distributed
def test_recorded_bubble_stats_and_png(recorded, tmp_path):
    for run in recorded:
        st = bubble_stats(run["events"], run["schedule"], 2)
        assert all(math.isfinite(v) for v in st.values())
        assert 0 <= st["bubble_fraction"] < 1
        assert st["bubble_max"] >= st["bubble_mean"] >= 0
        path = plot(run["events"], tmp_path / f"{run['schedule']}.png", run["schedule"])
        assert path.read_bytes()[:8] == PNG_MAGIC


def test_bubble_stats_on_a_simulated_run_equals_the_formula():
    n, c = 4, 10
    sim = simulate([S.dualpipev(r, n, c) for r in range(n)], [S.dualpipev_topology(r, n) for r in range(n)],
                   durations(1.0, 2.0, 1.0))  # fmt: skip
    st = bubble_stats(sim.events, "dualpipev", n)
    assert st["bubble_max"] == pytest.approx(st["formula"])
    assert Counter(e["op"] for e in sim.events)["W"] > 0


def test_cli_schedule_prints_oracle_counts_and_draws(tmp_path, capsys):
    out = tmp_path / "sim.png"
    assert cli.main(["schedule", "--schedule", "dualpipe", "--ranks", "8", "--chunks", "20", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "steps (6, 1, 3, 3, 3, 1, 3, 1)" in text and "steps (0, 4, 0, 6, 0, 4, 0, 4)" in text
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        cli.main(["schedule", "--schedule", "dualpipe", "--ranks", "3", "--chunks", "8"])
    assert "num_ranks" in capsys.readouterr().err
