"""Benchmarks of an export: speed per exit against its floor, engine overhead, switching, memory, peers."""

from balcony_edge.bench.benchmark import BenchConfig, run_bench

__all__ = ["BenchConfig", "run_bench"]
