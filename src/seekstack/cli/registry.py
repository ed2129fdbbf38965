"""Where each component plugs into the command line, the demo and the benchmarks.

Components are listed here by module path and imported only when used, so `seekstack --help` stays fast and a
component that is not built yet (its module is missing) is simply absent.

- A *command* module defines `main(argv: list[str]) -> int` with its own argparse parser.
- A *demo stage* module defines `run_demo(workdir: pathlib.Path) -> dict[str, str]`, a few summary lines.
- A *benchmark* module defines `main(argv: list[str]) -> int`; it prints a table and writes JSON
  (see `seekstack.bench.harness`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # src/seekstack


@dataclass(frozen=True)
class Entry:
    name: str
    module: str
    help: str

    def available(self) -> bool:
        # Look for the file instead of importlib.util.find_spec, which would import the parent package (and torch
        # with it: ~2 s for every `seekstack fs ...` call).
        parts = self.module.split(".")[1:]
        return (_PACKAGE_ROOT.joinpath(*parts[:-1]) / f"{parts[-1]}.py").is_file()

    def load(self):
        return importlib.import_module(self.module)


# Subcommands of `seekstack` (besides demo and bench).
COMMANDS = [
    Entry("eplb", "seekstack.eplb.cli", "rebalance experts for a load file and plot the GPU loads"),
    Entry("pipeline", "seekstack.pipeline.cli", "DualPipe schedules and timelines"),
    Entry("fs", "seekstack.fs.cli", "the 3FS-style distributed file system: up/down/status/ls/cp/cat/..."),
]

# Stages of `seekstack demo`, in the order data flows through the system.
DEMO_STAGES = [
    Entry("dataframe", "seekstack.dataframe.demo", "prepare data with the DuckDB dataframe layer"),
    Entry("fs", "seekstack.fs.demo", "store it on the distributed file system"),
    Entry("eplb", "seekstack.eplb.demo", "balance experts over GPUs for a skewed load"),
    Entry("gemm", "seekstack.gemm.demo", "FP8 GEMM with fine-grained scaling"),
    Entry("mla", "seekstack.mla.demo", "MLA decoding over a paged latent cache"),
    Entry("ep", "seekstack.ep.demo", "expert-parallel dispatch and combine"),
    Entry("pipeline", "seekstack.pipeline.demo", "DualPipe training step"),
]

# Benchmarks of `seekstack bench NAME`.
BENCHMARKS = [
    Entry("eplb", "seekstack.eplb.bench", "vectorised rebalance vs a per-layer loop, DeepSeek-V3 shape"),
    Entry("mla", "seekstack.mla.bench", "MLA decode vs the roofline and the reference path"),
    Entry("gemm", "seekstack.gemm.bench", "FP8 GEMMs vs torch matmul of the same shape"),
    Entry("ep", "seekstack.ep.bench", "dispatch/combine vs raw all_to_all_single"),
    Entry("pipeline", "seekstack.pipeline.bench", "DualPipe vs 1F1B/GPipe/ZB1P bubbles"),
    Entry("fs", "seekstack.fs.bench", "file system throughput vs the local disk"),
    Entry("sort", "seekstack.dataframe.bench_sort", "GraySort vs DuckDB ORDER BY and Polars"),
]


def available(entries: list[Entry]) -> list[Entry]:
    return [e for e in entries if e.available()]
