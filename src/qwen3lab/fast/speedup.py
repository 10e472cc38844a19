"""optimize(): the fast path applied to a loaded model in place (fusion, quantisation, alignment, kernel leaves),
and the small helpers around it: which kernels a model runs (describe), kernel slots (set_kernels), threads."""

from __future__ import annotations

import functools
import os

import torch

from .. import pages
from ..errors import InputError
from . import tune
from .build import kernels, status
from .fuse import align_weights, fuse_layer, fuse_projections, swap_linears
from .linear import FastLinear, Int4Linear, Int8Linear
from .quant import QUANT_MODES, quantise


def optimize(model, quant: str | None = None, fuse: bool = True, group_size: int | None = None):
    """Make `model` (a Qwen3LMHeadModel on CPU) fast in place and return it. quant: None, "int8" or "int4"
    (group_size: int4's group along K, 32 or 128; None: 128, or 32 where 128 does not divide every K)."""
    if quant is not None and quant not in QUANT_MODES:
        raise InputError(f"quant must be one of {', '.join(QUANT_MODES)} or None, got {quant!r}")
    ranges = pages.file_ranges()
    if quant is not None:
        # each layer fused just before it is quantised: one layer's fused float copy at a time, not all 28 of
        # Qwen3-0.6B's (an int4 load peaked at 895 MB RSS fusing everything first, ~560 MB of it bf16 copies)
        quantise(model, quant, ranges, group_size=group_size,
                 before_layer=functools.partial(fuse_layer, file_ranges=ranges) if fuse else None)
    elif fuse:
        fuse_projections(model, ranges)
    swap_linears(model)
    align_weights(model, ranges)
    set_kernels(model, kernels())  # built now (once), not inside the first timed forward
    if model.dtype == torch.bfloat16 and quant != "int4":  # measure the prefill GEMM choice now too (tune.py)
        tune.choose("int8" if quant is not None else "bfloat16")
    return model


def use_kernels(module) -> str:
    """The fast path's leaves for a part of a model (e.g. the one attention layer `bench attention` times):
    bias-free linears as FastLinear, kernel slots set. Returns the kernel status line (status())."""
    swap_linears(module)
    set_kernels(module, kernels())
    return status()


def set_kernels(model, k) -> int:
    """Make the model's non-linear leaves (the modules whose class declares a `kernel` slot: RMSNorm, attention
    for RoPE and decode, the MLPs for SiLU * up) run the compiled kernels `k`, or eager PyTorch for None.
    Returns how many leaves were set."""
    n = 0
    for mod in model.modules():
        if "kernel" in type(mod).__dict__:
            mod.kernel = k
            n += 1
    return n


def describe(model) -> dict[str, str]:
    """Which kernel each kind of leaf of `model` runs, e.g. {"linear": "avx2-bf16", "norm": "avx2", ...}
    (int4 linears: "avx2-int4-g128", with their group size)."""
    leaves = [m for m in model.modules() if "kernel" in type(m).__dict__]
    k = leaves[0].kernel if leaves else None
    path = k.PATH if k is not None else "torch"
    # the linears look their kernels up at each call (linear.py): the build's, once swapped in by optimize
    mods = list(model.modules())
    quant = next((q for q, cls in (("int4", Int4Linear), ("int8", Int8Linear))
                  if any(isinstance(m, cls) for m in mods)), None)
    lk = kernels() if quant or any(isinstance(m, FastLinear) for m in mods) else None
    weights = quant or {torch.bfloat16: "bf16", torch.float32: "f32"}.get(model.dtype, "")
    if quant == "int4":  # the group size the weights were quantised with
        weights += f"-g{next(m.group_size for m in mods if isinstance(m, Int4Linear))}"
    if weights == "bf16" and lk is not None and getattr(lk, "BF16_DOT", False):
        weights = "bf16dot"  # AVX512-BF16's vdpbf16ps (kernels.cpp Bf16Dot)
    linear = f"{lk.PATH}-{weights}" if lk is not None else f"torch-{weights}" if quant else "torch"
    pf = lk.stream_prefetch()[1 if weights == "f32" else 0] if lk is not None else 0
    if quant != "int4" and pf > 0:  # the one-row decode streams' distance for these weights (runspec.py)
        linear += f"+pf{pf}"
    attn = next((m for m in leaves if hasattr(m, "sdpa_dtype")), None)  # the attention leaf owns the rule
    sdpa = "sdpa-f32" if attn is not None and attn.sdpa_dtype(model.dtype) == torch.float32 else "sdpa"
    kinds = {"linear": linear, "norm": path, "rope": path, "silu_mul": path,
             "attention": f"{path} paged decode, {sdpa} prefill" if k is not None else sdpa}
    if k is not None:  # q/k's per-head norms and RoPE run as one leaf (Qwen3Attention._norm_rope)
        kinds["qk_norm_rope"] = path
    return kinds


def set_threads(n: int | None = None) -> int:
    """Use n intra-op threads (default: every core this process may run on) and return the number.
    OpenMP settings that help on a quiet machine are documented in the README (OMP_PROC_BIND, OMP_WAIT_POLICY);
    they must be set before the process starts."""
    if n is None:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, int(n)))
    return torch.get_num_threads()
