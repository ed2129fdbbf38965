"""WeightGradStore: per-pipeline queues, upstream's class-level API routed to the active store, FIFO groups."""

from __future__ import annotations

import pytest
import torch

from seekstack.pipeline import WeightGradStore
from seekstack.pipeline.models import MLPStage


def test_class_level_api_goes_to_the_active_store():
    a, b = WeightGradStore(), WeightGradStore()
    ran = []
    with a.activate(enabled=True):
        assert WeightGradStore.enabled
        WeightGradStore.put(lambda: ran.append("a"))
        with b.activate(enabled=False):
            assert not WeightGradStore.enabled
            WeightGradStore.put(lambda: ran.append("b"))
        WeightGradStore.flush()
    assert not a.enabled and len(a) == 1 and b.cache and len(b) == 0
    a.pop()
    assert ran == ["a"] and a.applied == 1


def test_groups_run_fifo_and_pop_on_empty_raises():
    s = WeightGradStore()
    ran = []
    for i in range(3):
        s.put(lambda i=i: ran.append(i))
        s.put(lambda i=i: ran.append(10 + i))
        s.flush()
    s.pop()
    s.pop()
    assert ran == [0, 10, 1, 11]
    s.clear()
    with pytest.raises(RuntimeError, match="pop"):
        s.pop()


def test_deferred_weight_grads_equal_immediate_ones(seed):
    stage = MLPStage(6)
    x = torch.randn(3, 5, 6)
    stage(x).square().sum().backward()
    want = [p.grad.clone() for p in stage.parameters()]
    stage.zero_grad(set_to_none=True)
    store = WeightGradStore()
    with store.activate(enabled=True):
        stage(x).square().sum().backward()
    store.flush()
    assert all(p.grad is None for p in stage.parameters())  # nothing applied before the W step
    store.pop()
    for p, w in zip(stage.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=0, atol=0)
