"""Qwen3 and Qwen3-MoE in PyTorch: the fast path. Dense and MoE in one file, HF parameter names.

Notable:
- Module attribute paths equal the checkpoint's tensor names (model.layers.3.self_attn.q_proj.weight,
  model.layers.3.mlp.experts.7.down_proj.weight, ...), so loading is a name-for-name assignment (no copy
  when dtype and device already match) and a tied lm_head is the embedding Parameter itself.
- Packed ("varlen") batches: the new tokens of all sequences are flattened to one [1, N, D] stream, so every
  linear layer is one GEMM over the whole batch (decode of B sequences is a [B, D] x [D, *] product, not B
  GEMVs); only attention runs per sequence, each over its own paged KV cache (models/paged_cache.py); a decode
  batch is one call of the C++ paged decode kernel per layer (block tables built once per forward).
- RMSNorm in float32 (float64 in a float64 model) then cast back, weight applied in the model dtype (as HF).
- q_norm / k_norm are per-head RMSNorms applied BEFORE RoPE; RoPE rotates half-split pairs; cos/sin tables
  come from rope.rope_parameters, evaluated in float32 like HF (float64 in a float64 model) then cast.
- Attention: F.scaled_dot_product_attention with enable_gqa (no repeated K/V is materialised); a prefill
  after a cached past gets an explicit [T, S] causal mask (is_causal would align it to the wrong corner).
  The probs [Hq, T, S] are computed explicitly (matmul + softmax) only when a recorder asks for them.
- MoE: router softmax in float32 (float64), top-k, renormalised when norm_topk_prob; tokens grouped by expert
  and each hit expert runs once over its tokens, results scattered back with index_add (as HF does).
- Every DESIGN.md tap site calls tap() on a tensor with a leading batch dim of 1 and uses the returned value
  (graft). With nothing recording each tap is one global check. A packed batch of several sequences taps the
  packed tensors [1, N, ...]; recording probs needs one sequence per forward.
- Kernels are leaves: `fast.optimize` gives RMSNorm, attention and the MLPs a `kernel` (the compiled C++
  module, fast/build.py) and swaps the linears for FastLinear / Int8Linear; each leaf then runs one kernel
  call where the eager code runs several ops, with the taps exactly where they are without it. So this module
  tree is the only forward: verify records and grafts the very kernels that generation runs.
- Always eager, always under torch.inference_mode.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import taps as _taps
from ..config import Qwen3Config
from ..errors import InputError, WeightsError
from ..fast import optimize
from ..rope import rope_parameters
from ..runspec import QUANTS, RunSpec, act_dtype_name
from ..shapes import expected_shapes
from ..taps import tap, wants
from ..weights import load_weights
from .base import RunResult, check_input_ids
from .batch import AttnPlan, ForwardBatch, Span
from .paged_cache import PagedSeqCache, attend_paged_decode
from .sdpa import sdpa

_KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # what the C++ leaf kernels take

def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    return getattr(torch, act_dtype_name(dtype))  # names, aliases and refusals: runspec.py


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of norms, softmaxes and RoPE tables: float32, or float64 for a float64 model."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- building blocks ------------------------------------------------------------------------------------
def _on_kernel(kernel, x: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether a leaf's C++ kernel takes x and the tensor it is combined with: CPU, float32/bfloat16, one dtype.
    The kernels take x of any leading shape and strides and give the leading shape back (fast/kernels.cpp
    rows_of): a decode step calls ~12 leaves a layer, so the leaves do no reshaping of their own."""
    return kernel is not None and x.dtype in _KERNEL_DTYPES and x.is_cpu and other.dtype == x.dtype


class RMSNorm(nn.Module):
    kernel = None  # the C++ kernels when fast.optimize made this a kernel leaf: one call over every row

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if _on_kernel(self.kernel, x, w):  # same roundings: float32 norm, dtype, times the weight
            return self.kernel.rmsnorm(x, w, self.eps)
        dt = x.dtype
        h = x.to(_compute_dtype(dt))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * h.to(dt)  # weight applied in the model dtype, as HF does


