"""The CPU path's work plan: which requests (or chunks of one request) are attended together in one step.

Requests are sorted by length, longest first. A request longer than a step is cut into equal chunks (page-aligned
for a paged cache), attended alone one after another; shorter requests are packed, in sorted order, into
groups of at most `step` padded tokens, so a group's queries and results are contiguous slices of the sorted
tensors and padding stays small (neighbours in sorted order have similar lengths).

>>> plan = make_plan([300, 0, 40, 50], step=128, page=16)
>>> plan.order, [(g.r0, g.r1, g.start, g.length) for g in plan.groups]
([0, 3, 2, 1], [(0, 1, 0, 112), (0, 1, 112, 112), (0, 1, 224, 76), (1, 3, 0, 50)])
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Group:
    """Items attended together: sorted requests [r0, r1), or one chunk of request r0 when `part` is set."""

    r0: int
    r1: int
    start: int  # first key position of every item (0 unless a chunk)
    length: int  # the longest item: the keys tile is [r1 - r0, length]
    lens: list[int]  # keys per item, within the chunk
    rems: list[int]  # keys from `start` to the end of each request (> lens[i] for all but a request's last chunk)
    chunk: bool  # one of the chunks of a request that spans several steps (attended one after another)


@dataclass
class Plan:
    order: list[int]  # sorted position -> request
    nonzero: int  # requests with at least one key: the first `nonzero` in sorted order
    groups: list[Group] = field(default_factory=list)


def make_plan(
    lengths: list[int], step: int, page: int = 1, pad_limit: int | None = None, max_items: int | None = None
) -> Plan:
    """Group `lengths` (keys per request) into steps of at most `step` padded tokens; `step` is a multiple of `page`,
    and chunks of long requests start on page boundaries. A request joins a group only if it is at most `pad_limit`
    keys shorter than the group's first (longest) one (any length when None), and a group holds at most `max_items`
    requests."""
    order = sorted(range(len(lengths)), key=lambda r: -lengths[r])
    sorted_len = [lengths[r] for r in order]
    nonzero = sum(1 for n in sorted_len if n > 0)
    plan = Plan(order, nonzero)
    i = 0
    while i < nonzero:
        n = sorted_len[i]
        if n > step:  # equal page-aligned chunks: no tiny remainder attended alone
            chunks = _ceil_div(n, step)
            size = _ceil_div(_ceil_div(n, chunks), page) * page
            for k in range(chunks):
                start = k * size
                ln = min(size, n - start)
                plan.groups.append(Group(i, i + 1, start, ln, [ln], [n - start], True))
            i += 1
            continue
        padded = _ceil_div(n, page) * page  # dense groups gather whole pages
        j = i + 1
        shortest = 0 if pad_limit is None else n - pad_limit
        most = nonzero if max_items is None else min(nonzero, i + max_items)
        while j < most and (j - i + 1) * padded <= step and sorted_len[j] >= shortest:
            j += 1
        lens = sorted_len[i:j]
        plan.groups.append(Group(i, j, 0, n, lens, lens, False))
        i = j
    return plan


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
