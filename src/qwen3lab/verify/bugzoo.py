"""The bug zoo (`qwen3lab verify --self-test`): known bugs planted in the torch model; verify must name them.

Each bug is planted into one TorchBackend instance from outside the model file: by swapping a submodule,
binding a replacement method on one module instance, setting an attribute, or (RoPE only) swapping the
module-level `apply_rope` function for the duration of that backend's runs. Nothing global outlives a run
and the reference (the NumPy oracle) is never touched. Every bug is one a real port has shipped:

| bug | planted as | culprit verify must name |
|---|---|---|
| RoPE on interleaved pairs (2j, 2j+1) instead of half-split (j, j+Dh/2) | `apply_rope` swapped | layers.0.q_rot |
| rope_theta 10000 instead of the config's | the RoPE tables built from a changed config | layers.0.q_rot |
| q_norm skipped | `q_norm` modules replaced by identity | layers.0.q_norm |
| RMSNorm as x / (rms + eps) instead of x * rsqrt(mean(x^2) + eps) | every RMSNorm's forward | layers.0.attn_in |
| GQA by interleave (head h reads kv head h % Hkv) instead of by group (h // n_rep) | attention method | layers.0.attn |
| softmax scale 1/sqrt(hidden) instead of 1/sqrt(head_dim) | attention `scaling` | layers.0.attn |
| no causal mask | every attention plan made mask-free | layers.0.attn |
| SiLU applied to up instead of gate | dense MLP forward | layers.0.act |
| attention residual dropped | decoder layer forward | layers.0.resid_mid |
| MoE weights not renormalised although norm_topk_prob is true | MoE block attribute | layers.0.topk_weight |
| MoE expert ids off by one (experts indexed from 1) | the model's `tap` wrapped for a run | layers.0.topk_idx |
| a decode step writes the KV cache one position early | the run's KV cache | step0.layers.0.attn |

With `probs` recorded the three attention bugs are caught one tap earlier, at layers.0.probs.

Kernel bugs (`KERNEL_BUGS`) sit inside the fast path's C++ leaf kernels, where generation runs them: each is
planted by giving one float32 torch-fast candidate's leaves a kernel set with one function wrong
(`fast.set_kernels`), so verify must find it through the same taps as any other bug. They need the kernels
built; without them they are skipped, with the reason.

| kernel bug | culprit verify must name |
|---|---|
| RoPE kernels (RoPE, q/k norm + RoPE) rotating the wrong way (sin negated) | layers.0.q_rot |
| RMSNorm kernels (RMSNorm, q/k norm + RoPE) scaling by (1 + w), Gemma's convention, not w | layers.0.attn_in |
| q/k norm + RoPE kernel normalising k's heads with q_norm's weight | layers.0.k_norm |
| SiLU·up kernel with the halves swapped: silu(up) * gate | layers.0.act |
| decode attention kernel without the 1/sqrt(head_dim) scale | step0.layers.0.attn |
The zoo runs in float64 by default: the RMSNorm bug moves a value by ~eps/rms (about 1e-5 relative),
visible only at float64's tolerance; the others are caught in float32 as well.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

from ..models import torch_model as tm
from ..taps import tap, wants


@dataclass(frozen=True)
class Bug:
    key: str
    title: str
    expected: tuple[str, ...]  # acceptable culprit names, best first
    plant: Callable  # plant(backend) -> context manager factory for each run, or None
    moe: bool = False
    fast: bool = False  # planted in the C++ kernels of a torch-fast (float32) candidate
    decode_steps: int = 0


# ---- the plants -----------------------------------------------------------------------------------
def _attn_modules(b) -> list:
    return [layer.self_attn for layer in b.model.model.layers]


def _rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kernel=None) -> torch.Tensor:
    """RoPE rotating adjacent pairs (2j, 2j+1) by angle j: the GPT-J / Meta-checkpoint layout, wrong here.
    (Replaces the whole leaf, kernel or not.)"""
    half = x.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]  # the tables hold each angle twice (half-split layout)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)  # [..., Dh/2, 2]
    return out.flatten(-2)


def plant_rope_interleaved(b):
    @contextlib.contextmanager
    def during_run():
        orig = tm.apply_rope
        tm.apply_rope = _rope_interleaved
        try:
            yield
        finally:
            tm.apply_rope = orig

    return during_run


def plant_rope_theta(b):
    m = b.model
    m.cfg = dataclasses.replace(m.cfg, rope_theta=10000.0 if m.cfg.rope_theta != 10000.0 else 1e6)
    m.reset_rope_tables()  # rebuilt from the changed config on the next forward
    return None


def plant_q_norm_skipped(b):
    for a in _attn_modules(b):
        a.q_norm = nn.Identity()
    return None


def _rms_plus_eps(self, x: torch.Tensor) -> torch.Tensor:
    dt = x.dtype
    h = x.to(torch.float64 if dt == torch.float64 else torch.float32)
    rms = h.pow(2).mean(-1, keepdim=True).sqrt()
    return self.weight * (h / (rms + self.eps)).to(dt)  # eps added to the rms, not to the mean square


def plant_rmsnorm_eps(b):
    for mod in b.model.modules():
        if isinstance(mod, tm.RMSNorm):
            mod.forward = MethodType(_rms_plus_eps, mod)
    return None


def _attend_gqa_interleaved(self, q, k, v, p, names):
    """Explicit attention with query head h reading kv head h % Hkv (tiling) instead of h // n_rep."""
    T = p.T
    qh = q.transpose(1, 2)[0]  # [Hq, T, Dh]
    kh, vh = k[0].transpose(0, 1), v[0].transpose(0, 1)  # [Hkv, T, Dh]
    if p.cache is not None:
        kh, vh = p.cache.write(self.layer_idx, p.start, kh, vh)
    S = kh.shape[1]
    kh, vh = kh.repeat(self.n_rep, 1, 1), vh.repeat(self.n_rep, 1, 1)  # [Hq, S, Dh]: 0,1,0,1 not 0,0,1,1
    scores = torch.matmul(qh, kh.transpose(1, 2)) * self.scaling  # [Hq, T, S]
    allowed = p.mask if p.mask is not None else torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.to(tm._compute_dtype(q.dtype)), dim=-1).to(q.dtype)
    if wants(names["probs"]):
        probs = tap(names["probs"], probs.unsqueeze(0))[0]
    return torch.matmul(probs, vh).unsqueeze(0).transpose(1, 2)  # [1, T, Hq, Dh]


