"""Timing: every clock read after a device synchronise (queued CUDA work is never half-counted), warm-ups run
first and are not recorded, medians and percentiles of the runs, a progress bar, and the busy-machine warning
(other work on the CPU skews every figure: the report says so)."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    """Seconds; the device is synchronised first so queued kernels are counted."""
    sync(device)
    return time.perf_counter()


@dataclass
class Sample:
    """One timed run: total seconds and the marks (seconds from the start) the run reported."""

    total: float
    marks: list[float] = field(default_factory=list)


def run_timed(
    fn: Callable[[Callable[[], float]], Any],
    device: torch.device,
    warmups: int,
    runs: int,
    setup: Callable[[], Any] | None = None,
    progress: Progress | None = None,
    label: str = "",
) -> list[Sample]:
    """Call `fn(mark)` warmups + runs times; `mark()` returns seconds since this run started (synchronised).

    `setup()` (untimed) runs before every call, e.g. to reset a KV cache to its past length.
    """
    samples: list[Sample] = []
    task = progress.add(label, warmups + runs) if progress else None
    with torch.inference_mode():
        for i in range(warmups + runs):
            if setup is not None:
                setup()
            mark = _Marker(device)
            fn(mark)
            total = clock(device) - mark.t0
            marks = mark.marks
            if i >= warmups:
                samples.append(Sample(total, marks))
            if progress:
                progress.advance(task)
    return samples


class _Marker:
    """mark() -> seconds since this run started (device synchronised); the marks are kept in order."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: list[float] = []
        self.t0 = clock(device)

    def __call__(self) -> float:
        m = clock(self.device) - self.t0
        self.marks.append(m)
        return m


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    s = sorted(xs)
    if len(s) == 1:
        return float(s[0])
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))


class Progress:
    """rich progress bars on stderr (stdout keeps the table and the JSON line)."""

    def __init__(self, enabled: bool = True):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        self._p = RichProgress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=Console(stderr=True), transient=True, disable=not enabled,
        )

    def __enter__(self) -> Progress:
        self._p.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._p.__exit__(*exc)

    def add(self, label: str, total: int):
        return self._p.add_task(label, total=total)

    def advance(self, task) -> None:
        self._p.advance(task)

    def log(self, text: str) -> None:
        self._p.console.print(text, highlight=False)


def busy_warning(report: dict[str, Any]) -> str | None:
    """A sentence when other work shared the CPU during the bench: CPU figures are then unreliable (and a
    thread pool may stall on preempted threads). Judged from the 1-minute load average at the start and at
    the end; at the end the bench's own threads are part of it and are subtracted."""
    m, settings = report["machine"], report.get("settings") or {}
    if not str(settings.get("device", "cpu")).startswith("cpu"):
        return None
    cores = m.get("cores") or 1
    others = []
    if settings.get("loadavg_start"):
        others.append(settings["loadavg_start"][0])
    if m.get("loadavg"):
        others.append(m["loadavg"][0] - (m.get("torch_threads") or 1))
    worst = max(others, default=0.0)
    if worst > 0.5 * cores:
        return (f"other work shared the CPU (about {worst:.1f} busy threads besides this bench on {cores} cores): "
                f"CPU figures are unreliable; rerun when the machine is idle")
    return None
