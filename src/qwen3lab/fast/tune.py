"""Which GEMM runs a many-row (prefill) linear with bfloat16 activations on this CPU: measured, not assumed.

Two ways to multiply M > SMALL_M rows by a bfloat16 or int8 weight:
- "ours": the kernels' `linear_large`, the weight widened to float32 a band of rows at a time + BLAS sgemm;
- "torch": torch's own bfloat16 matmul (oneDNN), over the bf16 weight as stored, or for int8 over bands of
  the int8 weight widened to bfloat16 (exact: |q| <= 127 fits bf16's 8-bit significand) and scaled after.
Neither wins everywhere and no CPU flag tells which will: on an Intel Xeon with AVX512-BF16 (no AMX) the
sgemm route was 1.4x faster at 64 rows; on an AMD EPYC (Zen 4, also AVX512-BF16) torch's bf16 matmul ran
~400 GFLOP/s on 2 cores against ~150 for the sgemm route (benchmarks/bench_fast_kernels.py). So the first
`choose()` times both on one projection-sized product (~0.1 s) and keeps the faster for the process.

Both accumulate in float32 and round once to bfloat16 (int8 through "torch": twice, the product and then the
scaled product, ~1.5x the rounding error of one). `QWEN3LAB_GEMM=ours|torch` fixes the choice, e.g. for
bit-identical prefills across processes on a noisy machine.
"""

from __future__ import annotations

import os
import threading
import time

import torch

from ..errors import InputError
from .build import kernels
from .gemm import band_rows_for, int8_gemm_bf16

ENV = "QWEN3LAB_GEMM"
CHOICES = ("ours", "torch")
KINDS = ("bfloat16", "int8")  # weight dtypes with bf16 activations; float32 activations always use sgemm

_lock = threading.Lock()
_chosen: dict[str, str] = {}  # kind -> "ours" | "torch"
_timings: dict[str, dict[str, float]] = {}  # kind -> {choice: ms}, for status()


def _forced() -> str | None:
    v = os.environ.get(ENV, "").strip().lower()
    if not v:
        return None
    if v not in CHOICES:
        raise InputError(f"{ENV} must be one of {', '.join(CHOICES)}, got {v!r}")
    return v


def _best_ms(fn, runs: int = 3) -> float:
    fn()  # warm: first-call setup (oneDNN primitive creation, page faults) is not the steady state
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def _measure(kind: str, k) -> dict[str, float]:
    """ms of each choice on a [128, 1024] x [4096, 1024]^T product (a Qwen3 projection's shape at prefill)."""
    g = torch.Generator().manual_seed(0)
    M, K, N = 128, 1024, 4096
    x = torch.randn(M, K, generator=g).bfloat16()
    W = (torch.randn(N, K, generator=g) * 0.02).bfloat16()
    if kind == "bfloat16":
        ours = lambda: k.linear_large(x, W, None, band_rows_for(K))  # noqa: E731
        theirs = lambda: torch.nn.functional.linear(x, W)  # noqa: E731
    else:
        q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
        s = torch.full((N,), 0.01)
        ours = lambda: k.linear_large(x, q, s, band_rows_for(K))  # noqa: E731
        theirs = lambda: int8_gemm_bf16(x, q, s)  # noqa: E731
    with torch.inference_mode():
        return {"ours": _best_ms(ours), "torch": _best_ms(theirs)}


def choose(kind: str) -> str:
    """"ours" or "torch" for a many-row linear over `kind` weights ("bfloat16" | "int8") with bf16 activations.
    Measured once per process (needs the kernels: without them there is nothing to choose, "torch")."""
    got = _chosen.get(kind)
    if got is not None:
        return got
    assert kind in KINDS, kind
    with _lock:
        if kind not in _chosen:
            forced, k = _forced(), kernels()
            if forced is not None or k is None:
                _chosen[kind] = forced or "torch"
            else:
                _timings[kind] = ms = _measure(kind, k)
                _chosen[kind] = min(CHOICES, key=lambda c: ms[c])
    return _chosen[kind]


def status() -> str:
    """One line: what each many-row linear decided so far uses, with the timings it was chosen by ("" if none)."""
    parts = []
    for kind, c in sorted(_chosen.items()):
        ms = _timings.get(kind)
        how = f"{ms['ours']:.1f} vs {ms['torch']:.1f} ms" if ms else f"set by {ENV}" if _forced() else "no kernels"
        parts.append(f"{kind} {'widened sgemm' if c == 'ours' else 'torch bf16 matmul'} ({how})")
    return "prefill GEMM: " + "; ".join(parts) if parts else ""


def reset() -> None:
    """Tests: decide again at the next choose()."""
    with _lock:
        _chosen.clear()
        _timings.clear()
