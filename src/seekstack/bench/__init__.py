"""Benchmark harness shared by every component (`seekstack bench NAME`)."""

from seekstack.bench.harness import Report, hardware, measure

__all__ = ["Report", "hardware", "measure"]
