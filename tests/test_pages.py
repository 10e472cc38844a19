"""pages.release: file pages of memory-mapped tensors are given back, contents stay readable and equal;
anonymous memory is never touched. And an optimized model loaded from a checkpoint holds its weights once."""

from __future__ import annotations

import gc
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qwen3lab import pages

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
    freed = pages.release([t])
    assert freed >= 15 << 20, freed
    assert _rss_kb() <= before - (12 << 10), (before, _rss_kb())  # at least 12 MiB left the RSS
    assert torch.equal(t, src)  # read again: the same bytes, from the file


def test_release_never_touches_anonymous_memory():
    t = torch.randn(4096, 1024)
    keep = t.clone()
    assert pages.release([t]) == 0
    assert pages.release([t[:, :10]]) == 0  # not contiguous: skipped
    assert torch.equal(t, keep)


def _mapped_rss_kb(path) -> int:
    """Resident kB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # a mapping's header line
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(head[1])
    return total


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_load_weights_release_pages(tmp_path, dtype):
    """The scanned (bf16, mapped) or converted (float32 from a bf16 file) checkpoint's pages leave the RSS
    with release_pages=True and stay without it; the loaded values are the same either way."""
    from qwen3lab.config import Qwen3Config
    from qwen3lab.make_model import make_model
    from qwen3lab.weights import load_weights

    make_model(tmp_path, "qwen3-0.6b", layers=1, dtype="bfloat16", seed=0, vocab_size=8192)
    cfg = Qwen3Config.from_file(tmp_path)
    file = tmp_path / "model.safetensors"
    size_kb = file.stat().st_size >> 10
    kept = load_weights(tmp_path, cfg, dtype=dtype)
    resident_kept = _mapped_rss_kb(file)
    want = {n: t.clone() for n, t in kept.items()}
    del kept  # its mapping goes with its tensors
    gc.collect()
    assert _mapped_rss_kb(file) == 0
    given = load_weights(tmp_path, cfg, dtype=dtype, release_pages=True)
    resident_given = _mapped_rss_kb(file)
    assert resident_given < size_kb // 8, (resident_given, size_kb)
    if dtype == torch.bfloat16:  # mapped, scanned: the file stays resident unless released
        assert resident_kept > size_kb // 2, (resident_kept, size_kb)
    for name, t in want.items():
        assert torch.equal(given[name], t), name


@pytest.mark.slow
def test_int8_quantisation_gives_back_each_block_of_a_mapped_weight(tmp_path, monkeypatch):
    """Quantising a memory-mapped weight (a tied embedding becoming an int8 lm_head) releases its file pages
    block by block, so the bf16 original is never resident whole beside its int8 copy; same result as without."""
    from qwen3lab.fast.linear import Int8Linear

    src = torch.randn(8192, 1024).bfloat16()  # 16 MiB
    path = tmp_path / "m.safetensors"
    save_file({"w": src}, str(path))
    with safe_open(str(path), framework="pt") as f:
        t = f.get_tensor("w")
    plain = Int8Linear.from_float(src, rows=512)
    peak = []
    real_release = pages.release

    def spy(tensors, ranges=None):  # the mapping's resident size just before each block is given back
        peak.append(_mapped_rss_kb(path))
        return real_release(tensors, ranges)

    monkeypatch.setattr(pages, "release", spy)
    q = Int8Linear.from_float(t, rows=512, file_ranges=pages.file_ranges())
    assert torch.equal(q.weight, plain.weight) and torch.equal(q.scale, plain.scale)
    # 1 MiB blocks: never more than the block being read and the kernel's readahead (a few MiB), against the
    # whole 16 MiB by the end without the release
    assert len(peak) == 16 and max(peak) <= 8 << 10, peak
    assert _mapped_rss_kb(path) <= 1 << 10, _mapped_rss_kb(path)
    assert torch.equal(t, src)  # still readable: the pages fault back in from the file
