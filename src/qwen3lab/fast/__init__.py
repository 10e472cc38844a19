"""Fast CPU inference, applied to a loaded Qwen3CausalLM from outside the model file.

    from qwen3lab.fast import optimize
    optimize(model)                  # fused QKV / gate-up weights + streaming kernels, weights unchanged
    optimize(model, quant="int8")    # the same with weight-only int8 (per-output-row scales)
    optimize(model, quant="int4")    # weight-only int4, one scale per 128 weights along K (group_size=32 too)

Notable:
- fusion concatenates q/k/v (and gate/up) once at load into one weight [(Hq+2Hkv)Dh, D] ([2I, D]) and makes
  the checkpoint-named Parameters row views of it: one weight stream per step instead of three (two), no extra
  memory, the names loading and verification know are unchanged, and taps q/k/v/gate/up are exact slices.
- every linear layer the forward runs becomes a FastLinear / Int8Linear (linear.py) over the C++ kernels
  (kernels.cpp, built at first use by build.py for the best path the CPU has; PyTorch ops when they cannot be
  built), and the model's other leaves (RMSNorm, RoPE, decode attention, SiLU * up) get the kernels too
  (`set_kernels`): the module tree stays the only forward, taps where they were, so verify runs these kernels.
- the MoE router (`mlp.gate`) stays in the model dtype under int8 / int4: routing decides which experts run, and
  it is tiny.
- memory: the file pages of copied (fused, quantised, aligned) checkpoint tensors are given back (qwen3lab/pages.py),
  so the process holds each weight once.
- alignment: every weight the kernels stream starts on a 64-byte boundary (align_weights).
- numerics: float32 accumulation everywhere, one rounding to the model dtype per output, like F.linear; taps
  and grafting work as on the plain model (verification runs this path op by op).
- threads: torch's intra-op pool (torch.set_num_threads); see set_threads().
- prefill GEMM: many-row bf16 / int8 linears take whichever of two GEMMs measured faster on this CPU
  (tune.py), decided at optimize() so the first timed forward does not pay for the measurement; int4 always
  takes its dequantised-band sgemm (linear_q4_large: there is no exact bf16 route to race it against).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

from .. import pages
from . import tune
from .build import kernels, status
from .linear import FastLinear, Int4Linear, Int8Linear
from .quant import QUANT_MODES, quantise

__all__ = ["optimize", "fuse_projections", "fuse_layer", "align_weights", "quantise", "kernels", "status",
           "set_threads", "tune", "set_kernels", "use_kernels", "describe", "FastLinear", "Int8Linear", "Int4Linear",
           "QUANT_MODES"]


def fuse_projections(model, file_ranges=None) -> None:
    """Concatenate q/k/v and gate/up weights into fused modules; the HF-named weights become views of them.
    Idempotent; projections with a bias are left unfused."""
    ranges = pages.file_ranges() if file_ranges is None else file_ranges
    for layer in model.model.layers:
        fuse_layer(layer, ranges)


def fuse_layer(layer, file_ranges) -> None:
    """fuse_projections for one decoder layer."""
    attn = layer.self_attn
    if attn.qkv_proj is None and all(p.bias is None for p in (attn.q_proj, attn.k_proj, attn.v_proj)):
        attn.qkv_proj = _fuse([attn.q_proj, attn.k_proj, attn.v_proj], file_ranges)
    mlps = [layer.mlp] if not layer.is_moe else list(layer.mlp.experts)
    for mlp in mlps:
        if mlp.gate_up_proj is None and mlp.gate_proj.bias is None and mlp.up_proj.bias is None:
            mlp.gate_up_proj = _fuse([mlp.gate_proj, mlp.up_proj], file_ranges)


def _fuse(parts: list[nn.Linear], ranges) -> FastLinear:
    """One weight [sum N_i, K] (a new tensor); each part's weight re-pointed to its rows (views, no copy).
    The parts' memory-mapped file pages, now copied, are given back (qwen3lab/pages.py)."""
    old = [p.weight.detach() for p in parts]
    W = torch.cat(old, dim=0)  # [sum N_i, K]
    start = 0
    for p in parts:
        n = p.weight.shape[0]
        p.weight = nn.Parameter(W[start:start + n], requires_grad=False)
        start += n
    pages.release(old, ranges)
    return FastLinear(W, fused=True)


