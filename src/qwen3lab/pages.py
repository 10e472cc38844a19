"""Give back the resident pages of memory-mapped checkpoint tensors once they have been copied or read.

Weights load as views of the memory-mapped safetensors file (weights.py). Fusing q/k/v (gate/up) or
quantising copies them; the copies are what the model reads from then on, but the file pages already read
stay resident in the mapping and count in the process RSS: without this, a bf16 Qwen3-0.6B peaked at ~1.85x
its weight bytes. `release(t)` calls madvise(MADV_DONTNEED) on the whole pages inside a tensor that lies in a
private *file* mapping: the kernel drops them, and any later read (a caller still holding the original
tensor) faults the same bytes back in from the file, so no one can observe it. Anonymous memory is never
touched (DONTNEED would zero it). Linux only; elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import sys

import torch

MADV_DONTNEED = 4
PAGE = mmap.PAGESIZE


def file_ranges() -> list[tuple[int, int]]:
    """(start, end) of this process's file-backed mappings, from /proc/self/maps."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) < 6 or parts[4] == "0" or parts[5].startswith("["):
                    continue  # anonymous (inode 0) or a special mapping ([heap], [stack], ...)
                a, b = parts[0].split("-")
                out.append((int(a, 16), int(b, 16)))
    except OSError:
        return []
    return out


@functools.cache  # find_library runs `ldconfig -p` (~1 ms): once, not per released block
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


def release(tensors, ranges: list[tuple[int, int]] | None = None) -> int:
    """Drop the resident file pages under each tensor (those wholly inside it); returns bytes released."""
    libc = _libc()
    if libc is None:
        return 0
    ranges = file_ranges() if ranges is None else ranges
    done = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.numel() == 0 or not t.is_contiguous():
            continue
        lo = t.data_ptr()
        hi = lo + t.numel() * t.element_size()
        start, end = -(-lo // PAGE) * PAGE, hi // PAGE * PAGE
        if end <= start or not any(a <= lo and hi <= b for a, b in ranges):
            continue
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED) == 0:
            done += end - start
    return done


def trim_heap() -> bool:
    """Give the C heap's free memory back to the kernel (glibc malloc_trim); False where there is none. Freed
    memory the allocator keeps is reused without new page faults, so a phase measured by RSS growth after
    another phase freed memory would otherwise read too low (bench/harness.py PeakMemory)."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)  # glibc only (not musl)
    return bool(trim is not None and trim(0) >= 0)
