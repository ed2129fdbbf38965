"""The examples in the package's docstrings run."""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize("module", ["seekstack.mla", "seekstack.mla.interface", "seekstack.mla.metadata",
                                    "seekstack.mla.fp8_cache", "seekstack.mla.cpu_plan"])  # fmt: skip
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_works_without_triton():
    """Triton is an optional extra: the package imports and decodes on CPU when it is missing."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from seekstack.mla import flash_mla_with_kvcache\n"
        "from seekstack.mla.testing import make_case\n"
        "case = make_case(2, 1, 16, 1, 50)\n"
        "out, lse = flash_mla_with_kvcache(*case.args())\n"
        "assert 'seekstack.mla.triton_decode' not in sys.modules and out.shape == (2, 1, 16, 512)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
