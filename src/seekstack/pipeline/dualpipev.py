"""DualPipeV ("cut-in-half" DualPipe): N ranks hold 2N stages in a V, no duplicated parameters."""

from __future__ import annotations

from seekstack.pipeline.base import PipelineBase
from seekstack.pipeline.schedules import check_dualpipev_args


class DualPipeV(PipelineBase):
    """DualPipeV over any torch.distributed backend. PP rank r holds `modules = (stage r, stage 2N-1-r)`.

    Inputs, labels and the criterion are needed only on rank 0, which is both the first and the last stage; `step`
    returns `(loss, outputs)` there and `(None, None)` elsewhere. Any rank count >= 1 works; num_chunks >= 2N.

    Example (on each of N ranks, after `init_process_group`)::

        pipe = DualPipeV((stages[rank], stages[2 * N - 1 - rank]))
        pipe.set_p2p_tensor_shapes([(micro_batch, seq, hidden)]); pipe.set_p2p_tensor_dtype(torch.float32)
        loss, _ = pipe.step(x, num_chunks=2 * N, criterion=mse, labels=[y])  # x, y only on rank 0
    """

    schedule_name = "dualpipev"
    num_slots = 2

    def _check_num_chunks(self, num_chunks: int) -> None:
        check_dualpipev_args(self.num_ranks, num_chunks)

    def _chunks_per_slot(self, num_chunks: int) -> int:
        return num_chunks

    def _placement(self):
        return (0, 1) if self.is_first_rank else (None, None)