def _kernel_norm_weight(mod: nn.Module, kernel, dtype: torch.dtype) -> torch.Tensor | None:
    """`mod`'s weight if it is an RMSNorm kernel leaf on `kernel`, its weight in `dtype`, with no hook or patched
    forward (a fused leaf may then do its work in the same kernel call: nothing that would have run is skipped);
    else None."""
    if type(mod) is not RMSNorm or mod.kernel is not kernel or "forward" in mod.__dict__ \
            or mod._forward_hooks or mod._forward_pre_hooks:
        return None
    w = mod.weight
    return w if w.dtype == dtype else None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last dim: channel j pairs with j + Dh/2."""
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kernel=None) -> torch.Tensor:
    """x [1, N, H, Dh]; cos/sin [1, N, 1, Dh] (already scaled and in x's dtype). kernel: the C++ leaf."""
    if _on_kernel(kernel, x, cos):  # the same three roundings in one pass (sin: cos's dtype, one table pair)
        return kernel.rope(x, cos, sin)
    return x * cos + rotate_half(x) * sin


def silu_mul(gate: torch.Tensor, up: torch.Tensor, gate_up: torch.Tensor | None = None, kernel=None) -> torch.Tensor:
    """silu(gate) * up [..., I]. gate_up: the fused [..., 2I] tensor gate and up are the halves of, if any
    (the kernel then reads it as it is instead of a concatenated copy)."""
    if _on_kernel(kernel, gate, up):
        return kernel.silu_mul(gate_up if gate_up is not None else torch.cat((gate, up), dim=-1))
    return F.silu(gate) * up


def silu_mul_fused(gate_up: torch.Tensor, kernel=None) -> torch.Tensor:
    """silu_mul of the two halves of gate_up [..., 2I] -> [..., I]; the kernel takes gate_up as it is."""
    if _on_kernel(kernel, gate_up, gate_up):
        return kernel.silu_mul(gate_up)
    return silu_mul(*gate_up.chunk(2, dim=-1))


class Qwen3MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Dense layers tap gate/up/act; experts (names None) do not."""

    kernel = None  # the C++ kernels when fast.optimize made silu(gate) * up a kernel leaf

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.gate_up_proj: nn.Module | None = None  # [2I, D] fused by fast.optimize; gate/up are its row views

    def forward(self, x: torch.Tensor, names: Mapping[str, str] | None = None) -> torch.Tensor:
        fused = self.gate_up_proj
        if fused is not None and (names is None or not _taps.active()):
            act = silu_mul_fused(fused(x), self.kernel)  # no tap to offer gate / up to: their views are not made
        else:
            gu = None
            if fused is None:
                gate, up = self.gate_proj(x), self.up_proj(x)  # [..., I] each
            else:
                gu = fused(x)  # [..., 2I]: one weight stream instead of two
                gate, up = gu.chunk(2, dim=-1)
            if names is not None:
                g, u = tap(names["gate"], gate), tap(names["up"], up)  # [1, N, I]
                if g is not gate or u is not up:  # grafted: the halves are no longer the fused output's
                    gate, up, gu = g, u, None
            act = silu_mul(gate, up, gu, self.kernel)
        if names is not None:
            act = tap(names["act"], act)  # [1, N, I]
        return self.down_proj(act)


class Qwen3MoeBlock(nn.Module):
    """Router (`gate`, [E, D]) + experts; HF names mlp.gate.weight, mlp.experts.{e}.*_proj.weight."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(
            [Qwen3MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.num_experts)]
        )

    def forward(self, x: torch.Tensor, names: Mapping[str, str]) -> torch.Tensor:
        _, N, D = x.shape
        K = self.top_k
        router_logits = tap(names["router_logits"], self.gate(x))  # [1, N, E]
        probs = torch.softmax(router_logits.to(_compute_dtype(x.dtype)), dim=-1)  # [1, N, E]
        topk_idx = tap(names["topk_idx"], torch.topk(probs, K, dim=-1).indices)  # [1, N, K] best first
        # Weights gathered at the (possibly grafted) choice, so pinning the routing keeps them consistent.
        topk_weight = probs.gather(-1, topk_idx)  # [1, N, K]
        if self.norm_topk_prob:
            topk_weight = topk_weight / topk_weight.sum(dim=-1, keepdim=True)
        topk_weight = tap(names["topk_weight"], topk_weight.to(x.dtype))

        h = x.view(N, D)
        flat = topk_idx.reshape(N * K)
        # Group the (token, slot) pairs by expert: one pass per hit expert over all its tokens.
        order = torch.argsort(flat, stable=True)  # [N*K]
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # one host sync per layer
        token_of = order // K  # [N*K] token row of each sorted pair
        weight_of = topk_weight.reshape(N * K)[order]  # [N*K]
        out = torch.zeros_like(h)  # [N, D]
        start = 0
        for e, c in enumerate(counts):
            expert = self.experts[e]  # None: held by another rank (expert parallel, models/tp.py)
            if c > 0 and expert is not None:
                rows = token_of[start:start + c]
                y = expert(h[rows]) * weight_of[start:start + c, None]  # [c, D]
                out.index_add_(0, rows, y)  # experts added in ascending id order, like HF
            start += c
        return out.view(1, N, D)


