"""`seekstack.cpu_compile`: compiled when it can, False (for the caller's eager path) when it must not."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch._dynamo

from seekstack import cpu_compile

needs_compiler = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="TorchInductor's CPU needs a C++ compiler"
)


def _double(x: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(x * 2 + 1)


def _untraceable(x: torch.Tensor, out: torch.Tensor) -> None:
    torch._dynamo.graph_break()  # what a kernel dynamo cannot trace whole does: fullgraph=True raises
    out.copy_(x)


@needs_compiler
def test_runs_compiled_and_caps_variants(monkeypatch):
    monkeypatch.setattr(cpu_compile, "_failed", None)
    monkeypatch.setenv("SEEKSTACK_CPU_COMPILE", "always")
    kernel = cpu_compile.CompiledKernel("double", _double, max_variants=1)
    x, out = torch.randn(37, 129), torch.full((37, 129), float("nan"))
    assert kernel("a", x, out) and torch.equal(out, x * 2 + 1)
    assert kernel("a", x[:5], out[:5]) and kernel.calls == 2
    assert not kernel.usable("b") and not kernel("b", x, out)  # a second variant is over the cap
    monkeypatch.setenv("SEEKSTACK_CPU_COMPILE", "off")
    assert not kernel("a", x, out) and kernel.calls == 2


def test_a_compile_error_turns_every_kernel_eager(monkeypatch):
    monkeypatch.setattr(cpu_compile, "_failed", None)  # restored after the test: other tests compile again
    monkeypatch.setenv("SEEKSTACK_CPU_COMPILE", "always")
    bad = cpu_compile.CompiledKernel("untraceable", _untraceable)
    good = cpu_compile.CompiledKernel("double", _double)
    x, out = torch.ones(4, 8), torch.zeros(4, 8)
    with pytest.warns(UserWarning, match="eager paths run"):
        assert not bad("v", x, out)
    assert "untraceable" in cpu_compile.failed()
    assert not good.usable("v") and not good("v", x, out) and good.calls == 0


def test_mode_reads_the_environment(monkeypatch):
    for value, want in [("", "auto"), ("auto", "auto"), ("always", "always"), ("1", "always"), ("off", "off")]:
        monkeypatch.setenv("SEEKSTACK_CPU_COMPILE", value)
        assert cpu_compile.mode() == want
