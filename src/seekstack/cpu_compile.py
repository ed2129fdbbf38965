"""Small CPU kernels compiled by TorchInductor into one vectorised C++ loop, with the eager path as the fallback.

Some CPU hot spots are chains of elementwise torch ops whose eager form makes one memory pass per op (EP's
combine sums); compiled, they make one. (Work too small per call for a compiled function's ~30 us of guards
goes to `seekstack.cpu_native` instead.) A `CompiledKernel` compiles on its first
call in a process (1-7 s; inductor caches the generated library on disk), recompiles for each new *variant* (the
caller's key for what changes the traced graph: list lengths, a static size) up to `max_variants`, and returns
False instead of running whenever the eager path should run: compilation switched off, too many variants, or any
compile error (no C++ compiler, say), after which every kernel of the process stays eager and a warning says why.
Callers check results bit for bit against their eager path in the tests.

`SEEKSTACK_CPU_COMPILE`: `auto` (default: callers compile large calls only), `always` (every eligible call; the
tests use it) or `off`.

>>> import torch
>>> double = CompiledKernel("double", lambda x, out: out.copy_(x * 2))
>>> # double(("f32",), x, out) -> True, out == 2 * x; False when compiling is off or failed
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

_failed: str | None = None  # why compiling failed in this process; every kernel is eager from then on


def mode() -> str:
    value = os.environ.get("SEEKSTACK_CPU_COMPILE", "auto").strip().lower()
    if value in ("0", "off", "false", "no"):
        return "off"
    if value in ("1", "always", "on", "true", "yes"):
        return "always"
    return "auto"


def failed() -> str | None:
    """Why compiled kernels are off in this process (a compile error), or None."""
    return _failed


class CompiledKernel:
    """`fn(*args)` compiled with `torch.compile(fullgraph=True)`; see the module docstring.

    `dynamic`: True makes every size symbolic (one compile for all shapes); None compiles sizes as constants
    except those the caller marks with `torch._dynamo.mark_dynamic` (faster loops when, say, the row length is
    fixed per variant).
    """

    def __init__(self, name: str, fn: Callable, *, dynamic: bool | None = True, max_variants: int = 6):
        self.name, self.fn, self.dynamic, self.max_variants = name, fn, dynamic, max_variants
        self.variants: set = set()
        self.calls = 0  # calls that ran compiled (the tests check the path was taken)
        self._compiled = None

    def usable(self, variant) -> bool:
        """Whether a call of this variant would run compiled (no compile failure, room for a new variant)."""
        if mode() == "off" or _failed is not None:
            return False
        return variant in self.variants or len(self.variants) < self.max_variants

    def __call__(self, variant, *args) -> bool:
        global _failed
        if not self.usable(variant):
            return False
        try:
            import torch
            from torch._dynamo import config as dynamo_config  # imported on first use: it takes ~1 s

            if self._compiled is None:
                self._compiled = torch.compile(self.fn, dynamic=self.dynamic, fullgraph=True)
            # dynamo's own recompile limit (8 per function) must not turn into a silent slow eager run
            with dynamo_config.patch(fail_on_recompile_limit_hit=True):
                self._compiled(*args)
        except Exception as exc:  # the eager path is always right
            _failed = f"{self.name}: {exc!r:.200}"
            warnings.warn(f"seekstack: compiled CPU kernels are off, eager paths run ({_failed})", stacklevel=2)
            return False
        self.variants.add(variant)
        self.calls += 1
        return True