class Qwen3Attention(nn.Module):
    kernel = None  # the C++ kernels when fast.optimize made RoPE and decode attention kernel leaves

    def __init__(self, cfg: Qwen3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.Hq, self.Hkv, self.Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.n_rep = cfg.n_rep
        self.scaling = self.Dh ** -0.5
        D, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(D, self.Hq * self.Dh, bias=bias)
        self.k_proj = nn.Linear(D, self.Hkv * self.Dh, bias=bias)
        self.v_proj = nn.Linear(D, self.Hkv * self.Dh, bias=bias)
        self.o_proj = nn.Linear(self.Hq * self.Dh, D, bias=bias)
        self.q_norm = RMSNorm(self.Dh, cfg.rms_norm_eps)  # per head, over head_dim
        self.k_norm = RMSNorm(self.Dh, cfg.rms_norm_eps)
        self.qkv_proj: nn.Module | None = None  # [(Hq+2Hkv)Dh, D] fused by fast.optimize; q/k/v are its row views

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [1, N, D] -> q [1, N, Hq, Dh], k and v [1, N, Hkv, Dh]."""
        N, Hq, Hkv, Dh = x.shape[1], self.Hq, self.Hkv, self.Dh
        fused = self.qkv_proj
        if fused is None:
            return self.q_proj(x).view(1, N, Hq, Dh), self.k_proj(x).view(1, N, Hkv, Dh), \
                self.v_proj(x).view(1, N, Hkv, Dh)
        # one weight stream; one view and one split of it (a decode step makes these views 28 times: each torch
        # call costs ~1-5 us of Python on a small CPU, as much as the C++ leaf of a small layer)
        q, k, v = fused(x).view(1, N, Hq + 2 * Hkv, Dh).split_with_sizes((Hq, Hkv, Hkv), dim=2)
        return q, k, v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plans: Sequence[AttnPlan],
                names: Mapping[str, str]) -> torch.Tensor:
        _, N, D = x.shape
        Hq, Dh = self.Hq, self.Dh
        q, k, v = self._qkv(x)
        q = tap(names["q"], q)  # [1, N, Hq, Dh]
        k = tap(names["k"], k)  # [1, N, Hkv, Dh]
        v = tap(names["v"], v)  # [1, N, Hkv, Dh]
        q, k = self._norm_rope(q, k, cos, sin, names)  # [1, N, Hq, Dh], [1, N, Hkv, Dh]
        paged = plans[0].paged  # every span a paged decode: the batch's block tables, built once per forward
        kernel_ok = _on_kernel(self.kernel, q, k) and v.dtype == q.dtype and not wants(names["probs"])
        if paged is not None and kernel_ok and paged.pools[0].k.dtype == q.dtype:
            o = self.kernel.attend_paged_decode(q, k, v, *paged.layer(self.layer_idx), paged.tables, paged.pos,
                                                self.scaling)  # [1, B, Hq, Dh]
        elif kernel_ok and all(p.decode for p in plans):
            o = self._attend_decode(q, k, v, plans)
        elif paged is not None and paged.shared and len(plans) > 1 and not wants(names["probs"]):
            o = attend_paged_decode(q, k, v, paged, self.layer_idx, self.scaling,
                                    self.sdpa_dtype(q.dtype))  # [1, B, Hq, Dh]
        elif len(plans) == 1:
            o = self._attend(q, k, v, plans[0], names)  # [1, N, Hq, Dh]
        else:
            if wants(names["probs"]):
                raise InputError("recording attention probs needs one sequence per forward (got a packed batch)")
            o = torch.cat([self._attend(q[:, p.offset:p.offset + p.T], k[:, p.offset:p.offset + p.T],
                                        v[:, p.offset:p.offset + p.T], p, names) for p in plans], dim=1)
        o = tap(names["attn"], o)  # [1, N, Hq, Dh]
        return self.o_proj(o.reshape(1, N, Hq * Dh))

    def _norm_rope(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   names: Mapping[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
        """q/k's per-head RMSNorm then RoPE, taps q_norm, k_norm, q_rot, k_rot. The kernel leaf does all four in
        one call (kernels.cpp qk_norm_rope: the norm and RoPE kernels' arithmetic, bit for bit) when both norms
        are plain kernel-leaf RMSNorms; a grafted q_norm / k_norm is then rotated again from the graft."""
        kern, qn_mod, kn_mod = self.kernel, self.q_norm, self.k_norm
        wq = wk = None
        if _on_kernel(kern, q, cos) and k.dtype == q.dtype:
            wq, wk = _kernel_norm_weight(qn_mod, kern, q.dtype), _kernel_norm_weight(kn_mod, kern, q.dtype)
        if wq is not None and wk is not None:
            qn, kn, qr, kr = kern.qk_norm_rope(q, k, wq, wk, qn_mod.eps, kn_mod.eps, cos, sin)
            q, k = tap(names["q_norm"], qn), tap(names["k_norm"], kn)
            if q is not qn:
                qr = apply_rope(q, cos, sin, kern)
            if k is not kn:
                kr = apply_rope(k, cos, sin, kern)
            return tap(names["q_rot"], qr), tap(names["k_rot"], kr)
        q = tap(names["q_norm"], qn_mod(q))
        k = tap(names["k_norm"], kn_mod(k))
        return tap(names["q_rot"], apply_rope(q, cos, sin, kern)), tap(names["k_rot"], apply_rope(k, cos, sin, kern))

    def _attend_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plans: Sequence[AttnPlan]
                       ) -> torch.Tensor:
        """The kernel leaf for a decode step of B sequences (one new token each): writes each new key/value
        into its sequence's cache and attends over it, one call for the batch. q [1, B, Hq, Dh] ->
        [1, B, Hq, Dh]; float32 scores and softmax, as SDPA's CPU kernel."""
        i = self.layer_idx
        return self.kernel.attend_decode(q, k, v, [p.cache.k[i] for p in plans], [p.cache.v[i] for p in plans],
                                         [p.start for p in plans], self.scaling)  # [1, B, Hq, Dh]

    def sdpa_dtype(self, dtype: torch.dtype) -> torch.dtype | None:
        """The dtype a prefill's SDPA runs in when not the model's (None): float32 for a kernel-leaf bf16 model,
        its output rounded back once. torch's CPU SDPA took 14.7 ms for 512 tokens of Qwen3-0.6B in bf16, 9.0
        in float32 (and float32 is the more accurate)."""
        return torch.float32 if self.kernel is not None and dtype == torch.bfloat16 else None

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: AttnPlan,
                names: Mapping[str, str]) -> torch.Tensor:
        """One sequence: q [1, T, Hq, Dh], new k/v [1, T, Hkv, Dh] -> attention output [1, T, Hq, Dh]."""
        T = p.T
        sdpa_dtype = self.sdpa_dtype(q.dtype)
        qh = q.transpose(1, 2)  # [1, Hq, T, Dh]
        kh, vh = k[0].transpose(0, 1), v[0].transpose(0, 1)  # [Hkv, T, Dh]
        if p.cache is not None:
            kh, vh = p.cache.write(self.layer_idx, p.start, kh, vh)  # [Hkv, S, Dh] views of the cache
        S = kh.shape[1]
        if wants(names["probs"]):
            return self._attend_explicit(qh, kh, vh, p, names["probs"]).transpose(1, 2)
        o = sdpa(qh, kh.unsqueeze(0), vh.unsqueeze(0), self.scaling, p.mask, p.is_causal, sdpa_dtype)
        assert o.shape == (1, self.Hq, T, self.Dh) and S >= T
        return o.transpose(1, 2)  # [1, T, Hq, Dh]

    def _attend_explicit(self, qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, p: AttnPlan,
                         name: str) -> torch.Tensor:
        """Materialised scores and probs (tap `probs` [1, Hq, T, S]); GQA by broadcasting over groups."""
        T, S = p.T, kh.shape[1]
        Hq, Hkv, Dh, R = self.Hq, self.Hkv, self.Dh, self.n_rep
        qg = qh.reshape(Hkv, R, T, Dh)  # query head h belongs to key/value head h // R
        scores = torch.matmul(qg, kh.transpose(1, 2).unsqueeze(1)) * self.scaling  # [Hkv, R, T, S]
        if T > 1:
            allowed = p.mask if p.mask is not None else torch.ones(T, S, dtype=torch.bool, device=qh.device).tril()
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=_compute_dtype(qh.dtype)).to(qh.dtype)
        probs = tap(name, probs.reshape(1, Hq, T, S))
        o = torch.matmul(probs.reshape(Hkv, R, T, S), vh.unsqueeze(1))  # [Hkv, R, T, Dh]
        return o.reshape(1, Hq, T, Dh)


