"""`--explain`: one token and one channel of one layer worked through by hand, checked against the oracle.

Each step is an explicit Python loop over plain floats whose arithmetic is printed as it happens (the
numbers that go in, the number that comes out): embedding lookup, RMSNorm, a q_proj row, q/k norm, the
RoPE rotation of one pair, one attention score, the softmax of one row, the attention-weighted sum of v,
an o_proj row and the residual, the post-attention RMSNorm, SwiGLU (or the MoE router and one expert), a
down_proj row and the residual, the final norm and one logit. The inputs a step needs beyond what earlier
steps printed (other heads, other positions) come from `scalar.scalar_forward`, which uses the same kind
of loops -- never from the NumPy code under test. Each printed result is checked against the oracle's tap
(or, for the attention scores, which are not a tap, against q_rot·k_rot/sqrt(Dh) computed with NumPy from
the oracle's taps); the last check holds the whole scalar forward (every tap, every token) against the
oracle. The walkthrough ends with "N/N checks passed".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..models.numpy_ref import gqa_scores
from .scalar import NEG_INF, as_lists, inv_freq, scalar_forward, silu, softmax, topk
from .writer import TOL, Walkthrough, Writer, bias_explained, dot_explained, rmsnorm_explained


@dataclass
class _At:
    """Where the walkthrough looks and what it reads: the scalar forward `S` (inputs of each step), the weights
    as lists `W`, the oracle's taps; token t, channel c, query head h (its kv head kvh) and head channel j."""

    cfg: object
    o: Writer
    W: dict
    S: dict
    taps: dict
    input_ids: list[int]
    layer: int
    t: int
    c: int
    h: int

    @property
    def kvh(self) -> int:
        return self.h // self.cfg.n_rep

    @property
    def j(self) -> int:
        return self.c % self.cfg.head_dim

    @property
    def L(self) -> str:  # tap prefix
        return f"layers.{self.layer}."

    @property
    def p(self) -> str:  # checkpoint name prefix
        return f"model.layers.{self.layer}."

    def tap(self, name: str, *idx) -> float:
        return float(self.taps[name][idx])


def explain(cfg, weights: dict, input_ids: list[int], taps: dict[str, np.ndarray], layer: int = 0,
            token: int | None = None, channel: int = 0, head: int = 0, precision: int = 4,
            width: int = 80) -> Walkthrough:
    """Walk through `layer` for one token and channel; `taps` are the oracle's (with probs and scores)."""
    T = len(input_ids)
    t = T - 1 if token is None else token
    for flag, v, hi in (("--explain-layer", layer, cfg.num_hidden_layers), ("--explain-token", t, T),
                        ("--explain-channel", channel, cfg.hidden_size),
                        ("--explain-head", head, cfg.num_attention_heads)):
        if not 0 <= v < hi:
            raise InputError(f"{flag} {v} is out of range 0..{hi - 1}")
    wt = Walkthrough(layer, t, channel, head)
    # every intermediate by loops (scalar_forward): the inputs of each step, never the NumPy code under test
    a = _At(cfg, Writer(wt, precision, width), as_lists(weights), scalar_forward(weights, cfg, input_ids), taps,
            input_ids, layer, t, channel, head)
    a.o.say(f"Layer {layer}, token {t} (id {input_ids[t]}, position {t}), channel {channel}, head {head} "
            f"(kv head {a.kvh}), head channel {a.j}. Each step is a Python loop over floats; its result is checked "
            f"against the NumPy oracle (tolerance {TOL:g} relative).", indent="")
    x = _step_input(a)
    _step_input_norm(a, x)
    _step_q_row(a)
    _step_qk_norm(a)
    _step_rope(a)
    _step_score(a)
    probs = _step_softmax(a)
    _step_attn_sum(a, probs)
    _step_o_proj_residual(a, x)
    _step_post_norm(a)
    _step_mlp_residual(a)
    _step_final_logit(a)
    _step_whole_forward(a)
    wt.lines.append("")
    wt.lines.append(f"{wt.passed}/{len(wt.checks)} checks passed")
    return wt