def plant_gqa_interleaved(b):
    for a in _attn_modules(b):
        a._attend = MethodType(_attend_gqa_interleaved, a)
    return None


def plant_softmax_scale(b):
    for a in _attn_modules(b):
        a.scaling = 1.0 / math.sqrt(b.cfg.hidden_size)
    return None


def plant_no_causal_mask(b):
    for a in _attn_modules(b):
        orig = a._attend

        def unmasked(q, k, v, p, names, orig=orig):
            S = p.start + p.T if p.cache is not None else p.T
            everything = torch.ones(p.T, S, dtype=torch.bool, device=q.device)  # [T, S]: every key visible
            return orig(q, k, v, dataclasses.replace(p, is_causal=False, mask=everything), names)

        a._attend = unmasked
    return None


def _mlp_silu_on_up(self, x, names=None):
    gate, up = self.gate_proj(x), self.up_proj(x)
    if names is not None:
        gate, up = tap(names["gate"], gate), tap(names["up"], up)
    act = gate * F.silu(up)  # silu on the wrong projection
    if names is not None:
        act = tap(names["act"], act)
    return self.down_proj(act)


def plant_silu_on_up(b):
    for layer in b.model.model.layers:
        if isinstance(layer.mlp, tm.Qwen3MLP):
            layer.mlp.forward = MethodType(_mlp_silu_on_up, layer.mlp)
    return None


def _layer_no_attn_residual(self, x, cos, sin, plans):
    n = self.names
    h = tap(n["attn_in"], self.input_layernorm(x))
    a = tap(n["attn_out"], self.self_attn(h, cos, sin, plans, n))
    x = tap(n["resid_mid"], a)  # the residual x + a lost its x
    h = tap(n["mlp_in"], self.post_attention_layernorm(x))
    m = tap(n["mlp_out"], self.mlp(h, n))
    return tap(n["resid_post"], x + m)


