"""Peak memory of a measured phase: on CPU the process RSS high-water mark (VmHWM), reset through
/proc/self/clear_refs before each phase (tracemalloc does not see torch's allocator); on CUDA
torch.cuda.max_memory_allocated after reset_peak_memory_stats."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import pages
from ..guards import proc_kb
from .timing import sync


def _status_bytes(key: str) -> int | None:
    return proc_kb("/proc/self/status", key)


def rss_bytes() -> int | None:
    """Current resident set size of this process (Linux), else None."""
    return _status_bytes("VmRSS")


class PeakMemory:
    """Peak memory of a phase: `with PeakMemory(device) as pm: ...; pm.peak_bytes`.

    CPU: RSS high-water mark of the whole process (so it includes the interpreter, torch and any model
    still alive), reset on entry. Where the reset is not possible, `reset_ok` is False and the figure is
    the high-water mark since the process started. On entry the C allocator first returns the memory it
    holds free to the kernel (`pages.trim_heap`): otherwise a phase that reuses what an earlier one freed (the
    second model a bench loads) grows RSS by less than it allocates, and its growth reads too low.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes: int | None = None
        self.start_bytes: int | None = None  # resident (CPU) / allocated (CUDA) bytes on entry
        self.reset_ok = True

    def growth_over(self, nbytes: int) -> float | None:
        """(peak - bytes on entry) / nbytes: e.g. a load's peak memory in units of the weights it loaded."""
        if self.peak_bytes is None or self.start_bytes is None or not nbytes or not self.reset_ok:
            return None
        return (self.peak_bytes - self.start_bytes) / nbytes

    def __enter__(self) -> PeakMemory:
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = int(torch.cuda.memory_allocated(self.device))
        else:
            pages.trim_heap()
            self.start_bytes = rss_bytes()
            try:
                # "5" resets the peak RSS counter of this process (Linux >= 4.0).
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.reset_ok = False
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        if self.device.type == "cuda":
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            hwm = _status_bytes("VmHWM")
            if hwm is None:
                import resource

                hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
                self.reset_ok = False
            self.peak_bytes = hwm
