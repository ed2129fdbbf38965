"""Triton without a GPU: its CPU interpreter must be chosen before triton is first imported.

TRITON_INTERPRET=1 has to be set before triton.language is first imported: its own library functions (the combine
functions of tl.max, tl.sum, ...) are decorated at that moment, and decorated in compiled mode they make every
interpreted kernel that reduces fail. torch imports triton behind our back (creating any torch.optim optimizer
imports torch._dynamo, which imports triton), so `import seekstack` already calls `prepare_triton(cheap=True)`,
and each kernel module calls `prepare_triton()` again before its own `import triton`.
"""

from __future__ import annotations

import os
import sys

# Device nodes a CUDA (NVIDIA) or ROCm driver creates; without any of them torch.cuda cannot be available.
_GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia/version", "/dev/kfd")


def _has_cuda(cheap: bool) -> bool:
    if cheap:  # no torch import: `import seekstack` stays fast for the file-system tools
        return any(os.path.exists(p) for p in _GPU_DEVICE_FILES)
    import torch

    return torch.cuda.is_available()


def prepare_triton(cheap: bool = False) -> bool:
    """Select Triton's CPU interpreter when there is no GPU and triton is not imported yet.

    Returns True if Triton kernels will run in the interpreter.
    """
    if "triton.language" not in sys.modules and not _has_cuda(cheap):
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def imported_too_early() -> bool:
    """True when triton was imported in compiled mode on a machine without CUDA (its kernels cannot run)."""
    return "triton.language" in sys.modules and not _has_cuda(False) and not prepare_triton()
