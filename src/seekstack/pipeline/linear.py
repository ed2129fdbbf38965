"""Baseline pipelines with one stage per rank (GPipe, 1F1B, ZB1P), run by the same executor as DualPipe."""

from __future__ import annotations

from seekstack.pipeline.base import PipelineBase
from seekstack.pipeline.schedules import SCHEDULES


class LinearPipeline(PipelineBase):
    """A plain pipeline: PP rank r holds stage r; inputs on rank 0, labels, loss and outputs on rank N-1.

    `schedule` is ``"gpipe"``, ``"1f1b"`` or ``"zb1p"`` (ZB1P defers weight grads of modules that cooperate with
    `WeightGradStore`). Same `step` signature as `DualPipe`.

    Example::

        pipe = LinearPipeline(stages[rank], schedule="1f1b")
        pipe.set_p2p_tensor_shapes([(micro_batch, hidden)]); pipe.set_p2p_tensor_dtype(torch.float32)
        loss, _ = pipe.step(x, num_chunks=8, criterion=mse, labels=[y])
    """

    num_slots = 1

    def __init__(self, module, schedule: str = "1f1b", batch_dim=0, process_group=None, rank_mapping=None):
        if schedule not in ("gpipe", "1f1b", "zb1p"):
            raise ValueError(f"schedule: expected 'gpipe', '1f1b' or 'zb1p', got {schedule!r}")
        self.schedule_name = schedule
        super().__init__(module, batch_dim, process_group, rank_mapping)

    def _check_num_chunks(self, num_chunks: int) -> None:
        SCHEDULES[self.schedule_name](self.rank, self.num_ranks, num_chunks)  # raises ValueError on a bad count

    def _chunks_per_slot(self, num_chunks: int) -> int:
        return num_chunks

    def _placement(self):
        return (0 if self.is_first_rank else None), (0 if self.is_last_rank else None)
