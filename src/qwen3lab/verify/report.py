"""VerifyReport: everything one verify run found, and the one-sentence verdict every report shows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .compare import Group, TapResult, badness, first_failing, group_results
from .tolerances import Tolerance


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if x != x:
        return "nan"
    if x in (float("inf"), float("-inf")):
        return str(x)
    return f"{x:.3g}" if (x == 0 or 1e-3 <= abs(x) < 1e4) else f"{x:.2e}"


def loc_str(loc: dict | None) -> str:
    return "-" if not loc else " ".join(f"{k} {v}" for k, v in loc.items())


@dataclass
class VerifyReport:
    cfg: Any
    reference: str
    candidate: str
    dtype: str
    tolerance: Tolerance
    input_ids: list[int]
    results: list[TapResult]
    model_path: str | None = None
    test_input: str | None = None
    layers: list[int] | None = None
    decode_steps: int = 0
    isolation: str = "not run"  # "ran", or why it did not
    culprit: TapResult | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how the comparison was made (e.g. MoE routing pinned)
    timings: dict[str, float] = field(default_factory=dict)
    kernels: dict[str, str] | None = None  # which kernel each kind of leaf of the candidate ran (our torch model)
    # (name, candidate array, reference array) of the first divergent tap, for the HTML report
    divergence_arrays: tuple[str, np.ndarray, np.ndarray] | None = None
    culprit_arrays: tuple[str, np.ndarray, np.ndarray] | None = None

    # ---- verdict ----------------------------------------------------------------------------------
    @property
    def first_divergence(self) -> TapResult | None:
        return first_failing(self.results)

    @property
    def compared(self) -> list[TapResult]:
        return [r for r in self.results if r.passed is not None]

    @property
    def overall_success(self) -> bool:
        return bool(self.compared) and all(r.passed for r in self.compared)

    @property
    def missing(self) -> list[TapResult]:
        return [r for r in self.results if r.status == "missing"]

    def groups(self, sublayers: bool = False) -> list[Group]:
        return group_results(self.results, self.cfg, self.tolerance, sublayers=sublayers)

    def layer_counts(self) -> tuple[int, int, int]:
        """(decoder layers tested, passed, failed); a layer of a decode run counts once per step."""
        g = [x for x in self.groups() if 0 <= x.layer_index < self.cfg.num_hidden_layers and x.passed is not None]
        return len(g), sum(1 for x in g if x.passed), sum(1 for x in g if not x.passed)

    def worst(self) -> TapResult | None:
        c = self.compared
        return max(c, key=lambda r: badness(r, self.tolerance)) if c else None

    def sentence(self) -> str:
        fd, cu = self.first_divergence, self.culprit
        n = len(self.compared)
        if not n:
            return (f"Nothing could be compared: the candidate and the reference share no tap "
                    f"({len(self.missing)} missing from the candidate).")
        if fd is None:
            w = self.worst()
            extra = f"; {len(self.missing)} taps missing from the candidate" if self.missing else ""
            return (f"PASS: all {n} compared taps match the reference within {self.tolerance.name} tolerances "
                    f"(worst: {w.name}, relative error {fmt(w.metrics.relative_error if w.metrics else None)})"
                    f"{extra}.")
        why = "; ".join(fd.reasons[:2])
        nfail = sum(1 for r in self.results if r.passed is False)
        head = f"FAIL: first divergence at {fd.name} ({why}); {nfail} taps fail in all"
        if self.isolation != "ran":
            return f"{head}. Isolation not run ({self.isolation})."
        if cu is None:
            return (f"{head}. With the reference's inputs grafted in, no op fails on its own: the error "
                    f"accumulates across ops (rounding) rather than coming from one wrong operation.")
        ninh = sum(1 for r in self.results if r.origin == "inherited")
        own = "; ".join(cu.isolated_reasons[:1])
        if cu.name == fd.name:
            return (f"{head}. Culprit: {cu.name} — its own op fails on the reference's inputs ({own}); "
                    f"{ninh} failing taps only inherit the error.")
        return (f"{head}. Culprit: {cu.name}, the first op that fails on the reference's inputs ({own}); "
                f"{ninh} failing taps, {fd.name} among them, only inherit the error." if fd.origin == "inherited"
                else f"{head}. Culprit: {cu.name}, the first op that fails on the reference's inputs ({own}).")