SITES = ("attn_in", "q", "k", "v", "q_norm", "k_norm", "q_rot", "k_rot", "probs", "attn", "attn_out",
         "resid_mid", "mlp_in", "gate", "up", "act", "router_logits", "topk_idx", "topk_weight", "mlp_out",
         "resid_post")


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config, layer_idx: int):
        super().__init__()
        self.names = {s: f"layers.{layer_idx}.{s}" for s in SITES}  # formatted once, not per token
        self.self_attn = Qwen3Attention(cfg, layer_idx)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp = Qwen3MoeBlock(cfg) if self.is_moe else Qwen3MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plans: Sequence[AttnPlan]
                ) -> torch.Tensor:
        n = self.names
        h = tap(n["attn_in"], self.input_layernorm(x))  # [1, N, D]
        a = tap(n["attn_out"], self.self_attn(h, cos, sin, plans, n))  # [1, N, D]
        x = tap(n["resid_mid"], x + a)
        h = tap(n["mlp_in"], self.post_attention_layernorm(x))
        m = tap(n["mlp_out"], self.mlp(h, n))
        return tap(n["resid_post"], x + m)


class Qwen3Model(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Qwen3DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                plans: Sequence[AttnPlan]) -> torch.Tensor:
        x = tap("embed", self.embed_tokens(input_ids).unsqueeze(0))  # [1, N, D]
        for layer in self.layers:
            x = layer(x, cos, sin, plans)
        return tap("final_norm", self.norm(x))


