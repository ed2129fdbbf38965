"""DualPipe: bidirectional pipeline parallelism; micro-batches enter from both ends and F/B chunks overlap."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from seekstack.pipeline.base import PipelineBase
from seekstack.pipeline.schedules import check_dualpipe_args


class DualPipe(PipelineBase):
    """DualPipe over any torch.distributed backend. PP rank r holds `modules = (stage r, stage N-1-r)`.

    Rank 0 feeds the forward-direction inputs and holds the labels of the reverse direction (the inputs given on
    rank N-1), and vice versa; `step` returns on rank 0 the losses/outputs of the data given on rank N-1.
    After a training step the two copies of every stage (slot 0 on rank r, slot 1 on rank N-1-r) hold the same,
    summed gradients, ready for the optimizer (`sync_stage_grads=False` leaves them apart, like upstream).

    Example (on each of 2 ranks, after `init_process_group`)::

        stages = [make_stage(i) for i in range(2)]
        pipe = DualPipe((stages[rank], stages[1 - rank]))
        pipe.set_p2p_tensor_shapes([(micro_batch, seq, hidden)]); pipe.set_p2p_tensor_dtype(torch.float32)
        loss, _ = pipe.step(x, num_chunks=8, criterion=mse, labels=[y])  # x, y only on ranks 0 and 1
    """

    schedule_name = "dualpipe"
    num_slots = 2

    def __init__(self, modules, batch_dim=0, process_group=None, rank_mapping=None, *, sync_stage_grads=True):
        super().__init__(modules, batch_dim, process_group, rank_mapping)
        self.sync_stage_grads = sync_stage_grads

    def _check_num_ranks(self) -> None:
        if self.num_ranks % 2:
            raise ValueError(f"process_group: DualPipe needs an even number of ranks, got {self.num_ranks}")

    def _check_num_chunks(self, num_chunks: int) -> None:
        check_dualpipe_args(self.num_ranks, num_chunks)

    def _chunks_per_slot(self, num_chunks: int) -> int:
        return num_chunks // 2

    def _placement(self):
        if self.is_first_rank:
            return 0, 1
        if self.is_last_rank:
            return 1, 0
        return None, None

    @contextlib.contextmanager
    def _grad_scope(self, training, p2p):
        if not training or not self.sync_stage_grads:
            yield
            return
        params = [list(m.parameters()) for m in self.module]
        stash = [[p.grad for p in ps] for ps in params]
        for ps in params:
            for p in ps:
                p.grad = None
        try:
            yield
        except BaseException:
            for ps, gs in zip(params, stash):
                for p, g in zip(ps, gs):
                    p.grad = g
            raise
        mine = [[p.grad if p.grad is not None else torch.zeros_like(p) for p in ps] for ps in params]
        theirs = self._swap_with_mirror(mine, p2p)
        for s in (0, 1):
            for p, a, b, old in zip(params[s], mine[s], theirs[s ^ 1], stash[s]):
                total = a + b  # commutative: the mirror rank computes b + a, bit for bit the same
                p.grad = total if old is None else old + total

    def _swap_with_mirror(self, mine, p2p) -> list[list[torch.Tensor]]:
        """Send both slots' grads to PP rank N-1-r and receive its two slots' grads."""
        peer = p2p.pp_to_global[self.num_ranks - 1 - self.rank]
        theirs = [[torch.empty_like(g) for g in gs] for gs in mine]
        ops = []
        for s in (0, 1):
            tag = self._tag_base * 8 + 4 + s
            ops += [dist.P2POp(dist.isend, g.contiguous(), peer, self.group, tag) for g in mine[s]]
            ops += [dist.P2POp(dist.irecv, g, peer, self.group, tag) for g in theirs[s]]
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        return theirs
