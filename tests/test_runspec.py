"""RunSpec (runspec.py): the one place a run's device / dtype / quant / fast path / kernel set / threads / ndev
are checked. Each refusal is one InputError naming the options as the caller spells them."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest
import torch

from qwen3lab import runspec
from qwen3lab.errors import InputError
from qwen3lab.runspec import MultiDeviceError, RunSpec

HAS_CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("kw,want", [
    ({}, ("cpu", "bfloat16", None, True)),
    ({"dtype": "int8"}, ("cpu", "bfloat16", "int8", True)),
    ({"dtype": "float32", "quant": "int8"}, ("cpu", "float32", "int8", True)),
    ({"dtype": "bf16", "fast": False}, ("cpu", "bfloat16", None, False)),
    ({"dtype": torch.float64}, ("cpu", "float64", None, True)),
    ({"dtype": "fp16", "fast": True}, ("cpu", "float16", None, True)),
])
def test_accepted_combinations(kw, want):
    s = RunSpec.make(**kw)
    assert (s.device, s.dtype, s.quant, s.fast) == want
    assert s.torch_dtype == getattr(torch, want[1])
    assert s.label == (want[2] or want[1])  # what a quantised model's .dtype reads


def test_describe_names_weights_and_activations():
    assert RunSpec.make(dtype="int8").describe() == "int8 weights, bfloat16 activations"
    assert RunSpec.make(dtype="float32", quant="int8").describe() == "int8 weights, float32 activations"
    assert RunSpec.make(dtype="float32").describe() == "float32"


@pytest.mark.parametrize("kw,cli,msg", [
    ({"dtype": "float16", "quant": "int8"}, True,
     "--quant int8 needs --dtype float32 or bfloat16 activations, got --dtype float16"),
    ({"dtype": "float16", "quant": "int8"}, False,
     "quant='int8' needs dtype 'float32' or 'bfloat16' activations, got dtype='float16'"),
    ({"dtype": "int8", "fast": False}, True, "--dtype int8: int8 weights need the fast path; drop --no-fast"),
    ({"dtype": "int8", "fast": False}, False, "dtype='int8': int8 weights need the fast path (fast=True)"),
    ({"dtype": "int8", "quant": "int9"}, False, "dtype='int8' means quant='int8', but quant='int9' was given"),
    ({"quant": "int9"}, True, "--quant must be one of"),
    ({"dtype": "float8"}, False, "dtype 'float8' is not supported; use one of float32, bfloat16"),
    ({"threads": 0}, True, "--threads must be >= 1, got 0"),
    ({"threads": 0}, False, "threads must be >= 1, got 0"),
    ({"ndev": 0}, False, "ndev must be an integer >= 1, got 0"),
    ({"device": "nonsense"}, False, "invalid device 'nonsense'"),
    ({"dtype": "bfloat16", "group_size": 32}, False, "group_size=32 is for int4 weights only"),
], ids=lambda v: str(v)[:40])
def test_refusals_are_one_line_naming_the_options(kw, cli, msg):
    with pytest.raises(InputError) as e:
        RunSpec.make(cli=cli, **kw)
    assert msg in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusals of a machine without CUDA")
def test_device_refusals_without_cuda():
    # the quantised / fast-path refusal names the options before the missing device is noticed
    with pytest.raises(InputError, match="--dtype int8: int8 weights run on the CPU fast path only, got --device cuda"):
        RunSpec.make("cuda", "int8", cli=True)
    with pytest.raises(InputError, match="backend 'torch-fast' runs on the CPU only"):
        RunSpec.make("cuda", "float32", fast=True, fast_name="backend 'torch-fast'")
    with pytest.raises(InputError, match="no CUDA device is available"):
        RunSpec.make("cuda", "float32")
    if not torch.cuda.is_available():  # ndev on cpu: tensor-parallel ranks, one core each, no fast path
        assert RunSpec.make(ndev=2).fast is False
    k = (os.cpu_count() or 1) + 1
    with pytest.raises(MultiDeviceError, match=f"ndev={k} cpu ranks need a core each"):
        RunSpec.make(ndev=k)


def test_kernel_set_is_read_and_checked(monkeypatch):
    monkeypatch.setenv(runspec.KERNEL_ENV, "torch")
    assert RunSpec.make().kernels == "torch"
    assert RunSpec.make(fast=False).kernels is None  # the plain eager model runs no kernel set
    monkeypatch.setenv(runspec.KERNEL_ENV, "sse9")
    with pytest.raises(InputError, match="QWEN3LAB_KERNELS must be one of torch, avx512, avx2, portable, got 'sse9'"):
        RunSpec.make()
    lacking = [p for p in runspec.KERNEL_PATHS if runspec.missing(p)]
    for p in lacking:  # a path this CPU cannot run: refused, naming what is missing
        monkeypatch.setenv(runspec.KERNEL_ENV, p)
        with pytest.raises(InputError, match=f"{runspec.KERNEL_ENV}={p}: this CPU lacks"):
            RunSpec.make()
    monkeypatch.setenv(runspec.KERNEL_ENV, "portable")  # every CPU has it
    assert RunSpec.make().kernels == "portable"
    monkeypatch.delenv(runspec.KERNEL_ENV)
    assert RunSpec.make().kernels is None


def test_stream_prefetch_is_read_and_checked(monkeypatch):
    monkeypatch.delenv(runspec.PREFETCH_ENV, raising=False)
    info = {}
    monkeypatch.setattr(runspec, "_cpuinfo", lambda field: info.get(field, ""))
    # the measured table, else none: (weights narrower than float32, float32 weights)
    cases = (("GenuineIntel", "6", "207", (4096, 4096)), ("AuthenticAMD", "25", "1", (1024, 0)),  # Zen 3 EPYC
             ("AuthenticAMD", "25", "17", (0, 0)), ("AuthenticAMD", "23", "1", (0, 0)),  # Zen 4, Zen 1
             ("AuthenticAMD", "", "", (0, 0)), ("", "", "", (0, 0)))
    for vendor, family, model, want in cases:
        info.update({"vendor_id": vendor, "cpu family": family, "model": model})
        assert runspec.stream_prefetch() == want, (vendor, family, model)
    monkeypatch.setenv(runspec.PREFETCH_ENV, " 4096 ")
    assert runspec.stream_prefetch() == (4096, 4096)
    monkeypatch.setenv(runspec.PREFETCH_ENV, "1024, 0")
    assert runspec.stream_prefetch() == (1024, 0)
    monkeypatch.setenv(runspec.PREFETCH_ENV, "0")
    assert runspec.stream_prefetch() == (0, 0)
    for bad in ("2k", "-64", str(runspec.PREFETCH_MAX + 1), "1024,", "1,2,3", "512,-1"):
        monkeypatch.setenv(runspec.PREFETCH_ENV, bad)
        with pytest.raises(InputError, match=f"QWEN3LAB_PREFETCH must be a byte count from 0 to 1048576, or two "
                                             f"separated by a comma .*, got '{bad}'"):
            RunSpec.make()  # refused with the rest of the run's choices, before a file is read
    assert RunSpec.make(fast=False).fast is False  # the eager model has no kernels to set it on


def test_cpu_vendor_comes_from_cpuinfo():
    vendor = runspec.cpu_vendor()
    assert isinstance(vendor, str)
    if platform.machine().lower() in ("x86_64", "amd64") and Path("/proc/cpuinfo").exists():
        assert vendor in Path("/proc/cpuinfo").read_text()
        assert vendor


def test_cpu_features_come_from_cpuinfo():
    """Against the raw text of /proc/cpuinfo (a word search, not runspec's parser): every path offered has all
    its flags there, every path refused misses one."""
    import platform
    from pathlib import Path

    info = Path("/proc/cpuinfo")
    if not info.is_file() or platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("needs an x86-64 Linux /proc/cpuinfo")
    words = set(info.read_text().split())
    paths = runspec.available_paths()
    assert paths[-1] == "portable"
    for p in runspec.KERNEL_PATHS:
        has_all = all(f in words for f in runspec.NEEDS[p])
        assert (p in paths) == has_all, (p, sorted(runspec.NEEDS[p] - words))
