"""Benchmark settings shared by every bench: --device / --dtype resolved to torch's, and torch's thread count for
one run (option parsing, which needs no torch, is in options.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..errors import InputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def resolve_device(name: str) -> torch.device:
    """torch.device for --device; a clear error when CUDA is asked for and missing."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r}: not a device name (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                f"{'built without CUDA' if torch.version.cuda is None else 'no visible GPU'})"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type != "cpu":
        raise InputError(f"--device {name}: benchmarks run on cpu or cuda")
    return dev


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise InputError(f"--dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_counts(warmups: int, runs: int) -> None:
    if warmups < 0:
        raise InputError(f"--warmups must be >= 0, got {warmups}")
    if runs < 1:
        raise InputError(f"--runs must be >= 1, got {runs}")


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with n intra-op threads (None: leave torch's setting)."""
    if n is None:
        yield
        return
    if n < 1:
        raise InputError(f"--threads must be >= 1, got {n}")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
