"""`EventOverlap`: the handle of an asynchronous dispatch/combine, backed by torch.distributed work objects.

DeepEP's event wraps a CUDA event on its communication stream. Here the communication is an asynchronous
collective (`async_op=True`) on any backend; the event holds its `Work` objects plus a *finisher*, the host-side
step that unpacks the received bytes into the output tensors that were already handed to the caller.

>>> ev = EventOverlap()          # an already-complete event, as returned by synchronous calls
>>> ev.current_stream_wait()
>>> with ev:                      # waits when the block exits
...     pass
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence

import torch


class EPCommError(RuntimeError):
    """A collective of dispatch/combine failed or timed out (a dead, slow or mismatched peer); names the step."""


def wait_work(work, timeout: datetime.timedelta | None, step: str) -> None:
    """Wait for one torch.distributed `Work`, turning backend errors and timeouts into `EPCommError(step)`."""
    try:
        if timeout is None:
            work.wait()
        else:
            work.wait(timeout)
    except Exception as exc:  # gloo raises RuntimeError; NCCL may raise DistBackendError (a RuntimeError too)
        raise EPCommError(f"{step}: {type(exc).__name__}: {exc}") from exc


class EventOverlap:
    """Completion handle of an asynchronous EP call (DeepEP's `EventOverlap`).

    `current_stream_wait()` blocks until the collectives are done and the outputs are filled; `with event:` does
    the same when the block exits, so computation can overlap with communication inside the block.
    `extra_tensors` keeps tensors alive until completion (DeepEP uses it instead of `record_stream`).

    >>> ev = EventOverlap()
    >>> ev.is_completed()
    True
    """

    def __init__(
        self,
        works: Sequence[object] = (),
        finish: Callable[[], None] | None = None,
        extra_tensors: tuple[torch.Tensor, ...] | None = None,
        timeout: datetime.timedelta | None = None,
        step: str = "ep",
    ) -> None:
        self._works = list(works)
        self._finish = finish
        self.extra_tensors = extra_tensors
        self._timeout = timeout
        self._step = step
        self._done = not self._works and finish is None

    # DeepEP exposes the CUDA event as `.event`; there is none here.
    event = None

    def is_completed(self) -> bool:
        """True once `current_stream_wait()` has run (or the call was synchronous)."""
        return self._done

    def current_stream_wait(self) -> None:
        """Wait for the communication and finish the outputs; idempotent."""
        if self._done:
            return
        works, self._works = self._works, []
        for w in works:
            wait_work(w, self._timeout, self._step)
        finish, self._finish = self._finish, None
        if finish is not None:
            finish()
        self.extra_tensors = None
        self._done = True

    def __enter__(self) -> EventOverlap:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.current_stream_wait()
