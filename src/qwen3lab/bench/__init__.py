"""Benchmarks: `qwen3lab bench attention|moe|generate` (run.run_bench_command), the harness, bandwidth/roofline."""

from .run import click_options, run_bench_command

__all__ = ["run_bench_command", "click_options"]
