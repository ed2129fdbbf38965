"""Pickling of tasks and user functions for worker processes (process pool or Ray).

User functions defined in test files or scripts may live in modules a worker cannot import, so they are pickled by
value with cloudpickle (the standalone package, or the copy vendored in Ray).
"""

from __future__ import annotations

import pickle
import sys
import sysconfig
from types import ModuleType

try:  # pragma: no cover - depends on the environment
    import cloudpickle as _cp
except ImportError:  # pragma: no cover
    try:
        import ray.cloudpickle as _cp
    except ImportError:
        _cp = None

_LIB_DIRS = tuple({sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")})


def _by_value(module: ModuleType | None) -> bool:
    if module is None or module.__name__ in ("__main__", "builtins"):
        return False
    if module.__name__.split(".")[0] == "seekstack":
        return False
    path = getattr(module, "__file__", None) or ""
    return not path.startswith(_LIB_DIRS)


def register_function(fn) -> None:
    """Make sure `fn`'s module is pickled by value when workers might not be able to import it."""
    if _cp is None:
        return
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    if _by_value(module):
        try:
            _cp.register_pickle_by_value(module)
        except (ValueError, ImportError):  # already registered, or not a real module
            pass


def dumps(obj) -> bytes:
    """Serialize a task (which may hold user functions)."""
    if _cp is not None:
        return _cp.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def loads(blob: bytes):
    return pickle.loads(blob)
