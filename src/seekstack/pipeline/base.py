"""What DualPipe, DualPipeV and the baseline pipelines share: process group, rank mapping, P2P layout, `step`."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from seekstack.pipeline import schedules
from seekstack.pipeline.comm import P2P, check_dtype, check_shapes, default_p2p_config
from seekstack.pipeline.executor import Executor
from seekstack.pipeline.weight_grad_store import WeightGradStore

_TAG_BASES = itertools.count(1)


def split_chunks(tensors: tuple, num: int, dim: int) -> list[tuple]:
    """`tensor_split` every tensor into `num` chunks along `dim`; chunk i is a tuple of the i-th pieces."""
    pieces = [t.tensor_split(num, dim=dim) for t in tensors]
    return [tuple(p[i] for p in pieces) for i in range(num)]


class PipelineBase(nn.Module):
    """A pipeline's local stages (`self.module`, an nn.ModuleList) and the machinery to run one schedule.

    Subclasses set `schedule` and `topology` (names in `seekstack.pipeline.schedules`), `num_slots`, and
    `_placement()` (which slot gets the inputs and which the labels on this rank).
    """

    schedule_name = ""
    num_slots = 2

    def __init__(
        self,
        modules,
        batch_dim: int = 0,
        process_group: dist.ProcessGroup | None = None,
        rank_mapping: list[int] | None = None,
    ) -> None:
        super().__init__()
        modules = list(modules) if isinstance(modules, (tuple, list, nn.ModuleList)) else [modules]
        if len(modules) != self.num_slots or not all(isinstance(m, nn.Module) for m in modules):
            raise ValueError(f"modules: {type(self).__name__} needs {self.num_slots} nn.Module(s), got {modules!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("process_group: torch.distributed is not initialised (call init_process_group first)")
        self.module = nn.ModuleList(modules)
        self.batch_dim = batch_dim
        self.group = process_group if process_group is not None else dist.group.WORLD
        self.num_ranks = dist.get_world_size(self.group)
        group_ranks = dist.get_process_group_ranks(self.group)
        if rank_mapping is None:
            rank_mapping = list(range(self.num_ranks))
        if sorted(rank_mapping) != list(range(self.num_ranks)):
            raise ValueError(f"rank_mapping: must be a permutation of range({self.num_ranks}), got {rank_mapping}")
        self.rank_mapping = list(rank_mapping)
        self.rank = rank_mapping[dist.get_rank(self.group)]
        self.pp_to_global = [0] * self.num_ranks
        for group_rank, pp_rank in enumerate(rank_mapping):
            self.pp_to_global[pp_rank] = group_ranks[group_rank]
        self.is_first_rank = self.rank == 0
        self.is_last_rank = self.rank == self.num_ranks - 1
        self._check_num_ranks()
        self.p2p_shapes: list[tuple[int, ...]] | None = None
        self.p2p_dtype: torch.dtype | None = None
        self.weight_grad_store = WeightGradStore()
        # Same construction order on every rank, hence the same tag base: two pipelines never mix messages.
        self._tag_base = next(_TAG_BASES)
        t0, t1 = type(modules[0]), type(modules[-1])
        self.overlap_cls = t0 if len(modules) == 2 and t0 is t1 and hasattr(t0, "overlapped_forward_backward") else None
        self.record_timeline = False
        self.timeline: list[dict] | None = None
        # Upstream frees each forward output's storage once it is sent (unless outputs are returned); a stage whose
        # last op saves its own output for backward (e.g. tanh) must turn this off.
        self.free_sent_outputs = True
        self.last_freed_bytes = 0

    # ------------------------------------------------------------------------------------------- configuration
    def set_p2p_tensor_shapes(self, shapes: list[tuple[int, ...]]) -> None:
        """Shapes of the tensors of every inter-stage message of this pipeline (one micro-batch)."""
        self.p2p_shapes = check_shapes(shapes)

    def set_p2p_tensor_dtype(self, dtype: torch.dtype) -> None:
        """Dtype of every inter-stage message of this pipeline."""
        self.p2p_dtype = check_dtype(dtype)

    def _check_num_ranks(self) -> None:
        pass

    def _check_num_chunks(self, num_chunks: int) -> None:
        raise NotImplementedError

    def _chunks_per_slot(self, num_chunks: int) -> int:
        raise NotImplementedError

    def _placement(self) -> tuple[int | None, int | None]:
        """(slot fed with this rank's inputs, slot whose loss uses this rank's labels); None where absent."""
        raise NotImplementedError

    def _actions(self, num_chunks: int) -> list[schedules.Action]:
        fn = schedules.SCHEDULES[self.schedule_name]
        topo = schedules.TOPOLOGIES[self.schedule_name](self.rank, self.num_ranks)
        return schedules.with_comm(fn(self.rank, self.num_ranks, num_chunks), topo)

    def _device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    # ------------------------------------------------------------------------------------------- step
    def step(
        self,
        *inputs: torch.Tensor,
        num_chunks: int = 0,
        criterion: Callable | None = None,
        labels: list[torch.Tensor | None] = [],  # noqa: B006 - upstream's signature; never mutated
        return_outputs: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | tuple | None]:
        """Run one pipelined training (or, under `torch.no_grad()`, inference) step over `num_chunks` micro-batches.

        Returns `(loss, outputs)`: the stacked per-micro-batch losses and the outputs concatenated along
        `batch_dim` on the rank(s) holding the labels, `(None, None)` elsewhere. Gradients accumulate into `.grad`.
        """
        if not isinstance(num_chunks, int) or isinstance(num_chunks, bool):
            raise ValueError(f"num_chunks: expected an int, got {num_chunks!r}")
        self._check_num_chunks(num_chunks)
        training = torch.is_grad_enabled()
        in_slot, label_slot = self._placement()
        if training and label_slot is not None and criterion is None:
            raise ValueError("criterion: required on the rank(s) that compute the loss when training")
        if in_slot is not None and not inputs:
            raise ValueError(f"inputs: PP rank {self.rank} feeds the pipeline and needs the step's inputs")
        per_slot = self._chunks_per_slot(num_chunks)
        shapes, dtype = self.p2p_shapes, self.p2p_dtype
        default_shapes, default_dtype = default_p2p_config()
        shapes = shapes if shapes is not None else default_shapes
        dtype = dtype if dtype is not None else default_dtype
        p2p = None
        if self.num_ranks > 1:
            if shapes is None or dtype is None:
                raise ValueError("p2p shapes: call set_p2p_tensor_shapes and set_p2p_tensor_dtype before step")
            p2p = P2P(self.group, self.pp_to_global, self._tag_base, shapes, dtype, self._device())
        chunked_inputs = {in_slot: split_chunks(inputs, per_slot, self.batch_dim)} if in_slot is not None else {}
        chunked_labels = {}
        if label_slot is not None:
            chunked_labels[label_slot] = split_chunks(
                tuple(lb for lb in labels if lb is not None), per_slot, self.batch_dim
            )
        actions = self._actions(num_chunks)
        if not training:
            actions = schedules.forward_only(actions)
        self.timeline = [] if self.record_timeline else None
        topo = schedules.TOPOLOGIES[self.schedule_name](self.rank, self.num_ranks)
        executor = Executor(list(self.module), topo, p2p, self.weight_grad_store, self.overlap_cls, self.timeline)
        executor.free_outputs = self.free_sent_outputs and not return_outputs
        with self._grad_scope(training, p2p):
            losses, outputs = executor.run(actions, chunked_inputs, chunked_labels, criterion, training, return_outputs)
        self.last_freed_bytes = executor.freed_bytes
        if label_slot is None:
            return None, None
        loss_chunks = [losses[label_slot][i] for i in range(per_slot) if i in losses[label_slot]]
        loss = torch.stack(loss_chunks) if loss_chunks else None
        out = None
        if return_outputs:
            parts = [outputs[label_slot][i] for i in range(per_slot)]
            out = tuple(torch.cat([p[j] for p in parts], dim=self.batch_dim) for j in range(len(parts[0])))
            out = out[0] if len(out) == 1 else out
        return loss, out

    def _grad_scope(self, training: bool, p2p: P2P | None):
        """A context around the executor; DualPipe uses it to sum the grads of the two copies of each stage."""
        import contextlib

        return contextlib.nullcontext()
