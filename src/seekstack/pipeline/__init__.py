"""Bidirectional pipeline parallelism (DeepSeek's DualPipe and DualPipeV) on any torch.distributed backend.

Schedules are data (`seekstack.pipeline.schedules`), run by one executor; the baselines GPipe, 1F1B and ZB1P run
on the same executor (`LinearPipeline`), and `simulate` gives their ideal bubbles.

>>> from seekstack.pipeline import schedules
>>> schedules.dualpipe_step_counts(rank=0, num_ranks=8, num_chunks=20)
(6, 1, 3, 3, 3, 1, 3, 1)
"""

from seekstack.pipeline.comm import set_p2p_tensor_dtype, set_p2p_tensor_shapes
from seekstack.pipeline.dualpipe import DualPipe
from seekstack.pipeline.dualpipev import DualPipeV
from seekstack.pipeline.linear import LinearPipeline
from seekstack.pipeline.schedules import SCHEDULES, Action, dualpipe, dualpipev, gpipe, one_f_one_b, zb1p
from seekstack.pipeline.weight_grad_store import WeightGradStore

__all__ = [
    "SCHEDULES",
    "Action",
    "DualPipe",
    "DualPipeV",
    "LinearPipeline",
    "WeightGradStore",
    "dualpipe",
    "dualpipev",
    "gpipe",
    "one_f_one_b",
    "set_p2p_tensor_dtype",
    "set_p2p_tensor_shapes",
    "zb1p",
]
