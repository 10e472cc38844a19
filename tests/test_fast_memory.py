"""fast.memory.release: file pages of memory-mapped tensors are given back, contents stay readable and equal;
anonymous memory is never touched. And an optimized model loaded from a checkpoint holds its weights once."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qwen3lab.fast import memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise / /proc/self/maps: Linux")


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_release_file_pages_keeps_contents(tmp_path):
    src = torch.randn(4096, 1024)  # 16 MiB
    save_file({"w": src}, str(tmp_path / "m.safetensors"))
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        t = f.get_tensor("w")
    assert torch.equal(t, src)  # every page read: resident
    before = _rss_kb()
    freed = memory.release([t])
    assert freed >= 15 << 20, freed
    assert _rss_kb() <= before - (12 << 10), (before, _rss_kb())  # at least 12 MiB left the RSS
    assert torch.equal(t, src)  # read again: the same bytes, from the file


def test_release_never_touches_anonymous_memory():
    t = torch.randn(4096, 1024)
    keep = t.clone()
    assert memory.release([t]) == 0
    assert memory.release([t[:, :10]]) == 0  # not contiguous: skipped
    assert torch.equal(t, keep)
