"""Point-to-point messages between pipeline stages over any torch.distributed backend (gloo, NCCL, ...).

Every inter-stage message is a list of tensors of fixed shapes and one dtype, set per pipeline
(`DualPipe.set_p2p_tensor_shapes`) or process-wide with upstream's `set_p2p_tensor_shapes` /
`set_p2p_tensor_dtype`, which only give the defaults of pipelines that set nothing themselves.

Sends are non-blocking and only waited for at the end of a step; receives block the action that needs them.
Each (pipeline, direction, slot) stream has its own tag, so messages of different streams between the same two
ranks, or of two pipelines, never match each other.

>>> set_p2p_tensor_shapes([(3, 16, 8)]); set_p2p_tensor_dtype(torch.float32)
>>> default_p2p_config()
([(3, 16, 8)], torch.float32)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_DEFAULT_SHAPES: list[tuple[int, ...]] | None = None
_DEFAULT_DTYPE: torch.dtype | None = None


def set_p2p_tensor_shapes(shapes: list[tuple[int, ...]]) -> None:
    """Process-wide default shapes of the tensors of every inter-stage message (upstream compatibility)."""
    global _DEFAULT_SHAPES
    _DEFAULT_SHAPES = check_shapes(shapes)


def set_p2p_tensor_dtype(dtype: torch.dtype) -> None:
    """Process-wide default dtype of inter-stage messages (upstream compatibility)."""
    global _DEFAULT_DTYPE
    _DEFAULT_DTYPE = check_dtype(dtype)


def default_p2p_config() -> tuple[list[tuple[int, ...]] | None, torch.dtype | None]:
    return _DEFAULT_SHAPES, _DEFAULT_DTYPE


def check_shapes(shapes) -> list[tuple[int, ...]]:
    try:
        out = [tuple(int(d) for d in s) for s in shapes]
    except TypeError as exc:
        raise ValueError(f"shapes: expected a list of shape tuples, got {shapes!r}") from exc
    if not out or any(d < 0 for s in out for d in s):
        raise ValueError(f"shapes: expected a non-empty list of shapes with sizes >= 0, got {shapes!r}")
    return out


def check_dtype(dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype: expected a torch.dtype, got {dtype!r}")
    return dtype


class P2P:
    """Tagged isend/irecv between PP ranks of one pipeline; `pp_to_global` maps a PP rank to a global rank."""

    KINDS = {"F": 0, "B": 1}

    def __init__(self, group, pp_to_global: list[int], tag_base: int, shapes, dtype, device: torch.device):
        self.group = group
        self.pp_to_global = pp_to_global
        self.tag_base = tag_base
        self.shapes = shapes
        self.dtype = dtype
        self.device = device
        self.pending_sends: list[tuple[object, torch.Tensor]] = []

    def tag(self, kind: str, slot: int) -> int:
        # Sender and receiver of a stream use the same slot index in every topology here (DualPipe, V, linear).
        return self.tag_base * 8 + self.KINDS[kind] * 2 + slot

    def send(self, tensors, kind: str, slot: int, dst: int) -> None:
        if len(tensors) != len(self.shapes):
            raise ValueError(f"p2p shapes: a stage message has {len(tensors)} tensors, expected {len(self.shapes)}")
        tag = self.tag(kind, slot)
        for t, shape in zip(tensors, self.shapes):
            if t is None:  # an input without a gradient: send zeros so the message keeps its fixed layout
                t = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if tuple(t.shape) != shape or t.dtype != self.dtype:
                raise ValueError(
                    f"p2p shapes: stage sends {tuple(t.shape)} {t.dtype}, expected {shape} {self.dtype}; "
                    "call set_p2p_tensor_shapes/set_p2p_tensor_dtype with the stage boundary's layout"
                )
            t = t.detach().contiguous()
            work = dist.isend(t, dst=self.pp_to_global[dst], group=self.group, tag=tag)
            self.pending_sends.append((work, t))
        # Completed sends let go of their buffers now, so freed stage outputs really leave memory mid-step.
        self.pending_sends = [(w, b) for w, b in self.pending_sends if not w.is_completed()]

    def recv(self, kind: str, slot: int, src: int) -> list[tuple[object, torch.Tensor]]:
        """Post receives; the caller waits on the returned works before reading the buffers."""
        tag = self.tag(kind, slot)
        out = []
        for shape in self.shapes:
            buf = torch.empty(shape, dtype=self.dtype, device=self.device)
            if buf.is_floating_point():
                buf.fill_(float("nan"))  # poison: a short or missed receive shows up as NaN, not stale data
            out.append((dist.irecv(buf, src=self.pp_to_global[src], group=self.group, tag=tag), buf))
        return out

    def wait_sends(self) -> None:
        for work, _ in self.pending_sends:
            work.wait()
        self.pending_sends = []

    def exchange(self, tensor: torch.Tensor, peer: int, tag_offset: int) -> torch.Tensor:
        """Swap one tensor with PP rank `peer` (used to sum DualPipe's two copies of a stage's grads)."""
        tag = self.tag_base * 8 + 4 + tag_offset
        out = torch.empty_like(tensor)
        ops = [
            dist.P2POp(dist.isend, tensor.contiguous(), self.pp_to_global[peer], self.group, tag),
            dist.P2POp(dist.irecv, out, self.pp_to_global[peer], self.group, tag),
        ]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        return out
