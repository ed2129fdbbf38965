"""Bad input raises ValueError naming the argument."""

import pytest
import torch

from seekstack.eplb import balancedness, gpu_loads, rebalance_experts

W = torch.rand(2, 12) * 100


@pytest.mark.parametrize(
    "weight,args,match",
    [
        (torch.rand(12), (16, 4, 2, 8), "weight must be 2-D"),
        (torch.rand(2, 3, 4), (16, 4, 2, 8), "weight must be 2-D"),
        (torch.empty(0, 12), (16, 4, 2, 8), "weight must be 2-D"),
        (
            W.clone().index_put_((torch.tensor([0]), torch.tensor([3])), torch.tensor(float("nan"))),
            (16, 4, 2, 8),
            "weight must be finite",
        ),  # fmt: skip
        (W - 200, (16, 4, 2, 8), "weight must be non-negative"),
        (torch.ones(2, 12, dtype=torch.complex64), (16, 4, 2, 8), "weight must be real"),
        ("not a tensor", (16, 4, 2, 8), "weight"),
        (W, (8, 4, 2, 8), "num_replicas .* >= the number of experts"),
        (W, (18, 4, 2, 8), "num_replicas .* multiple of num_gpus"),
        (W, (16, 5, 1, 8), "num_groups .* divide"),
        (W, (16, 4, 2, 6), "num_replicas .* multiple of num_gpus"),
        (W, (24, 4, 4, 6), "num_gpus .* multiple of num_nodes"),
        (W, (0, 4, 2, 8), "num_replicas must be a positive integer"),
        (W, (16, 4, 2, 8.0), "num_gpus must be a positive integer"),
        (W, (16, -4, 2, 8), "num_groups must be a positive integer"),
        (W, (16, 4, True, 8), "num_nodes must be a positive integer"),
    ],
)
def test_bad_input(weight, args, match):
    with pytest.raises(ValueError, match=match):
        rebalance_experts(weight, *args)


def test_distinct_needs_room():
    # 12 experts on 1 node with 2 GPUs hold at most 24 distinct (expert, GPU) pairs.
    with pytest.raises(ValueError, match="distinct_per_gpu"):
        rebalance_experts(W, 26, 1, 1, 2, distinct_per_gpu=True)


@pytest.mark.parametrize(
    "phy2log,num_gpus,match",
    [
        (torch.arange(12).repeat(3, 1), 4, "phy2log must be"),
        (torch.arange(12).repeat(2, 1), 5, "num_gpus"),
        (torch.arange(12).repeat(2, 1) + 1, 4, "outside"),
        (torch.zeros(2, 12, dtype=torch.int64), 4, "without a replica"),
    ],
)
def test_metric_bad_input(phy2log, num_gpus, match):
    with pytest.raises(ValueError, match=match):
        gpu_loads(W, phy2log, num_gpus)


def test_balancedness_idle_layer_is_one():
    weight = torch.zeros(1, 4)
    assert balancedness(weight, torch.arange(4), 2).tolist() == [1.0]
