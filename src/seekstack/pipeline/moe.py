"""A small MoE stage for expert-parallel pipelines: dense pre-layer and gate → EP dispatch → experts → EP combine.

The model code is only the math: `route` (residual dense layer, softmax gate, top-k), `experts_forward` (each
local expert on the rows routed to it) and `post` (residual add). Where the tokens travel is the business of an
expert-parallel communicator, a `seekstack.ep.Buffer` over the EP process group (or nothing: one EP rank), and the
order in which the pieces run is the business of `seekstack.pipeline.ep_overlap`, which also provides the
`overlapped_forward_backward` hook of `OverlappedMoEStage`.

EP rank `e` of `ep_size` holds the global experts `[e * E / ep_size, (e + 1) * E / ep_size)`.

>>> stage = MoEStage(hidden=8, ffn=16, num_experts=4, topk=2)   # no EP group: all 4 experts local
>>> stage(torch.randn(2, 3, 8)).shape
torch.Size([2, 3, 8])
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class Expert(nn.Module):
    """One expert FFN: Linear(h, f) → GELU → Linear(f, h), no bias."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.up = nn.Linear(hidden, ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def experts_forward(experts, recv_x: torch.Tensor, recv_idx: torch.Tensor, recv_w: torch.Tensor) -> torch.Tensor:
    """Weighted sum of the local experts over received rows.

    `recv_idx [N, k]` holds local expert ids (-1 for experts elsewhere) and `recv_w [N, k]` their gate weights.
    Expert `e` runs once on the rows routed to it, in row order, and its weighted output is added into those rows.
    """
    out = torch.zeros_like(recv_x)
    for e, expert in enumerate(experts):
        hit = recv_idx == e
        rows = hit.any(1).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        weight = (recv_w * hit).sum(1)[rows]  # one non-zero term per row: exact
        out = out.index_add(0, rows, expert(recv_x[rows]) * weight[:, None])
    return out


class MoEStage(nn.Module):
    """A pipeline stage: `h = x + dense(x)`, gate `topk(softmax(router(h)))`, experts over EP, `out = h + moe(h)`.

    `ep_group` is the expert-parallel process group (distinct from the pipeline's); None means all experts local.
    Inputs are `[..., hidden]`; the leading dims are flattened into tokens for routing.

    Example (4 ranks = 2 PP ranks x 2 EP ranks; EP groups {0,2} and {1,3})::

        stage = OverlappedMoEStage(64, 128, num_experts=8, topk=2, ep_group=ep_groups[pp_rank])
        pipe = DualPipe((stage_a, stage_b), process_group=pp_groups[ep_rank])
    """

    def __init__(self, hidden: int, ffn: int, num_experts: int, topk: int, ep_group=None):
        super().__init__()
        ep_size = 1 if ep_group is None else dist.get_world_size(ep_group)
        ep_rank = 0 if ep_group is None else dist.get_rank(ep_group)
        if num_experts <= 0 or num_experts % ep_size:
            raise ValueError(f"num_experts: must be a positive multiple of the EP size {ep_size}, got {num_experts}")
        if not 1 <= topk <= num_experts:
            raise ValueError(f"topk: must be within [1, num_experts={num_experts}], got {topk}")
        self.hidden, self.num_experts, self.topk = hidden, num_experts, topk
        self.ep_size, self.ep_rank = ep_size, ep_rank
        local = num_experts // ep_size
        self.expert_offset = ep_rank * local
        self.dense = nn.Linear(hidden, hidden, bias=False)
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(hidden, ffn) for _ in range(local))
        self.buffer = None
        if ep_group is not None:
            from seekstack.ep import Buffer

            self.buffer = Buffer(ep_group)
        # Optional list receiving compute/communication intervals of each chunk (see ep_overlap.Recorder).
        self.overlap_timeline: list[dict] | None = None

    # ------------------------------------------------------------------------------------- the math, per piece
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens `[T, H]` → `(h [T, H], topk weights [T, k] fp32, topk global expert ids [T, k] int64)`."""
        h = x + self.dense(x)
        probs = torch.softmax(self.router(h), dim=-1, dtype=torch.float32)
        weights, idx = probs.topk(self.topk, dim=-1)
        return h, weights, idx

    def experts_forward(self, recv_x, recv_idx, recv_w) -> torch.Tensor:
        return experts_forward(self.experts, recv_x, recv_idx, recv_w)

    @staticmethod
    def post(h: torch.Tensor, moe: torch.Tensor) -> torch.Tensor:
        return h + moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from seekstack.pipeline.ep_overlap import run_chunk

        return run_chunk(self, x)


class OverlappedMoEStage(MoEStage):
    """`MoEStage` whose DualPipe F&B steps overlap one chunk's EP all-to-all with the other chunk's compute."""

    @classmethod
    def overlapped_forward_backward(cls, module0, inputs0, criterion0, labels0, module1, loss1, outputs1, grads1):
        from seekstack.pipeline.ep_overlap import overlapped_forward_backward

        return overlapped_forward_backward(module0, inputs0, criterion0, labels0, module1, loss1, outputs1, grads1)