class Qwen3LMHeadModel(nn.Module):
    """The nn.Module tree of a checkpoint (`model.*`, `lm_head`). Build with `from_weights`."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.cfg = cfg
        self.model = Qwen3Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._cos: torch.Tensor | None = None  # [P, Dh] RoPE tables, grown on demand
        self._sin: torch.Tensor | None = None
        self.quant: str | None = None  # "int8" once fast.quantise has replaced the projection weights

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    # ---- loading -------------------------------------------------------------------------------------
    @classmethod
    def from_weights(cls, cfg: Qwen3Config, weights: Mapping[str, torch.Tensor], device: str | torch.device = "cpu",
                     dtype: str | torch.dtype = torch.float32) -> Qwen3LMHeadModel:
        """Assign the {hf_name: tensor} dict to the module tree (converted to dtype/device; no copy when they
        match). A tied model uses the embedding as lm_head whatever the dict holds under lm_head.weight."""
        dt = _torch_dtype(dtype)
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise InputError(f"invalid device {device!r}: {e}") from None
        with torch.device("meta"):
            model = cls(cfg)
        want = expected_shapes(cfg, include_lm_head=not cfg.tie_word_embeddings)
        missing = [n for n in want if n not in weights]
        if missing:
            raise WeightsError(f"torch backend: missing tensor {missing[0]!r} (expected shape {list(want[missing[0]])})"
                               + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        extra = [n for n in weights if n not in want and not (n == "lm_head.weight" and cfg.tie_word_embeddings)]
        if extra:
            raise WeightsError(f"torch backend: unexpected tensor {extra[0]!r} for this config ({cfg.source})")
        for name, shape in want.items():
            t = weights[name]
            if tuple(t.shape) != tuple(shape):
                raise WeightsError(f"torch backend: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}")
            if not t.is_floating_point():
                raise WeightsError(f"torch backend: tensor {name!r} has dtype {t.dtype}, expected a float dtype")
            mod_path, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(mod_path), attr,
                    nn.Parameter(t.to(device=device, dtype=dt), requires_grad=False))
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.eval()
        return model

    # ---- RoPE tables ---------------------------------------------------------------------------------
    def reset_rope_tables(self) -> None:
        """Forget the cached cos/sin tables: after a change of self.cfg's RoPE fields they are rebuilt."""
        self._cos = self._sin = None

    def rope_tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [>= n, Dh] in the model dtype; recomputed (doubling) only when a longer one is needed."""
        if self._cos is None or self._cos.shape[0] < n:
            cur = 0 if self._cos is None else self._cos.shape[0]
            P = min(max(n, 2 * cur, 256), max(n, self.cfg.max_position_embeddings))
            inv_freq, scale = rope_parameters(self.cfg)
            ct = _compute_dtype(self.dtype)
            inv = torch.tensor(inv_freq, dtype=ct, device=self.device)  # [Dh/2]
            ang = torch.arange(P, dtype=ct, device=self.device)[:, None] * inv[None, :]  # [P, Dh/2]
            ang = torch.cat((ang, ang), dim=-1)  # [P, Dh]
            self._cos = (ang.cos() * scale).to(self.dtype)
            self._sin = (ang.sin() * scale).to(self.dtype)
        return self._cos, self._sin

    # ---- forward -------------------------------------------------------------------------------------
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """One forward over a packed batch (models/batch.py). Returns logits [len(logits_rows) or N, V] in the
        model dtype and advances each span's cache by its length."""
        N = batch.num_tokens
        with torch.inference_mode():
            plans = batch.plans(self.device)
            end = max(s.start + s.length for s in batch.spans)
            cos_t, sin_t = self.rope_tables(end)
            cos = cos_t[batch.positions].view(1, N, 1, -1)  # [1, N, 1, Dh]
            sin = sin_t[batch.positions].view(1, N, 1, -1)
            h = self.model(batch.input_ids, cos, sin, plans)  # [1, N, D]
            if batch.logits_rows is not None:
                h = h[:, batch.logits_rows]
            logits = tap("logits", self.lm_head(h))  # [1, R, V]
        batch.advance_caches()
        return logits[0]

    def new_cache(self, capacity: int) -> PagedSeqCache:
        """One sequence's KV cache: paged, over a private pool with room for `capacity` positions (grows)."""
        return PagedSeqCache.for_model(self.cfg, capacity, self.dtype, self.device)


