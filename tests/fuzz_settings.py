"""Hypothesis settings for the fuzz tests: QWEN3LAB_FUZZ_EXAMPLES scales every example count (make fuzz); and
`deadline`, which makes a case that hangs fail instead of hanging the suite."""

import os
import signal
from contextlib import contextmanager

from hypothesis import HealthCheck, settings

SCALE = max(1, int(os.environ.get("QWEN3LAB_FUZZ_EXAMPLES", "1")))


def fuzz(n: int):
    """@fuzz(50): n examples (times QWEN3LAB_FUZZ_EXAMPLES), no deadline, fixture-friendly."""
    return settings(max_examples=n * SCALE, deadline=None, derandomize=SCALE == 1,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@contextmanager
def deadline(seconds: int = 20):
    """Raise TimeoutError in the block after `seconds` (SIGALRM interrupts Python code, jinja renders included):
    the inputs these cases throw used to loop for minutes or forever."""
    def on_alarm(*_):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
