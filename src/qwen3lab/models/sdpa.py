"""One call into torch's scaled_dot_product_attention for every attention path of the torch model (the
per-sequence path in torch_model.py and the batched paged decode in paged_cache.py): the compute dtype and
GQA handled in one place."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# enable_gqa arrived in torch 2.5; before it K/V heads are repeated (a copy) for the kernel.
SDPA_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
         is_causal: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """q [B, Hq, T, Dh], k / v [B, Hkv, S, Dh] -> [B, Hq, T, Dh] in q's dtype. dtype: compute in it (float32 for
    a bf16 fast-path model); mask: True = attend (or additive), broadcast to [B, Hq, T, S]."""
    out_dtype = q.dtype
    if dtype is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    rep = q.shape[1] // k.shape[1]
    if SDPA_GQA:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                           enable_gqa=rep > 1)
    else:
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
    return o.to(out_dtype)