def _step_input(a: _At) -> list[float]:
    """1. The layer's input row: the embedding row (layer 0) or the previous layer's output."""
    o, t, c, ids = a.o, a.t, a.c, a.input_ids
    if a.layer == 0:
        o.head(f"1. Embedding: x = model.embed_tokens.weight[{ids[t]}] (the row of token id {ids[t]})")
        x = list(a.W["model.embed_tokens.weight"][ids[t]])
        o.say("x = [" + ", ".join(o.v(v) for v in x) + "]")
        o.check(f"embed[{t},{c}]", x[c], a.tap("embed", t, c))
    else:
        prev = f"layers.{a.layer - 1}.resid_post"
        o.head(f"1. Layer input: x = output of layer {a.layer - 1} (resid_post) at token {t}")
        x = list(a.S[prev][t])
        o.say("x = [" + ", ".join(o.v(v) for v in x) + "]")
        o.check(f"{prev}[{t},{c}]", x[c], a.tap(prev, t, c))
    return x


def _step_input_norm(a: _At, x: list[float]) -> None:
    """2. input_layernorm of the layer input, at channel c."""
    a.o.head("2. RMSNorm (input_layernorm): x / sqrt(mean(x²) + eps) * weight")
    y = rmsnorm_explained(a.o, x, a.W[a.p + "input_layernorm.weight"], a.cfg.rms_norm_eps, a.c, "x", "attn_in")
    a.o.check(f"{a.L}attn_in[{a.t},{a.c}]", y, a.tap(a.L + "attn_in", a.t, a.c))


def _step_q_row(a: _At) -> None:
    """3. One row of q_proj: q[t, h, j]."""
    o, t, h, j, Dh = a.o, a.t, a.h, a.j, a.cfg.head_dim
    row = h * Dh + j
    o.head(f"3. Projection row: q[{t},{h},{j}] = Σ_c attn_in[{t},c] · q_proj.weight[{row},c]  "
           f"(row {row} = head {h} · {Dh} + {j})")
    q = dot_explained(o, a.S[a.L + "attn_in"][t], a.W[a.p + "self_attn.q_proj.weight"][row], f"q[{t},{h},{j}]")
    q = bias_explained(o, a.W, a.p + "self_attn.q_proj.bias", row, q, f"q[{t},{h},{j}]")
    o.check(f"{a.L}q[{t},{h},{j}]", q, a.tap(a.L + "q", t, h, j))


def _step_qk_norm(a: _At) -> None:
    """4. Qwen3's per-head RMSNorm of q (head h) and k (kv head kvh), over head_dim, before RoPE."""
    o, t, h, kvh, j, L, eps = a.o, a.t, a.h, a.kvh, a.j, a.L, a.cfg.rms_norm_eps
    o.head(f"4. q norm: RMSNorm over the {a.cfg.head_dim} channels of head {h} (q_norm.weight), before RoPE")
    qn = rmsnorm_explained(o, a.S[L + "q"][t][h], a.W[a.p + "self_attn.q_norm.weight"], eps, j, "q", "q_norm")
    o.check(f"{L}q_norm[{t},{h},{j}]", qn, a.tap(L + "q_norm", t, h, j))
    o.head(f"   k norm: the same over k[{t},{kvh}] with k_norm.weight")
    kn = rmsnorm_explained(o, a.S[L + "k"][t][kvh], a.W[a.p + "self_attn.k_norm.weight"], eps, j, "k", "k_norm")
    o.check(f"{L}k_norm[{t},{kvh},{j}]", kn, a.tap(L + "k_norm", t, kvh, j))


def _step_rope(a: _At) -> None:
    """5. RoPE of the pair (j0, j0 + Dh/2) of q_norm[t, h]."""
    o, cfg, t, h, L = a.o, a.cfg, a.t, a.h, a.L
    Dh = cfg.head_dim
    half = Dh // 2
    j0 = a.j % half
    freqs, rscale = inv_freq(cfg)
    o.head(f"5. RoPE: rotate the pair (channel {j0}, channel {j0 + half}) of q_norm[{t},{h}] by angle "
           f"position · inv_freq[{j0}]")
    if cfg.rope_scaling is None:
        o.say(f"inv_freq[{j0}] = rope_theta^(-2·{j0}/{Dh}) = {cfg.rope_theta:g}^({-2 * j0 / Dh:g}) "
              f"= {freqs[j0]:.6g}")
    else:
        o.say(f"inv_freq[{j0}] = {freqs[j0]:.6g} ({cfg.rope_scaling['rope_type']} scaling; cos/sin scaled by "
              f"{rscale:.6g})")
    ang = t * freqs[j0]
    cs, sn = math.cos(ang) * rscale, math.sin(ang) * rscale
    o.say(f"angle = {t} · {freqs[j0]:.6g} = {ang:.6g};  cos = {cs:.6f}, sin = {sn:.6f}")
    qv = a.S[L + "q_norm"][t][h]
    xa, xb = qv[j0], qv[j0 + half]
    ra = xa * cs - xb * sn
    rb = xb * cs + xa * sn
    o.say(f"q_rot[{j0}] = x{j0}·cos − x{j0 + half}·sin = {o.n(xa)}·{o.n(cs)} − {o.n(xb)}·{o.n(sn)} = {o.r(ra)}")
    o.say(f"q_rot[{j0 + half}] = x{j0 + half}·cos + x{j0}·sin = {o.n(xb)}·{o.n(cs)} + {o.n(xa)}·{o.n(sn)} "
          f"= {o.r(rb)}")
    o.check(f"{L}q_rot[{t},{h},{j0}]", ra, a.tap(L + "q_rot", t, h, j0))
    o.check(f"{L}q_rot[{t},{h},{j0 + half}]", rb, a.tap(L + "q_rot", t, h, j0 + half))


