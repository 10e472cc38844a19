"""Hypothesis settings for the fuzz tests: QWEN3LAB_FUZZ_EXAMPLES scales every example count (make fuzz)."""

import os

from hypothesis import HealthCheck, settings

SCALE = max(1, int(os.environ.get("QWEN3LAB_FUZZ_EXAMPLES", "1")))


def fuzz(n: int):
    """@fuzz(50): n examples (times QWEN3LAB_FUZZ_EXAMPLES), no deadline, fixture-friendly."""
    return settings(max_examples=n * SCALE, deadline=None, derandomize=SCALE == 1,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
