"""Zero-bubble weight-gradient deferral: backward computes input grads now and queues weight grads for a W step.

Each pipeline owns its own store, so two pipelines in one process never share a queue. Modules written against
upstream's class-level API keep working: `WeightGradStore.enabled` and `WeightGradStore.put(fn)` on the *class*
refer to the store of the pipeline whose backward is running right now (or a process default outside one).

>>> store = WeightGradStore()
>>> grads = []
>>> with store.activate(enabled=True):
...     if WeightGradStore.enabled:            # what a cooperating autograd.Function checks in backward
...         WeightGradStore.put(lambda: grads.append("dW"))
>>> store.flush(); store.pop(); grads
['dW']
"""

from __future__ import annotations

import contextlib
import queue
import threading
import types
from collections.abc import Callable


class _StoreMeta(type):
    """Class-level `enabled` reads and writes the current store (upstream modules test `WeightGradStore.enabled`)."""

    @property
    def enabled(cls) -> bool:
        return cls.current().enabled

    @enabled.setter
    def enabled(cls, value: bool) -> None:
        cls.current().enabled = value


class _OnCurrent:
    """A method that runs on the instance, or, called on the class, on the current store."""

    def __init__(self, fn):
        self.fn = fn
        self.__doc__ = fn.__doc__

    def __get__(self, obj, cls):
        return types.MethodType(self.fn, obj if obj is not None else cls.current())


class WeightGradStore(metaclass=_StoreMeta):
    """A FIFO of weight-gradient groups: `put` adds to the open group, `flush` closes it, `pop` runs the oldest."""

    _local = threading.local()
    _default: WeightGradStore | None = None

    def __init__(self) -> None:
        self.enabled = False
        self.cache: list[Callable[[], None]] = []
        self.funcs_queue: queue.Queue = queue.Queue()
        self.applied = 0  # deferred weight-gradient functions run so far (shows zero-bubble actually happened)

    @classmethod
    def current(cls) -> WeightGradStore:
        """The store of the backward now running on this thread, else a process-wide default."""
        stack = getattr(cls._local, "stack", None)
        if stack:
            return stack[-1]
        if cls._default is None:
            cls._default = WeightGradStore()
        return cls._default

    @contextlib.contextmanager
    def activate(self, enabled: bool = False):
        """Make this the current store (class-level calls go here) with `enabled` set, for one backward."""
        stack = self._local.__dict__.setdefault("stack", [])
        stack.append(self)
        previous, self.enabled = self.enabled, enabled
        try:
            yield self
        finally:
            self.enabled = previous
            stack.pop()

    @_OnCurrent
    def put(self, func: Callable[[], None]) -> None:
        """Defer `func` (a weight-gradient computation) into the open group."""
        self.cache.append(func)

    @_OnCurrent
    def flush(self) -> None:
        """Close the open group: everything put since the last flush becomes one W step."""
        self.funcs_queue.put(self.cache)
        self.cache = []

    @_OnCurrent
    def pop(self) -> None:
        """Run the oldest group (one W step)."""
        if self.funcs_queue.empty():
            raise RuntimeError("WeightGradStore.pop: no deferred weight-gradient group is queued")
        for func in self.funcs_queue.get():
            func()
            self.applied += 1

    @_OnCurrent
    def clear(self) -> None:
        """Drop everything queued (e.g. after an aborted step)."""
        self.cache = []
        self.funcs_queue = queue.Queue()

    def __len__(self) -> int:
        return self.funcs_queue.qsize()