def _step_score(a: _At) -> None:
    """6. One attention score (query t on key position 0), checked against NumPy from the oracle's taps:
    scores are not a tap."""
    o, t, h, kvh, L, Dh = a.o, a.t, a.h, a.kvh, a.L, a.cfg.head_dim
    s0 = 0
    o.head(f"6. Attention score of query token {t} on key position {s0}, head {h}: "
           f"q_rot[{t},{h}] · k_rot[{s0},{kvh}] / sqrt({Dh})")
    qr, kr = a.S[L + "q_rot"][t][h], a.S[L + "k_rot"][s0][kvh]
    terms, acc = [], 0.0
    for m in range(Dh):
        acc += qr[m] * kr[m]
        terms.append(f"{o.n(qr[m])}·{o.n(kr[m])}")
    score = acc * (1.0 / math.sqrt(Dh))
    o.say(f"score = ({' + '.join(terms)}) / {math.sqrt(Dh):g} = {o.r(acc)} / {math.sqrt(Dh):g} = {o.r(score)}")
    vec_scores = gqa_scores(np.asarray(a.taps[L + "q_rot"], dtype=np.float64),
                            np.asarray(a.taps[L + "k_rot"], dtype=np.float64))  # [Hq, T, S], unmasked
    o.check(f"{L}scores[{h},{t},{s0}]", score, float(vec_scores[h, t, s0]))


def _step_softmax(a: _At) -> list[float]:
    """7. Softmax of score row t of head h (causal: later positions are -inf); returns the probabilities."""
    o, t, h, L = a.o, a.t, a.h, a.L
    row_scores = a.S[L + "scores"][h][t]
    o.head(f"7. Softmax of query row {t}, head {h} (positions after {t} are masked to -inf: causal)")
    o.say("scores = [" + ", ".join(o.v(v) for v in row_scores) + "]")
    mx = max(row_scores)
    es = [0.0 if v == NEG_INF else math.exp(v - mx) for v in row_scores]
    tot = 0.0
    for e in es:
        tot += e
    o.say(f"max = {o.r(mx)};  e_s = exp(score_s − max) = [" + ", ".join(o.r(e) for e in es) + "]")
    o.say(f"sum = {' + '.join(o.r(e) for e in es)} = {o.r(tot)}")
    probs = [e / tot for e in es]
    o.say("p = e / sum = [" + ", ".join(o.r(v) for v in probs) + "]")
    ref_row = a.taps[L + "probs"][h, t]
    worst = max(range(len(probs)), key=lambda s: abs(probs[s] - float(ref_row[s])))
    o.check(f"{L}probs[{h},{t},:] (worst entry {worst})", probs[worst], float(ref_row[worst]))
    return probs


def _step_attn_sum(a: _At, probs: list[float]) -> None:
    """8. The attention-weighted sum of v at head channel j."""
    t, h, kvh, j, L = a.t, a.h, a.kvh, a.j, a.L
    a.o.head(f"8. Attention output: attn[{t},{h},{j}] = Σ_s p_s · v[s,{kvh},{j}]")
    vs = [a.S[L + "v"][s][kvh][j] for s in range(len(a.input_ids))]
    at = dot_explained(a.o, probs, vs, f"attn[{t},{h},{j}]")
    a.o.check(f"{L}attn[{t},{h},{j}]", at, a.tap(L + "attn", t, h, j))