def _swap_linears(model) -> None:
    """Every bias-free nn.Linear the forward runs -> FastLinear over the same Parameter (no copy)."""
    for mod in list(model.modules()):
        for child_name, child in list(mod.named_children()):
            if type(child) is nn.Linear and child.bias is None:
                setattr(mod, child_name, FastLinear(child.weight))


def align_weights(model, file_ranges=None, align: int = 64) -> int:
    """Give every FastLinear weight a start on an `align`-byte boundary; returns how many were moved.

    Weights memory-mapped from a safetensors file start wherever the file puts them (Qwen3-0.6B: o_proj,
    down_proj and the tied embedding at 56 mod 64), so every 512-bit load of a row straddles two cache lines:
    a decode batch of 8 ran these projections at ~14 GB/s against ~18 for the aligned (fused) ones. A moved
    weight is copied once into fresh (aligned) memory and its file pages are given back (qwen3lab/pages.py); a tied
    embedding moves with its lm_head so the two stay one tensor."""
    ranges = pages.file_ranges() if file_ranges is None else file_ranges
    embed = model.model.embed_tokens
    moved = 0
    for mod in list(model.modules()):
        if not isinstance(mod, FastLinear) or mod.weight.data_ptr() % align == 0:
            continue
        old = mod.weight
        new = torch.empty_like(old, memory_format=torch.contiguous_format)
        if new.data_ptr() % align:  # the allocator gives 64-byte blocks; check rather than assume
            continue
        rows = max(1, (16 << 20) // max(1, old[0].numel() * old.element_size()))
        for a in range(0, old.shape[0], rows):  # ~16 MB at a time, each block's file pages given back as
            new[a:a + rows].copy_(old[a:a + rows].detach())  # copied: a 311 MB embedding never exists twice
            pages.release([old[a:a + rows].detach()], ranges)
        param = nn.Parameter(new, requires_grad=False)
        if isinstance(old, nn.Parameter) and embed.weight is old:
            embed.weight = param
        if "weight" in mod._buffers:
            mod._buffers["weight"] = new
        else:
            mod.weight = param
        moved += 1
    return moved


def optimize(model, quant: str | None = None, fuse: bool = True, group_size: int | None = None):
    """Make `model` (a Qwen3CausalLM on CPU) fast in place and return it. quant: None, "int8" or "int4"
    (group_size: int4's group along K, 32 or 128; None: 128, or 32 where 128 does not divide every K)."""
    if quant is not None and quant not in QUANT_MODES:
        from ..errors import InputError

        raise InputError(f"quant must be one of {', '.join(QUANT_MODES)} or None, got {quant!r}")
    ranges = pages.file_ranges()
    if quant is not None:
        # each layer fused just before it is quantised: one layer's fused float copy at a time, not all 28 of
        # Qwen3-0.6B's (an int4 load peaked at 895 MB RSS fusing everything first, ~560 MB of it bf16 copies)
        quantise(model, quant, ranges, group_size=group_size,
                 before_layer=functools.partial(fuse_layer, file_ranges=ranges) if fuse else None)
    elif fuse:
        fuse_projections(model, ranges)
    _swap_linears(model)
    align_weights(model, ranges)
    set_kernels(model, kernels())  # built now (once), not inside the first timed forward
    if model.dtype == torch.bfloat16 and quant != "int4":  # measure the prefill GEMM choice now too (tune.py)
        tune.choose("int8" if quant is not None else "bfloat16")
    return model


def use_kernels(module) -> str:
    """The fast path's leaves for a part of a model (e.g. the one attention layer `bench attention` times):
    bias-free linears as FastLinear, kernel slots set. Returns the kernel status line (status())."""
    _swap_linears(module)
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
    linear = f"{lk.PATH}-{weights}" if lk is not None else f"torch-{weights}" if quant else "torch"
    attn = next((m for m in leaves if hasattr(m, "sdpa_dtype")), None)  # the attention leaf owns the rule
    sdpa = "sdpa-f32" if attn is not None and attn.sdpa_dtype(model.dtype) == torch.float32 else "sdpa"
    return {"linear": linear, "norm": path, "rope": path, "silu_mul": path,
            "attention": f"{path} decode, {sdpa} prefill" if k is not None else sdpa}


def set_threads(n: int | None = None) -> int:
    """Use n intra-op threads (default: every core this process may run on) and return the number.
    OpenMP settings that help on a quiet machine are documented in the README (OMP_PROC_BIND, OMP_WAIT_POLICY);
    they must be set before the process starts."""
    if n is None:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, int(n)))
    return torch.get_num_threads()