# ---- the backend contract (COMMON.md) ------------------------------------------------------------------
class TorchBackend:
    """`.run(input_ids, taps=None, graft=None) -> RunResult` and `.run_decode(...)` over Qwen3LMHeadModel.

    fast=True applies qwen3lab.fast (fused projections, streaming kernels) and quant="int8" its int8 weights
    (activations in `dtype`; `.dtype` then reads "int8"): the fast paths as verify candidates. Taps run the
    module tree op by op either way."""

    name = "torch"

    def __init__(self, cfg: Qwen3Config, weights: Mapping[str, torch.Tensor], device: str | torch.device = "cpu",
                 dtype: str | torch.dtype = "float32", fast: bool = False, quant: str | None = None,
                 group_size: int | None = None, spec: RunSpec | None = None):
        self.cfg = cfg
        spec = spec or self.spec_for(device, dtype, fast, quant, group_size)
        self.model = Qwen3LMHeadModel.from_weights(cfg, weights, device=spec.device, dtype=spec.torch_dtype)
        if spec.fast:
            optimize(self.model, quant=spec.quant, group_size=spec.group_size)
            self.name = "torch-fast" if spec.quant is None else f"torch-{spec.quant}"
        self.spec = spec
        self.dtype = spec.label
        self.device = self.model.device

    @staticmethod
    def spec_for(device="cpu", dtype="float32", fast: bool = False, quant: str | None = None,
                 group_size: int | None = None) -> RunSpec:
        """fast=True (or quantised weights) is required, not best-effort: the fast path as a verify candidate."""
        quantised = quant is not None or str(dtype).lower() in QUANTS
        return RunSpec.make(device, dtype, quant, fast=bool(fast or quantised), group_size=group_size,
                            fast_name="backend 'torch-fast'")

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype = "float32", fast: bool = False,
                        quant: str | None = None, group_size: int | None = None,
                        spec: RunSpec | None = None) -> TorchBackend:

        spec = spec or cls.spec_for(device, dtype, fast, quant, group_size)
        cfg = Qwen3Config.from_file(path)
        weights = load_weights(path, cfg, dtype=spec.torch_dtype, device=spec.device, release_pages=spec.fast)
        return cls(cfg, weights, spec=spec)

    def _ids(self, ids: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(ids, dtype=torch.long, device=self.device)

    def run(self, input_ids, taps=None, graft=None) -> RunResult:
        """Whole-sequence forward without a cache: logits [T, V] (float NumPy) and the selected taps."""
        ids = check_input_ids(input_ids, self.cfg)
        T = ids.shape[0]
        pos = torch.arange(T, device=self.device)
        with _session(taps, graft) as rec:
            logits = self.model(ForwardBatch(self._ids(ids), pos, [Span(None, 0, T)]))
        return RunResult(_taps.to_numpy(logits), _unbatch(rec))

    def run_decode(self, input_ids, decode_steps: int, taps=None, graft=None) -> RunResult:
        """Prefill the first P = T - decode_steps tokens, then feed the rest one per step through the KV
        cache. Prefill taps are unprefixed; step j's are prefixed `step{j}.` ([1, ...]; probs [Hq, 1, P+j+1])."""
        ids = check_input_ids(input_ids, self.cfg)
        T = ids.shape[0]
        if isinstance(decode_steps, bool) or not isinstance(decode_steps, (int, np.integer)) \
                or not 0 <= decode_steps < T:
            raise InputError(f"decode_steps must be an integer in 0..{T - 1} (one prefill token at least) "
                             f"for {T} input ids, got {decode_steps!r}")
        P = T - int(decode_steps)
        cache = self.model.new_cache(T)
        tids = self._ids(ids)
        pos = torch.arange(T, device=self.device)
        if taps is None and graft is not None:
            taps = "all"
        with _session(taps, graft) as rec:
            out = [self.model(ForwardBatch(tids[:P], pos[:P], [Span(cache, 0, P)]))]  # [P, V]
            for j in range(int(decode_steps)):
                if rec is not None:
                    rec.prefix = f"step{j}."
                t = P + j
                out.append(self.model(ForwardBatch(tids[t:t + 1], pos[t:t + 1], [Span(cache, t, 1)])))  # [1, V]
        return RunResult(_taps.to_numpy(torch.cat(out, dim=0)), _unbatch(rec))


@contextlib.contextmanager
def _session(names, graft):
    """A tap recorder (or grafter) for the forward, or nothing when no taps are asked for."""
    if graft is not None:
        with _taps.graft(graft, names=names) as rec:
            yield rec
    elif names is not None:
        with _taps.record(names) as rec:
            yield rec
    else:
        yield None


def _unbatch(rec) -> dict[str, np.ndarray]:
    """Recorded taps without their leading batch dim of 1 (canonical DESIGN.md shapes)."""
    if rec is None:
        return {}
    out = {}
    for name, arr in rec.taps.items():
        assert arr.shape[0] == 1, (name, arr.shape)
        out[name] = arr[0]
    return out


def __getattr__(name: str):
    # Qwen3CausalLM was this module's name until it was renamed after HF's Qwen3 classes (the three letters
    # from the engine API's Qwen3ForCausalLM were too few); the old name keeps working for a while.
    if name == "Qwen3CausalLM":
        warnings.warn("qwen3lab.models.torch_model.Qwen3CausalLM is renamed Qwen3LMHeadModel", DeprecationWarning,
                      stacklevel=2)
        return Qwen3LMHeadModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