def _step_o_proj_residual(a: _At, x: list[float]) -> None:
    """9. o_proj row c over every head's output, then the residual."""
    o, t, c, L = a.o, a.t, a.c, a.L
    o.head(f"9. o_proj row {c} over all heads' outputs, then the residual: resid_mid = x + attn_out")
    flat = [v for hv in a.S[L + "attn"][t] for v in hv]
    ao = dot_explained(o, flat, a.W[a.p + "self_attn.o_proj.weight"][c], f"attn_out[{t},{c}]")
    ao = bias_explained(o, a.W, a.p + "self_attn.o_proj.bias", c, ao, f"attn_out[{t},{c}]")
    o.check(f"{L}attn_out[{t},{c}]", ao, a.tap(L + "attn_out", t, c))
    rm = x[c] + ao
    o.say(f"resid_mid[{t},{c}] = x[{c}] + attn_out[{t},{c}] = {o.n(x[c])} + {o.n(ao)} = {o.r(rm)}")
    o.check(f"{L}resid_mid[{t},{c}]", rm, a.tap(L + "resid_mid", t, c))


def _step_post_norm(a: _At) -> None:
    """10. post_attention_layernorm of resid_mid, at channel c."""
    a.o.head("10. RMSNorm (post_attention_layernorm) of resid_mid")
    mi = rmsnorm_explained(a.o, a.S[a.L + "resid_mid"][a.t], a.W[a.p + "post_attention_layernorm.weight"],
                            a.cfg.rms_norm_eps, a.c, "r", "mlp_in")
    a.o.check(f"{a.L}mlp_in[{a.t},{a.c}]", mi, a.tap(a.L + "mlp_in", a.t, a.c))


def _step_mlp_residual(a: _At) -> None:
    """11-12. SwiGLU at one MLP channel and a down_proj row (or the MoE router and its experts), then the
    residual."""
    o, cfg, t, c, L, p = a.o, a.cfg, a.t, a.c, a.L, a.p
    mlp_in = a.S[L + "mlp_in"][t]
    if cfg.is_moe_layer(a.layer):
        mo = _moe_explained(o, cfg, a.W, p, L, t, c, mlp_in, a.taps)
    else:
        I = cfg.intermediate_size
        i = c % I
        o.head(f"11. SwiGLU, MLP channel {i}: act = silu(gate) · up, silu(g) = g / (1 + exp(−g))")
        g = dot_explained(o, mlp_in, a.W[p + "mlp.gate_proj.weight"][i], f"gate[{t},{i}]")
        o.check(f"{L}gate[{t},{i}]", g, a.tap(L + "gate", t, i))
        u = dot_explained(o, mlp_in, a.W[p + "mlp.up_proj.weight"][i], f"up[{t},{i}]")
        o.check(f"{L}up[{t},{i}]", u, a.tap(L + "up", t, i))
        sg = silu(g)
        act = sg * u
        o.say(f"silu(gate) = {o.n(g)} / (1 + exp({o.n(-g)})) = {o.r(sg)};  act = {o.r(sg)} · {o.n(u)} = {o.r(act)}")
        o.check(f"{L}act[{t},{i}]", act, a.tap(L + "act", t, i))
        o.head(f"12. down_proj row {c} over all {I} MLP channels, then the residual")
        mo = dot_explained(o, a.S[L + "act"][t], a.W[p + "mlp.down_proj.weight"][c], f"mlp_out[{t},{c}]")
    o.check(f"{L}mlp_out[{t},{c}]", mo, a.tap(L + "mlp_out", t, c))
    rm = a.S[L + "resid_mid"][t][c]
    rp = rm + mo
    o.say(f"resid_post[{t},{c}] = resid_mid + mlp_out = {o.n(rm)} + {o.n(mo)} = {o.r(rp)}")
    o.check(f"{L}resid_post[{t},{c}]", rp, a.tap(L + "resid_post", t, c))


def _step_final_logit(a: _At) -> None:
    """13. The final norm of the last layer's output and the logit of the predicted token."""
    o, t, c = a.o, a.t, a.c
    last = f"layers.{a.cfg.num_hidden_layers - 1}.resid_post"
    o.head("13. Final RMSNorm (model.norm) of the last layer's output, then the logit of the predicted token")
    fn = rmsnorm_explained(o, a.S[last][t], a.W["model.norm.weight"], a.cfg.rms_norm_eps, c, "y", "final_norm")
    o.check(f"final_norm[{t},{c}]", fn, a.tap("final_norm", t, c))
    logits_t = a.S["logits"][t]
    best = max(range(len(logits_t)), key=lambda v: logits_t[v])
    lm = a.W.get("lm_head.weight", a.W["model.embed_tokens.weight"])
    lg = dot_explained(o, a.S["final_norm"][t], lm[best], f"logits[{t},{best}]")
    o.check(f"logits[{t},{best}]", lg, a.tap("logits", t, best))


