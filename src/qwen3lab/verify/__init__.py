"""Layer-by-layer verification of a Qwen3 implementation against a reference (`qwen3lab verify`).

`verify(reference, candidate, input_ids, ...) -> VerifyReport`: every tap compared (metrics.py) against
per-dtype tolerances (tolerances.py), the first divergence in dataflow order and, by re-running the
candidate on the reference's taps, the culprit op (isolate.py); reports for the terminal, JSON and HTML.

The package itself is callable, so `qwen3lab.verify(reference, candidate, ...)` (DESIGN.md's public
surface) works while `qwen3lab.verify.metrics` etc. stay importable submodules.
"""

import sys
import types

from .compare import TapResult
from .report import VerifyReport
from .runner import DEFAULT_TEST_INPUT, verify
from .tolerances import Tolerance, tolerance_for

__all__ = ["DEFAULT_TEST_INPUT", "TapResult", "Tolerance", "VerifyReport", "tolerance_for", "verify"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs) -> VerifyReport:
        return verify(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
