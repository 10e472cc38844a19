"""The fused forward: the same computation as Qwen3CausalLM's module tree with fewer, larger ops.

Qwen3CausalLM.forward hands over to `fused_forward` (installed by fast.optimize) whenever no tap session is
active; with taps on (verify, tiny, dumps) the module-by-module path runs instead, so every tap site exists.

Per layer: add_rmsnorm (the residual add fused with the next RMSNorm), the fused QKV linear, qk_norm_rope
(per-head q/k RMSNorm + RoPE in one pass), attention (decode: `attend_decode`, which writes the new key/value
into each sequence's cache and attends, one call for the whole batch; a prefill: SDPA per span, in float32
for a bfloat16 model), o_proj, add_rmsnorm, the fused gate/up linear, silu_mul, down_proj: about 10 calls per
layer instead of ~50, each rounding to the model dtype where the eager ops do (kernels.cpp). MoE layers run
their module as usual.
The per-layer tensors are gathered once (`LayerPlan`) so a decode step is a tight loop of kernel calls: at
~50 ms a step, every 10 us of Python per call is 1 % of the decode rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .build import kernels
from .linear import SMALL_M, FastLinear, Int8Linear


def can_fuse(model) -> bool:
    """Whether fused_forward can run this model: the kernels, a CPU float32/bfloat16 model, fused projections,
    no attention biases, every projection a FastLinear / Int8Linear."""
    if kernels() is None or model.device.type != "cpu" or model.dtype not in (torch.float32, torch.bfloat16):
        return False
    fast = (FastLinear, Int8Linear)
    for layer in model.model.layers:
        a = layer.self_attn
        if not isinstance(a.qkv_proj, fast) or not isinstance(a.o_proj, fast):
            return False
        if not layer.is_moe and not all(isinstance(m, fast) for m in (layer.mlp.gate_up_proj, layer.mlp.down_proj)):
            return False
    return isinstance(model.lm_head, fast)


@dataclass
class _Lin:
    """A projection for the kernels: weight [N, K] (+ int8 scales) and the module for many rows."""

    W: torch.Tensor
    scale: torch.Tensor | None
    module: nn.Module

    @classmethod
    def of(cls, mod: nn.Module) -> _Lin:
        return cls(mod.weight, getattr(mod, "scale", None) if isinstance(mod, Int8Linear) else None, mod)

    def __call__(self, k, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= SMALL_M:
            return k.linear_small(x, self.W, self.scale)
        return self.module(x)


@dataclass
class LayerPlan:
    in_norm: torch.Tensor
    qkv: _Lin
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    o: _Lin
    post_norm: torch.Tensor
    gate_up: _Lin | None  # None for a MoE layer (its module runs)
    down: _Lin | None
    layer: nn.Module


def build_plan(model) -> list[LayerPlan]:
    """The tensors each layer's fused step reads, gathered once (call again after changing the weights)."""
    plans = []
    for layer in model.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        plans.append(LayerPlan(
            layer.input_layernorm.weight, _Lin.of(a.qkv_proj), a.q_norm.weight, a.k_norm.weight, _Lin.of(a.o_proj),
            layer.post_attention_layernorm.weight, None if layer.is_moe else _Lin.of(mlp.gate_up_proj),
            None if layer.is_moe else _Lin.of(mlp.down_proj), layer))
    return plans


def fused_forward(model, input_ids: torch.Tensor, positions: torch.Tensor, spans: Sequence,
                  logits_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Qwen3CausalLM.forward without taps: logits [len(logits_rows) or N, V]; advances each span's cache.
    Returns None when the kernels have been turned off since (the caller then runs the module tree)."""
    k = kernels()
    plan = model._fast_plan
    if k is None or plan is None:
        return None
    eps = model.cfg.rms_norm_eps
    attn0 = plan[0].layer.self_attn
    Hq, Hkv, Dh, scaling = attn0.Hq, attn0.Hkv, attn0.Dh, attn0.scaling
    N = input_ids.shape[0]
    with torch.inference_mode():
        decode = all(s.length == 1 and s.cache is not None for s in spans)
        plans = model._plans(spans)  # also checks every span against its cache (attend_decode writes it directly)
        end = max(s.start + s.length for s in spans)
        cos_t, sin_t = model.rope_tables(end)
        cos, sin = cos_t[positions], sin_t[positions]  # [N, Dh]
        x = model.model.embed_tokens(input_ids)  # [N, D] the residual stream, updated in place below
        h = k.add_rmsnorm(x, None, plan[0].in_norm, eps)  # [N, D]
        starts = [s.start for s in spans]
        caches = [s.cache for s in spans]
        last = len(plan) - 1
        for i, p in enumerate(plan):
            q, kk, v = k.qk_norm_rope(p.qkv(k, h), p.q_norm, p.k_norm, cos, sin, Hq, Hkv, eps)  # [N, H, Dh]
            if decode:
                o = k.attend_decode(q, kk, v, [c.k[i] for c in caches], [c.v[i] for c in caches], starts,
                                    scaling)  # [N, Hq, Dh]
            else:
                attn, q4, k4, v4 = p.layer.self_attn, q.unsqueeze(0), kk.unsqueeze(0), v.unsqueeze(0)  # [1, N, H, Dh]
                o = torch.cat([attn._attend(q4[:, a.offset:a.offset + a.T], k4[:, a.offset:a.offset + a.T],
                                            v4[:, a.offset:a.offset + a.T], a, p.layer.names, torch.float32)
                               for a in plans], dim=1)[0]  # [N, Hq, Dh]; SDPA in float32 (see _attend)
            h = k.add_rmsnorm(x, p.o(k, o.view(N, Hq * Dh)), p.post_norm, eps)  # x += attention output
            if p.gate_up is None:
                m = p.layer.mlp(h.unsqueeze(0), p.layer.names)[0]  # MoE block [N, D]
            else:
                m = p.down(k, k.silu_mul(p.gate_up(k, h)))  # [N, D]
            nxt = plan[i + 1].in_norm if i < last else model.model.norm.weight
            h = k.add_rmsnorm(x, m, nxt, eps)  # x += m; the next layer's input norm (the final norm at the end)
        if logits_rows is not None:
            h = h[logits_rows]
        logits = model.lm_head(h)  # [R, V]
    for s in spans:
        if s.cache is not None:
            s.cache.advance(s.length)
    return logits