def _step_whole_forward(a: _At) -> None:
    """14. Every tap of the scalar forward, every token, against the oracle: the worst relative difference."""
    a.o.head("14. The whole forward pass by the same loops, every tap and every token, against the oracle")
    worst = (-1.0, "", 0.0, 0.0)  # (relative difference, tap, scalar value, oracle value)
    n = 0
    for name, ref in a.taps.items():
        if name not in a.S:
            continue
        n += 1
        ours = np.array(a.S[name], dtype=np.float64).reshape(-1)
        refa = np.asarray(ref, dtype=np.float64).reshape(-1)
        with np.errstate(invalid="ignore"):
            d = np.abs(ours - refa) / np.maximum(1.0, np.abs(refa))
        same = (ours == refa) | (np.isnan(ours) & np.isnan(refa))
        d = np.where(same, 0.0, np.where(np.isnan(d), np.inf, d))  # NaN on one side only: worst there is
        k = int(np.argmax(d)) if d.size else 0
        if d.size and float(d[k]) > worst[0]:
            worst = (float(d[k]), name, float(ours[k]), float(refa[k]))
    a.o.say(f"{n} taps compared; largest relative difference {worst[0]:.1e} in {worst[1]}")
    a.o.check(f"all {n} taps, every element (worst in {worst[1]})", worst[2], worst[3])


def _moe_explained(o: Writer, cfg, W, p: str, L: str, t: int, c: int, mlp_in: list[float], taps) -> float:
    E, K = cfg.num_experts, cfg.num_experts_per_tok
    o.head(f"11. MoE router: logits over {E} experts, softmax, top-{K}"
           + (", renormalised to sum 1" if cfg.norm_topk_prob else ""))
    router = []
    for e in range(E):
        router.append(dot_explained(o, mlp_in, W[p + "mlp.gate.weight"][e], f"router_logits[{t},{e}]"))
    o.check(f"{L}router_logits[{t},0]", router[0], float(taps[L + "router_logits"][t, 0]))
    probs = softmax(router)
    o.say("softmax = [" + ", ".join(o.r(v) for v in probs) + "]")
    idx = topk(probs, K)
    w = [probs[e] for e in idx]
    if cfg.norm_topk_prob:
        s = sum(w)
        o.say(f"top-{K} experts {idx} with p {[round(v, o.p + 2) for v in w]}; / {o.r(s)} →")
        w = [v / s for v in w]
    o.say(f"experts {idx}, weights [" + ", ".join(o.r(v) for v in w) + "]")
    ref_idx = [int(v) for v in taps[L + "topk_idx"][t]]
    ref_w = dict(zip(ref_idx, (float(v) for v in taps[L + "topk_weight"][t]), strict=True))
    e0 = idx[0]
    o.check(f"{L}topk_weight[{t}] for expert {e0}", w[0], ref_w.get(e0, float("nan")))
    I = cfg.moe_intermediate_size
    i = c % I
    total = 0.0
    o.head(f"12. Each chosen expert's SwiGLU, down_proj row {c}, weighted and summed; then the residual")
    for e, we in zip(idx, w, strict=True):
        q = f"{p}mlp.experts.{e}."
        g = [sum(a * b for a, b in zip(mlp_in, r, strict=True)) for r in W[q + "gate_proj.weight"]]
        u = [sum(a * b for a, b in zip(mlp_in, r, strict=True)) for r in W[q + "up_proj.weight"]]
        act = [silu(g[m]) * u[m] for m in range(I)]
        o.say(f"expert {e}: gate[{i}] = {o.r(g[i])}, up[{i}] = {o.r(u[i])}, act[{i}] = silu(gate)·up = "
              f"{o.r(act[i])}")
        d = dot_explained(o, act, W[q + "down_proj.weight"][c], f"expert {e} down[{c}]")
        total += we * d
        o.say(f"+ {o.r(we)} · {o.r(d)}  (running sum {o.r(total)})")
    o.say(f"mlp_out[{t},{c}] = {o.r(total)}")
    return total
