"""One executor for every schedule: runs a rank's lowered action list (see `schedules.with_comm`).

State lives on the executor, created per step, so nothing is module-global. Per slot and chunk it keeps the
forward inputs and outputs until the backward, the losses and (optionally) the outputs of the loss stage.
Local hand-offs (DualPipeV's turn on the last rank) bypass communication: the output is detached into a fresh leaf
for the next slot, and that leaf's gradient becomes this slot's output gradient.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn
from torch.autograd import Variable

from seekstack.pipeline.comm import P2P
from seekstack.pipeline.schedules import Action, Topology
from seekstack.pipeline.weight_grad_store import WeightGradStore


def as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def run_backward(outputs: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """`torch.autograd.backward(outputs, grads)` straight into the engine, skipping Python's shape check.

    Outputs whose storage was freed after their send (`free_output`) keep their autograd node, whose recorded
    shape is what the engine checks the gradients against (upstream's and Megatron's `custom_backward`).
    """
    Variable._execution_engine.run_backward(tuple(outputs), tuple(grads), False, False, (), True, True)


def free_output(t: torch.Tensor) -> int:
    """Drop the storage of a sent stage output (its graph stays for backward); returns the bytes released."""
    if not isinstance(t, torch.Tensor) or t._base is not None or not t.requires_grad or t.grad_fn is None:
        return 0  # views share storage with tensors backward may still read; leaves and constants are inputs
    nbytes = t.untyped_storage().nbytes()
    t.data = torch.empty(0, dtype=t.dtype, device=t.device)
    return nbytes


class Executor:
    """Runs one step of one rank. `overlap_cls` is a module class with an `overlapped_forward_backward` hook."""

    def __init__(
        self,
        modules: list[nn.Module],
        topo: Topology,
        p2p: P2P | None,
        store: WeightGradStore,
        overlap_cls: type | None = None,
        record: list[dict] | None = None,
    ):
        self.modules = modules
        self.topo = topo
        self.p2p = p2p
        self.store = store
        self.overlap_cls = overlap_cls
        self.record = record
        self.recvs: dict[tuple, list] = {}
        self.local_f: dict[tuple, tuple] = {}
        self.local_b: dict[tuple, tuple] = {}
        self.saved: dict[tuple, tuple] = {}
        self.to_send: dict[tuple, tuple] = {}
        self.free_outputs = False  # set by the pipeline: release each forward output's storage once sent
        self.freed_bytes = 0

    def run(
        self,
        actions: list[Action],
        inputs: dict[int, list[tuple]],
        labels: dict[int, list[tuple]],
        criterion: Callable | None,
        training: bool,
        return_outputs: bool,
    ) -> tuple[dict[int, dict[int, torch.Tensor]], dict[int, dict[int, tuple]]]:
        """Execute `actions`; returns (losses, outputs) of the loss slots, keyed by slot then chunk."""
        self.inputs, self.labels, self.criterion = inputs, labels, criterion
        self.training, self.return_outputs = training, return_outputs
        self.losses: dict[int, dict[int, torch.Tensor]] = {0: {}, 1: {}}
        self.outputs: dict[int, dict[int, tuple]] = {0: {}, 1: {}}
        try:
            for a in actions:
                if a.op in ("F", "B", "W", "FB") and self.record is not None:
                    self._wait_received(a)  # time the compute alone, not the wait for its data
                    t0 = time.perf_counter()
                    self._do(a)
                    self.record.append(
                        {
                            "op": a.op,
                            "label": str(a),
                            "phase": a.phase,
                            "zb": a.zb,
                            "start": t0,
                            "end": time.perf_counter(),
                        }
                    )
                else:
                    self._do(a)
                    if a.op in ("SEND_F", "SEND_B") and self.record:
                        # Issuing a chunk's sends is part of its cost on this rank (what the README formula's F,
                        # B and F&B stand for); waiting for a chunk's inputs is not, and stays outside the action.
                        self.record[-1]["end"] = time.perf_counter()
            if self.p2p is not None:
                self.p2p.wait_sends()
            if len(self.store) or self.store.cache:
                raise RuntimeError("schedule left deferred weight gradients unapplied (a zb backward without its W)")
        except BaseException:
            self.store.clear()
            raise
        return self.losses, self.outputs

    # ---------------------------------------------------------------------------------------------- dispatch
    def _do(self, a: Action) -> None:
        op = a.op
        if op == "RECV_F":
            self.recvs[("F", a.phase, a.chunk)] = self.p2p.recv("F", a.phase, self.topo.prev[a.phase])
        elif op == "RECV_B":
            self.recvs[("B", a.phase, a.chunk)] = self.p2p.recv("B", a.phase, self.topo.next[a.phase])
        elif op == "SEND_F":
            outs = self.to_send.pop(("F", a.phase, a.chunk))
            self.p2p.send(outs, "F", a.phase, self.topo.next[a.phase])
            if self.free_outputs and self.training:
                # The send holds its own reference to the bytes until it completes; the output keeps its graph.
                self.freed_bytes += sum(free_output(o) for o in outs)
        elif op == "SEND_B":
            self.p2p.send(self.to_send.pop(("B", a.phase, a.chunk)), "B", a.phase, self.topo.prev[a.phase])
        elif op == "F":
            self._forward(a.phase, a.chunk)
        elif op == "B":
            self._backward(a.phase, a.chunk, a.zb)
        elif op == "W":
            self.store.pop()
        elif op == "FB":
            if self.overlap_cls is not None and self.training:
                self._overlapped(a)
            else:
                self._forward(a.phase, a.chunk)
                if self.training:
                    self._backward(a.b_phase, a.b_chunk, False)
        else:  # pragma: no cover - schedules only emit the ops above
            raise ValueError(f"action: unknown op {op!r}")

    def _wait_received(self, a: Action) -> None:
        keys = [("F", a.phase, a.chunk), ("B", a.phase, a.chunk), ("B", a.b_phase, a.b_chunk)]
        for key in keys[:1] if a.op == "F" else keys[1:2] if a.op == "B" else keys[::2] if a.op == "FB" else []:
            if key in self.recvs:
                self.recvs[key] = [(None, buf) for buf in self._wait(*key)]

    # ---------------------------------------------------------------------------------------------- forward
    def _wait(self, kind: str, slot: int, chunk: int) -> tuple:
        bufs = []
        for work, buf in self.recvs.pop((kind, slot, chunk)):
            if work is not None:  # gloo: a second wait() on a finished receive waits for another message
                work.wait()
            bufs.append(buf)
        return tuple(bufs)

    def _forward_inputs(self, slot: int, chunk: int) -> tuple:
        src = self.topo.prev[slot]
        if src == "data":
            return self.inputs[slot][chunk]
        if src == "local":
            return self.local_f.pop((slot, chunk))
        bufs = self._wait("F", slot, chunk)
        if self.training:
            for b in bufs:
                b.requires_grad_()
        return bufs

    def _loss_args(self, slot: int, chunk: int) -> tuple[Callable | None, list]:
        if self.topo.next[slot] == "loss" and self.criterion is not None:
            return self.criterion, list(self.labels[slot][chunk])
        return None, []

    def _forward(self, slot: int, chunk: int) -> None:
        x = self._forward_inputs(slot, chunk)
        outs = as_tuple(self.modules[slot](*x))
        criterion, labels = self._loss_args(slot, chunk)
        loss = criterion(*outs, *labels) if criterion is not None else None
        self._after_forward(slot, chunk, x, outs, loss)

    def _after_forward(self, slot: int, chunk: int, x: tuple, outs: tuple, loss) -> None:
        dst = self.topo.next[slot]
        if dst == "loss":
            if loss is not None:
                self.losses[slot][chunk] = loss
            if self.return_outputs:
                self.outputs[slot][chunk] = tuple(o.detach() for o in outs)
        elif dst == "local":
            self.local_f[(slot ^ 1, chunk)] = tuple(o.detach().requires_grad_(self.training) for o in outs)
        else:
            self.to_send[("F", slot, chunk)] = outs
        if self.training:
            self.saved[(slot, chunk)] = (x, outs)

    # ---------------------------------------------------------------------------------------------- backward
    def _backward_inputs(self, slot: int, chunk: int):
        """(stage inputs, loss or None, outputs, output grads) of a chunk whose backward is due."""
        x, outs = self.saved.pop((slot, chunk))
        dst = self.topo.next[slot]
        if dst == "loss":
            return x, self.losses[slot][chunk], [], []
        grads = self.local_b.pop((slot, chunk)) if dst == "local" else self._wait("B", slot, chunk)
        # Outputs without a gradient (unused downstream, or not differentiable) are left out of backward.
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        return x, None, [o for o, _ in pairs], [g for _, g in pairs]

    def _backward(self, slot: int, chunk: int, zb: bool) -> None:
        x, loss, outs, grads = self._backward_inputs(slot, chunk)
        with self.store.activate(enabled=zb):
            if loss is not None:
                torch.autograd.backward(loss)
            elif outs:
                run_backward(outs, grads)
        if zb:
            self.store.flush()
        self._after_backward(slot, chunk, x, loss)

    def _after_backward(self, slot: int, chunk: int, x: tuple, loss) -> None:
        if loss is not None:
            loss.detach_()
        src = self.topo.prev[slot]
        if src == "data":
            return
        grads = tuple(t.grad if isinstance(t, torch.Tensor) and t.requires_grad else None for t in x)
        if src == "local":
            self.local_b[(slot ^ 1, chunk)] = grads
        else:
            self.to_send[("B", slot, chunk)] = grads

    # ---------------------------------------------------------------------------------------------- F&B
    def _overlapped(self, a: Action) -> None:
        x0 = self._forward_inputs(a.phase, a.chunk)
        x1, loss1, outs1, grads1 = self._backward_inputs(a.b_phase, a.b_chunk)
        criterion0, labels0 = self._loss_args(a.phase, a.chunk)
        with self.store.activate(enabled=False):
            outs0, loss0 = self.overlap_cls.overlapped_forward_backward(
                self.modules[a.phase], x0, criterion0, labels0, self.modules[a.b_phase], loss1, outs1, grads1
            )
        self._after_forward(a.phase, a.chunk, x0, as_tuple(outs0), loss0)
        self._after_backward(a.b_phase, a.b_chunk, x1, loss1)