def plant_residual_dropped(b):
    for layer in b.model.model.layers:
        layer.forward = MethodType(_layer_no_attn_residual, layer)
    return None


def plant_moe_no_renorm(b):
    for layer in b.model.model.layers:
        if isinstance(layer.mlp, tm.Qwen3MoeBlock):
            layer.mlp.norm_topk_prob = False
    return None


def plant_expert_ids_off_by_one(b):
    """Expert ids shifted by one (a port indexing experts from 1): the chosen ids are wrong, not the weights."""
    E = b.cfg.num_experts

    @contextlib.contextmanager
    def during_run():
        orig = tm.tap

        def tap_(name, x):
            if name.endswith(".topk_idx"):
                x = (x + 1) % E
            return orig(name, x)

        tm.tap = tap_
        try:
            yield
        finally:
            tm.tap = orig

    return during_run


def _write_one_early(self, layer, start, k, v):
    """PagedSeqCache.write with single-token steps stored one position early (over the previous token)."""
    T = k.shape[1]
    end = start + T
    at = start - 1 if (T == 1 and start > 0) else start
    blk, off = self.slots(at, at + T, k.device)
    self.pool.k[layer][blk, :, off] = k.transpose(0, 1)  # [T, Hkv, Dh] into the wrong slots
    self.pool.v[layer][blk, :, off] = v.transpose(0, 1)
    return self.gather(layer, end)


def plant_kv_wrong_position(b):
    m = b.model
    orig = m.new_cache

    def new_cache(capacity, orig=orig):
        cache = orig(capacity)
        cache.write = MethodType(_write_one_early, cache)
        return cache

    m.new_cache = new_cache
    return None


ATTN = ("layers.0.attn", "layers.0.probs")
BUGS: list[Bug] = [
    Bug("rope_interleaved", "RoPE on interleaved pairs, not half-split", ("layers.0.q_rot",),
        plant_rope_interleaved),
    Bug("rope_theta", "wrong rope_theta (10000)", ("layers.0.q_rot",), plant_rope_theta),
    Bug("q_norm_skipped", "q_norm skipped", ("layers.0.q_norm",), plant_q_norm_skipped),
    Bug("rmsnorm_eps", "RMSNorm as x/(rms+eps)", ("layers.0.attn_in",), plant_rmsnorm_eps),
    Bug("gqa_interleaved", "GQA heads by interleave, not by group", ATTN, plant_gqa_interleaved),
    Bug("softmax_scale", "softmax scale 1/sqrt(hidden)", ATTN, plant_softmax_scale),
    Bug("no_causal_mask", "no causal mask", ATTN, plant_no_causal_mask),
    Bug("silu_on_up", "SiLU on up instead of gate", ("layers.0.act",), plant_silu_on_up),
    Bug("residual_dropped", "attention residual dropped", ("layers.0.resid_mid",), plant_residual_dropped),
    Bug("moe_no_renorm", "MoE top-k weights not renormalised", ("layers.0.topk_weight",), plant_moe_no_renorm,
        moe=True),
    Bug("expert_ids_off_by_one", "MoE expert ids off by one", ("layers.0.topk_idx",), plant_expert_ids_off_by_one,
        moe=True),
    Bug("kv_wrong_position", "decode writes KV cache one slot early",
        ("step0.layers.0.attn", "step0.layers.0.probs"), plant_kv_wrong_position, decode_steps=2),
]


# ---- bugs inside the leaf kernels ------------------------------------------------------------------------
class _KernelsWith:
    """The compiled kernels with some functions replaced: a bug inside a leaf kernel, for one model only."""

    def __init__(self, k, **replaced):
        self._k, self._replaced = k, replaced

    def __getattr__(self, name):
        return self._replaced[name] if name in self._replaced else getattr(self._k, name)


def _plant_kernels(b, make):
    from ..fast import build, set_kernels

    k = build.kernels()
    if k is None:
        raise RuntimeError(f"kernel bugs need the C++ kernels: {build.status()}")
    set_kernels(b.model, _KernelsWith(k, **make(k)))
    return None


