"""Fusion and alignment of the fast path's weights (applied by speedup.optimize): q/k/v and gate/up concatenated into
one weight each with the HF-named Parameters as row views of it, plain linears swapped for FastLinear, and every
streamed weight moved to a 64-byte boundary. The package docstring (fast/__init__.py) says why."""

from __future__ import annotations

import torch
from torch import nn

from .. import pages
from .linear import FastLinear


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


def swap_linears(model) -> None:
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
