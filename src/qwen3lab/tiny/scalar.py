"""Qwen3 forward pass in plain Python floats and explicit loops: the reference the walkthrough and the
tests hold the NumPy oracle against.

Nothing here uses NumPy arithmetic (weights arrive as nested lists), so a bug in vectorised code -- a
wrong axis, a broadcast, a transposed matrix -- cannot hide in both. Same order of operations as Qwen3:
RMSNorm (x / sqrt(mean(x²) + eps) * w), q/k per-head RMSNorm before RoPE, half-split RoPE pairs
(j, j + Dh/2), causal softmax attention scaled by 1/sqrt(Dh), GQA by head // n_rep, SwiGLU
(silu(gate) * up), MoE routing by softmax -> top-k -> (optionally) renormalise.

Returns every DESIGN.md tap plus `layers.i.scores` (attention scores before softmax, -inf above the
diagonal), as nested lists in the canonical shapes. Cost is O(params * T) Python steps: fine for the
tiny model, slow (seconds) for anything of a million parameters.
"""

from __future__ import annotations

import math

from ..rope import rope_parameters

NEG_INF = float("-inf")


# ---- one operation each, over lists of floats ----------------------------------------------------
def rmsnorm(x: list[float], w: list[float], eps: float) -> list[float]:
    ss = 0.0
    for v in x:
        ss += v * v
    rms = math.sqrt(ss / len(x) + eps)
    return [x[c] / rms * w[c] for c in range(len(x))]


def dot(a: list[float], b: list[float]) -> float:
    s = 0.0
    for i in range(len(a)):
        s += a[i] * b[i]
    return s


def matvec(W: list[list[float]], x: list[float]) -> list[float]:
    """W [R][C] times x [C] -> [R] (a torch Linear without bias: y = W x)."""
    return [dot(row, x) for row in W]


def silu(x: float) -> float:
    # x * sigmoid(x), written so a large negative x gives 0 rather than overflowing exp
    if x >= 0:
        return x / (1.0 + math.exp(-x))
    e = math.exp(x)
    return x * e / (1.0 + e)


def softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    if m == NEG_INF:
        return [float("nan")] * len(xs)
    es = [0.0 if v == NEG_INF else math.exp(v - m) for v in xs]
    s = 0.0
    for e in es:
        s += e
    return [e / s for e in es]