def plant_kernel_rope_sign(b):
    # both kernels that rotate: RoPE alone, and q/k's fused norm + RoPE (what a decode step's attention runs)
    return _plant_kernels(b, lambda k: {
        "rope": lambda x, cos, sin: k.rope(x, cos, -sin),
        "qk_norm_rope": lambda q, kk, wq, wk, eq, ek, cos, sin: k.qk_norm_rope(q, kk, wq, wk, eq, ek, cos, -sin)})


def plant_kernel_norm_one_plus_w(b):
    # every kernel that normalises: RMSNorm, and the norm inside q/k's fused norm + RoPE
    return _plant_kernels(b, lambda k: {
        "rmsnorm": lambda x, w, eps: k.rmsnorm(x, 1 + w, eps),
        "qk_norm_rope": lambda q, kk, wq, wk, eq, ek, cos, sin: k.qk_norm_rope(q, kk, 1 + wq, 1 + wk, eq, ek, cos,
                                                                                 sin)})


def plant_kernel_qk_norm_weight(b):
    # the fused q/k leaf normalising k's heads with q_norm's weight (a copy-paste slip in a fused kernel)
    return _plant_kernels(b, lambda k: {
        "qk_norm_rope": lambda q, kk, wq, wk, eq, ek, cos, sin: k.qk_norm_rope(q, kk, wq, wq, eq, ek, cos, sin)})


def plant_kernel_silu_halves(b):
    def swapped(k, gu):
        g, u = gu.chunk(2, dim=-1)
        return k.silu_mul(torch.cat((u, g), dim=-1).contiguous())

    return _plant_kernels(b, lambda k: {"silu_mul": lambda gu: swapped(k, gu)})


def plant_kernel_decode_unscaled(b):
    return _plant_kernels(b, lambda k: {
        "attend_decode": lambda q, kn, vn, kc, vc, pos, scale: k.attend_decode(q, kn, vn, kc, vc, pos, 1.0),
        "attend_paged_decode": lambda q, kn, vn, kp, vp, tables, pos, scale:
            k.attend_paged_decode(q, kn, vn, kp, vp, tables, pos, 1.0)})


KERNEL_BUGS: list[Bug] = [
    Bug("kernel_rope_sign", "RoPE kernel rotating the wrong way", ("layers.0.q_rot",), plant_kernel_rope_sign,
        fast=True),
    Bug("kernel_norm_one_plus_w", "RMSNorm kernel scaling by 1 + w", ("layers.0.attn_in",),
        plant_kernel_norm_one_plus_w, fast=True),
    Bug("kernel_qk_norm_weight", "q/k norm + RoPE kernel normalising k with q_norm's weight", ("layers.0.k_norm",),
        plant_kernel_qk_norm_weight, fast=True),
    Bug("kernel_silu_halves", "SiLU*up kernel on swapped halves", ("layers.0.act",), plant_kernel_silu_halves,
        fast=True),
    Bug("kernel_decode_unscaled", "decode attention kernel without the softmax scale",
        ("step0.layers.0.attn", "step0.layers.0.probs"), plant_kernel_decode_unscaled, decode_steps=2, fast=True),
]
BUG_KEYS = [b.key for b in BUGS + KERNEL_BUGS]


class BuggyBackend:
    """A TorchBackend with one bug planted; runs under the bug's per-run patch when it has one."""

    uses_tap_sites = True  # our torch model underneath: verify may stream its taps

    def __init__(self, inner, bug: Bug):
        self.inner, self.bug = inner, bug
        self.cfg, self.dtype = inner.cfg, inner.dtype
        self.name = f"torch+{bug.key}"
        self._during = bug.plant(inner)

    def _ctx(self):
        return self._during() if self._during is not None else contextlib.nullcontext()

    def run(self, input_ids, taps=None, graft=None):
        with self._ctx():
            return self.inner.run(input_ids, taps=taps, graft=graft)

    def run_decode(self, input_ids, decode_steps, taps=None, graft=None):
        with self._ctx():
            return self.inner.run_decode(input_ids, decode_steps, taps=taps, graft=graft)
