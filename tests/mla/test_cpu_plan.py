"""The CPU path's work plan: every key of every request lands in exactly one step, and no step gathers more than
`step` tokens."""

from __future__ import annotations

import random

import pytest

from seekstack.mla.cpu_plan import make_plan


@pytest.mark.parametrize("pad_limit", [None, 0, 50])
@pytest.mark.parametrize("page", [1, 16, 64])
@pytest.mark.parametrize("step", [64, 200, 2048])
def test_plan_covers_every_key_once_within_the_step(page, step, pad_limit):
    rng = random.Random(page * 10_000 + step)
    for _ in range(20):
        lengths = [rng.choice([0, 1, rng.randrange(1, 3 * step), rng.randrange(1, 10 * step)]) for _ in range(12)]
        step_tokens = max(page, step // page * page)
        plan = make_plan(lengths, step_tokens, page, pad_limit, max_items=5 if pad_limit == 0 else None)
        assert sorted(plan.order) == list(range(len(lengths)))
        sorted_len = [lengths[r] for r in plan.order]
        assert sorted_len == sorted(lengths, reverse=True)
        assert plan.nonzero == sum(n > 0 for n in lengths)
        seen = {r: [] for r in range(plan.nonzero)}
        for grp in plan.groups:
            padded = -(-grp.length // page) * page  # pages a group gathers per item
            assert (grp.r1 - grp.r0) * padded <= step_tokens
            assert grp.length == max(grp.lens) and grp.start % page == 0
            assert pad_limit is None or grp.length - min(grp.lens) <= pad_limit
            assert pad_limit != 0 or grp.r1 - grp.r0 <= 5
            for j, r in enumerate(range(grp.r0, grp.r1)):
                assert grp.rems[j] == sorted_len[r] - grp.start
                seen[r].append((grp.start, grp.start + grp.lens[j]))
            assert grp.chunk == (sorted_len[grp.r0] > step_tokens)
        chunks = [(grp.r0, grp.start) for grp in plan.groups if grp.chunk]
        assert chunks == sorted(chunks)  # a request's chunks come one after another, in order
        for r, spans in seen.items():  # contiguous, non-overlapping, complete
            spans.sort()
            assert spans[0][0] == 0 and spans[-1][1] == sorted_len[r]
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
