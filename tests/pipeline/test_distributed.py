"""DualPipe, DualPipeV and the baselines on real gloo ranks vs a single-process reference (upstream's checks).

Each world size is one spawned job (module-scoped) that runs every case and returns plain numbers; the tests
below assert on them. Loss and inference outputs must be bit-exact, gradients within cos-diff 1e-13.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from seekstack.pipeline.launch import spawn

pytestmark = pytest.mark.distributed

sys.path.insert(0, str(Path(__file__).parent))  # the children import the worker module from here too
import pipeline_spawn_workers as workers  # noqa: E402

GRAD_TOL = 1e-13  # upstream's cal_diff bound


@pytest.fixture(scope="module")
def world4():
    return spawn(workers.run_world4, 4, timeout_s=120)


@pytest.fixture(scope="module")
def world2():
    return spawn(workers.run_world2, 2, timeout_s=120)


def _check_dualpipe(case: dict, zb_expected: bool | None = None) -> None:
    for step in case["steps"]:
        assert step["loss_ok"], case
        assert step["outs_none"]
        assert step["grad_diff0"] < GRAD_TOL and step["grad_diff1"] < GRAD_TOL, step
    assert case["infer_loss_ok"] and case["infer_out_ok"]
    assert case["infer_grads_untouched"]
    if zb_expected is not None:
        assert (case["w_applied"] > 0) == zb_expected


@pytest.mark.parametrize("name, zb", [("dualpipe_zb", True), ("dualpipe_plain", False), ("dualpipe_hook", True)])
def test_dualpipe_4_ranks(world4, name, zb):
    assert sorted(r[name]["rank"] for r in world4) == [0, 1, 2, 3]
    for r in world4:
        _check_dualpipe(r[name], zb)


def test_dualpipe_grads_accumulate_over_steps(world4):
    for r in world4:
        assert len(r["dualpipe_zb"]["steps"]) == 2  # the second step is checked against twice the reference grads


@pytest.mark.parametrize("name, zb", [("dualpipe_zb", True), ("dualpipe_plain", False)])
def test_dualpipe_2_ranks(world2, name, zb):
    for r in world2:
        _check_dualpipe(r[name], zb)


def test_dualpipe_on_subgroups_with_rank_mapping(world4):
    # Ranks {0,1} and {2,3} each run a 2-rank DualPipe at once; the second group maps its ranks in reverse.
    assert [r["sub_dualpipe"]["rank"] for r in world4] == [0, 1, 1, 0]
    for r in world4:
        _check_dualpipe(r["sub_dualpipe"])


def _check_v(case: dict) -> None:
    assert case["loss_ok"] and case["outs_none"] and case["infer_ok"], case
    assert case["grad_diff0"] < GRAD_TOL and case["grad_diff1"] < GRAD_TOL, case


@pytest.mark.parametrize("world, name", [(4, "dualpipev"), (2, "dualpipev"), (1, "dualpipev_solo")])
def test_dualpipev(world4, world2, world, name):
    for r in {4: world4, 2: world2, 1: world2}[world]:
        _check_v(r[name])


def test_two_pipelines_coexist(world4):
    for r in world4:
        _check_v(r["coexist_a"])
        _check_v(r["coexist_b"])


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb1p"])
def test_baselines(world4, schedule):
    for r in world4:
        case = r[f"linear_{schedule}"]
        assert case["loss_ok"] and case["grad_diff"] < GRAD_TOL, case


@pytest.mark.parametrize(
    "case, arg",
    [
        ("odd_ranks", "process_group"),
        ("odd_chunks", "num_chunks"),
        ("few_chunks", "num_chunks"),
        ("no_criterion", "criterion"),
        ("v_few_chunks", "num_chunks"),
        ("rank_mapping", "rank_mapping"),
        ("schedule", "schedule"),
        ("modules", "modules"),
    ],
)
def test_value_errors_name_the_argument(world4, case, arg):
    seen = [r["errors"][case] for r in world4 if case in r["errors"]]
    assert seen
    for msg in seen:
        assert msg.startswith(arg + ":"), msg