def inv_freq(cfg) -> tuple[list[float], float]:
    """RoPE inverse frequencies theta^(-2j/Dh) and the cos/sin scale. Scaled rope types (YaRN etc.) come
    from rope.py, the project's one implementation of those formulas."""
    if cfg.rope_scaling is None:
        Dh = cfg.head_dim
        return [cfg.rope_theta ** (-(2.0 * j) / Dh) for j in range(Dh // 2)], 1.0
    f, scale = rope_parameters(cfg)
    return [float(v) for v in f], float(scale)


def rope(x: list[float], pos: int, freqs: list[float], scale: float) -> list[float]:
    """Rotate pairs (j, j + Dh/2) of one head's vector by angle pos * freq_j."""
    half = len(x) // 2
    out = [0.0] * len(x)
    for j in range(half):
        c, s = math.cos(pos * freqs[j]) * scale, math.sin(pos * freqs[j]) * scale
        out[j] = x[j] * c - x[j + half] * s
        out[j + half] = x[j + half] * c + x[j] * s
    return out


def split_heads(v: list[float], H: int, Dh: int) -> list[list[float]]:
    return [v[h * Dh:(h + 1) * Dh] for h in range(H)]


def topk(p: list[float], k: int) -> list[int]:
    """Indices of the k largest values, largest first (ties: lower index first)."""
    return sorted(range(len(p)), key=lambda e: (-p[e], e))[:k]


# ---- the whole model --------------------------------------------------------------------------------
def as_lists(weights) -> dict[str, list]:
    return {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in weights.items()}


def scalar_forward(weights, cfg, input_ids: list[int]) -> dict[str, list]:
    """Every tap (plus layers.i.scores) for one sequence, computed with Python loops over floats."""
    W = as_lists(weights)
    T, D = len(input_ids), cfg.hidden_size
    Hq, Hkv, Dh, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
    n_rep, scale = Hq // Hkv, 1.0 / math.sqrt(Dh)
    freqs, rscale = inv_freq(cfg)
    taps: dict[str, list] = {}
    x = [list(W["model.embed_tokens.weight"][t]) for t in input_ids]  # [T][D]
    taps["embed"] = x
    for i in range(cfg.num_hidden_layers):
        p, L = f"model.layers.{i}.", f"layers.{i}."

        def lin(name: str, rows: list[list[float]], _p=p) -> list[list[float]]:
            out = [matvec(W[_p + name + ".weight"], r) for r in rows]
            bias = W.get(_p + name + ".bias")
            return [[o[j] + bias[j] for j in range(len(o))] for o in out] if bias is not None else out

        h = [rmsnorm(r, W[p + "input_layernorm.weight"], eps) for r in x]
        q = [split_heads(r, Hq, Dh) for r in lin("self_attn.q_proj", h)]  # [T][Hq][Dh]
        k = [split_heads(r, Hkv, Dh) for r in lin("self_attn.k_proj", h)]
        v = [split_heads(r, Hkv, Dh) for r in lin("self_attn.v_proj", h)]
        qn = [[rmsnorm(hv, W[p + "self_attn.q_norm.weight"], eps) for hv in r] for r in q]
        kn = [[rmsnorm(hv, W[p + "self_attn.k_norm.weight"], eps) for hv in r] for r in k]
        qr = [[rope(hv, t, freqs, rscale) for hv in qn[t]] for t in range(T)]
        kr = [[rope(hv, t, freqs, rscale) for hv in kn[t]] for t in range(T)]
        scores = [[[dot(qr[t][hh], kr[s][hh // n_rep]) * scale if s <= t else NEG_INF for s in range(T)]
                   for t in range(T)] for hh in range(Hq)]  # [Hq][T][S]
        probs = [[softmax(row) for row in scores[hh]] for hh in range(Hq)]
        attn = [[[sum_p(probs[hh][t], [v[s][hh // n_rep][j] for s in range(T)]) for j in range(Dh)]
                 for hh in range(Hq)] for t in range(T)]  # [T][Hq][Dh]
        attn_out = lin("self_attn.o_proj", [[c for hv in attn[t] for c in hv] for t in range(T)])
        resid_mid = [[x[t][c] + attn_out[t][c] for c in range(D)] for t in range(T)]
        mlp_in = [rmsnorm(r, W[p + "post_attention_layernorm.weight"], eps) for r in resid_mid]
        taps.update({L + "attn_in": h, L + "q": q, L + "k": k, L + "v": v, L + "q_norm": qn, L + "k_norm": kn,
                     L + "q_rot": qr, L + "k_rot": kr, L + "scores": scores, L + "probs": probs, L + "attn": attn,
                     L + "attn_out": attn_out, L + "resid_mid": resid_mid, L + "mlp_in": mlp_in})
        if cfg.is_moe_layer(i):
            mlp_out = _moe(W, p, L, cfg, mlp_in, taps)
        else:
            gate = lin("mlp.gate_proj", mlp_in)
            up = lin("mlp.up_proj", mlp_in)
            act = [[silu(g[j]) * u[j] for j in range(len(g))] for g, u in zip(gate, up, strict=True)]
            mlp_out = lin("mlp.down_proj", act)
            taps.update({L + "gate": gate, L + "up": up, L + "act": act})
        x = [[resid_mid[t][c] + mlp_out[t][c] for c in range(D)] for t in range(T)]
        taps.update({L + "mlp_out": mlp_out, L + "resid_post": x})
    fn = [rmsnorm(r, W["model.norm.weight"], eps) for r in x]
    lm = W.get("lm_head.weight", W["model.embed_tokens.weight"])
    taps["final_norm"] = fn
    taps["logits"] = [matvec(lm, r) for r in fn]
    return taps


def sum_p(p: list[float], vals: list[float]) -> float:
    s = 0.0
    for a, b in zip(p, vals, strict=True):
        s += a * b  # masked positions add 0 * v, as a matmul does (so a NaN in v still spreads)
    return s


def _moe(W, p: str, L: str, cfg, mlp_in: list[list[float]], taps: dict) -> list[list[float]]:
    E, K, D = cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size
    router, idx_all, w_all, out = [], [], [], []
    for r in mlp_in:
        logits = matvec(W[p + "mlp.gate.weight"], r)  # [E]
        probs = softmax(logits)
        idx = topk(probs, K)
        w = [probs[e] for e in idx]
        if cfg.norm_topk_prob:
            s = sum(w)
            w = [v / s for v in w]
        y = [0.0] * D
        for e, we in zip(idx, w, strict=True):
            q = f"{p}mlp.experts.{e}."
            g, u = matvec(W[q + "gate_proj.weight"], r), matvec(W[q + "up_proj.weight"], r)
            d = matvec(W[q + "down_proj.weight"], [silu(g[j]) * u[j] for j in range(len(g))])
            for c in range(D):
                y[c] += we * d[c]
        router.append(logits)
        idx_all.append(idx)
        w_all.append(w)
        out.append(y)
    taps.update({L + "router_logits": router, L + "topk_idx": idx_all, L + "topk_weight": w_all})
    assert len(router[0]) == E
    return out
