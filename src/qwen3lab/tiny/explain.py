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
import textwrap
from dataclasses import dataclass, field

import numpy as np

from .scalar import NEG_INF, as_lists, inv_freq, scalar_forward, silu, softmax, topk

TOL = 1e-9  # |scalar - oracle| <= TOL * max(1, |oracle|): both are float64, only the summation order differs


@dataclass
class Check:
    label: str
    ours: float
    oracle: float
    passed: bool

    def to_json(self) -> dict:
        def j(v):
            return v if math.isfinite(v) else None
        return {"label": self.label, "scalar": j(self.ours), "oracle": j(self.oracle), "passed": self.passed}


@dataclass
class Walkthrough:
    layer: int
    token: int
    channel: int
    head: int
    lines: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return sum(c.passed for c in self.checks)

    @property
    def ok(self) -> bool:
        return self.passed == len(self.checks)

    def text(self) -> str:
        return "\n".join(self.lines)

    def to_json(self) -> dict:
        return {"layer": self.layer, "token": self.token, "channel": self.channel, "head": self.head,
                "checks_passed": self.passed, "checks_total": len(self.checks),
                "checks": [c.to_json() for c in self.checks]}


class _Writer:
    def __init__(self, w: Walkthrough, p: int, width: int):
        self.w, self.p, self.width = w, p, width

    def n(self, v: float) -> str:
        """A number as it goes into a formula: parenthesised when negative so '+ (-0.1)' reads right."""
        if math.isnan(v) or math.isinf(v):
            return str(v)
        s = f"{v:.{self.p}f}"
        return f"({s})" if v < 0 else s

    def v(self, v: float) -> str:
        """A number in a list: no parentheses needed."""
        return f"{v:.{self.p}f}" if math.isfinite(v) else str(v)

    def r(self, v: float) -> str:
        """A result: two more digits than the inputs."""
        return f"{v:.{self.p + 2}f}" if math.isfinite(v) else str(v)

    def say(self, text: str, indent: str = "   ") -> None:
        # formulas wrap at ' + ' so a 16-term sum stays inside the terminal
        for para in text.split("\n"):
            self.w.lines.extend(textwrap.wrap(para, self.width, initial_indent=indent,
                                              subsequent_indent=indent + "    ", break_long_words=False,
                                              break_on_hyphens=False) or [""])

    def head(self, text: str) -> None:
        self.w.lines.append("")
        self.say(text, indent="")

    def check(self, label: str, ours: float, oracle: float) -> None:
        ok = (math.isnan(ours) and math.isnan(oracle)) or abs(ours - oracle) <= TOL * max(1.0, abs(oracle))
        self.w.checks.append(Check(label, float(ours), float(oracle), bool(ok)))
        diff = abs(ours - oracle) if math.isfinite(ours) and math.isfinite(oracle) else float("nan")
        self.say(f"check {label}: oracle {self.r(oracle)}, |diff| {diff:.1e}  {'✓' if ok else '✗ MISMATCH'}")


def explain(cfg, weights: dict, input_ids: list[int], taps: dict[str, np.ndarray], layer: int = 0,
            token: int | None = None, channel: int = 0, head: int = 0, precision: int = 4,
            width: int = 80) -> Walkthrough:
    """Walk through `layer` for one token and channel; `taps` are the oracle's (with probs and scores)."""
    from ..errors import InputError

    T = len(input_ids)
    t = T - 1 if token is None else token
    for flag, v, hi in (("--explain-layer", layer, cfg.num_hidden_layers), ("--explain-token", t, T),
                        ("--explain-channel", channel, cfg.hidden_size),
                        ("--explain-head", head, cfg.num_attention_heads)):
        if not 0 <= v < hi:
            raise InputError(f"{flag} {v} is out of range 0..{hi - 1}")
    W = as_lists(weights)
    S = scalar_forward(weights, cfg, input_ids)  # every intermediate, by loops: the inputs of each step
    wt = Walkthrough(layer, t, channel, head)
    o = _Writer(wt, precision, width)
    Dh, eps = cfg.head_dim, cfg.rms_norm_eps
    c, h, kvh = channel, head, head // cfg.n_rep
    j = channel % Dh
    L, p = f"layers.{layer}.", f"model.layers.{layer}."
    o.say(f"Layer {layer}, token {t} (id {input_ids[t]}, position {t}), channel {c}, head {h} (kv head {kvh}), "
          f"head channel {j}. Each step is a Python loop over floats; its result is checked against the NumPy "
          f"oracle (tolerance {TOL:g} relative).", indent="")

    # 1. embedding / layer input
    if layer == 0:
        o.head(f"1. Embedding: x = model.embed_tokens.weight[{input_ids[t]}] (the row of token id {input_ids[t]})")
        x = list(W["model.embed_tokens.weight"][input_ids[t]])
        o.say("x = [" + ", ".join(o.v(v) for v in x) + "]")
        o.check(f"embed[{t},{c}]", x[c], float(taps["embed"][t, c]))
    else:
        o.head(f"1. Layer input: x = output of layer {layer - 1} (resid_post) at token {t}")
        x = list(S[f"layers.{layer - 1}.resid_post"][t])
        o.say("x = [" + ", ".join(o.v(v) for v in x) + "]")
        o.check(f"layers.{layer - 1}.resid_post[{t},{c}]", x[c], float(taps[f"layers.{layer - 1}.resid_post"][t, c]))

    # 2. RMSNorm
    o.head("2. RMSNorm (input_layernorm): x / sqrt(mean(x²) + eps) * weight")
    a = _rmsnorm_explained(o, x, W[p + "input_layernorm.weight"], eps, c, "x", "attn_in")
    o.check(f"{L}attn_in[{t},{c}]", a, float(taps[L + "attn_in"][t, c]))
    attn_in = S[L + "attn_in"][t]

    # 3. one q_proj row
    row = h * Dh + j
    o.head(f"3. Projection row: q[{t},{h},{j}] = Σ_c attn_in[{t},c] · q_proj.weight[{row},c]  "
           f"(row {row} = head {h} · {Dh} + {j})")
    wq = W[p + "self_attn.q_proj.weight"][row]
    q = _dot_explained(o, attn_in, wq, f"q[{t},{h},{j}]")
    q = _bias(o, W, p + "self_attn.q_proj.bias", row, q, f"q[{t},{h},{j}]")
    o.check(f"{L}q[{t},{h},{j}]", q, float(taps[L + "q"][t, h, j]))

    # 4. q/k norm (per head, over head_dim)
    o.head(f"4. q norm: RMSNorm over the {Dh} channels of head {h} (q_norm.weight), before RoPE")
    qn = _rmsnorm_explained(o, S[L + "q"][t][h], W[p + "self_attn.q_norm.weight"], eps, j, "q", "q_norm")
    o.check(f"{L}q_norm[{t},{h},{j}]", qn, float(taps[L + "q_norm"][t, h, j]))
    o.head(f"   k norm: the same over k[{t},{kvh}] with k_norm.weight")
    kn = _rmsnorm_explained(o, S[L + "k"][t][kvh], W[p + "self_attn.k_norm.weight"], eps, j, "k", "k_norm")
    o.check(f"{L}k_norm[{t},{kvh},{j}]", kn, float(taps[L + "k_norm"][t, kvh, j]))

    # 5. RoPE of one pair
    half = Dh // 2
    j0 = j % half
    freqs, rscale = inv_freq(cfg)
    o.head(f"5. RoPE: rotate the pair (channel {j0}, channel {j0 + half}) of q_norm[{t},{h}] by angle "
           f"position · inv_freq[{j0}]")
    qv = S[L + "q_norm"][t][h]
    if cfg.rope_scaling is None:
        o.say(f"inv_freq[{j0}] = rope_theta^(-2·{j0}/{Dh}) = {cfg.rope_theta:g}^({-2 * j0 / Dh:g}) "
              f"= {freqs[j0]:.6g}")
    else:
        o.say(f"inv_freq[{j0}] = {freqs[j0]:.6g} ({cfg.rope_scaling['rope_type']} scaling; cos/sin scaled by "
              f"{rscale:.6g})")
    ang = t * freqs[j0]
    cs, sn = math.cos(ang) * rscale, math.sin(ang) * rscale
    o.say(f"angle = {t} · {freqs[j0]:.6g} = {ang:.6g};  cos = {cs:.6f}, sin = {sn:.6f}")
    xa, xb = qv[j0], qv[j0 + half]
    ra = xa * cs - xb * sn
    rb = xb * cs + xa * sn
    o.say(f"q_rot[{j0}] = x{j0}·cos − x{j0 + half}·sin = {o.n(xa)}·{o.n(cs)} − {o.n(xb)}·{o.n(sn)} = {o.r(ra)}")
    o.say(f"q_rot[{j0 + half}] = x{j0 + half}·cos + x{j0}·sin = {o.n(xb)}·{o.n(cs)} + {o.n(xa)}·{o.n(sn)} "
          f"= {o.r(rb)}")
    o.check(f"{L}q_rot[{t},{h},{j0}]", ra, float(taps[L + "q_rot"][t, h, j0]))
    o.check(f"{L}q_rot[{t},{h},{j0 + half}]", rb, float(taps[L + "q_rot"][t, h, j0 + half]))

    # 6. one attention score
    s0 = 0
    scale = 1.0 / math.sqrt(Dh)
    o.head(f"6. Attention score of query token {t} on key position {s0}, head {h}: "
           f"q_rot[{t},{h}] · k_rot[{s0},{kvh}] / sqrt({Dh})")
    qr, kr = S[L + "q_rot"][t][h], S[L + "k_rot"][s0][kvh]
    terms, acc = [], 0.0
    for m in range(Dh):
        acc += qr[m] * kr[m]
        terms.append(f"{o.n(qr[m])}·{o.n(kr[m])}")
    score = acc * scale
    o.say(f"score = ({' + '.join(terms)}) / {math.sqrt(Dh):g} = {o.r(acc)} / {math.sqrt(Dh):g} = {o.r(score)}")
    vec_scores = _numpy_scores(cfg, taps, layer)  # the vectorised reference for a value that is not a tap
    o.check(f"{L}scores[{h},{t},{s0}]", score, float(vec_scores[h, t, s0]))

    # 7. softmax of row t
    row_scores = S[L + "scores"][h][t]
    o.head(f"7. Softmax of query row {t}, head {h} (positions after {t} are masked to -inf: causal)")
    o.say("scores = [" + ", ".join(o.v(v) for v in row_scores) + "]")
    mx = max(row_scores)
    es, tot = [], 0.0
    for v in row_scores:
        e = 0.0 if v == NEG_INF else math.exp(v - mx)
        es.append(e)
        tot += e
    o.say(f"max = {o.r(mx)};  e_s = exp(score_s − max) = [" + ", ".join(o.r(e) for e in es) + "]")
    o.say(f"sum = {' + '.join(o.r(e) for e in es)} = {o.r(tot)}")
    probs = [e / tot for e in es]
    o.say("p = e / sum = [" + ", ".join(o.r(v) for v in probs) + "]")
    ref_row = taps[L + "probs"][h, t]
    worst = max(range(len(probs)), key=lambda s: abs(probs[s] - float(ref_row[s])))
    o.check(f"{L}probs[{h},{t},:] (worst entry {worst})", probs[worst], float(ref_row[worst]))

    # 8. weighted sum of v
    o.head(f"8. Attention output: attn[{t},{h},{j}] = Σ_s p_s · v[s,{kvh},{j}]")
    vs = [S[L + "v"][s][kvh][j] for s in range(T)]
    at = _dot_explained(o, probs, vs, f"attn[{t},{h},{j}]")
    o.check(f"{L}attn[{t},{h},{j}]", at, float(taps[L + "attn"][t, h, j]))

    # 9. o_proj row and the residual
    o.head(f"9. o_proj row {c} over all heads' outputs, then the residual: resid_mid = x + attn_out")
    flat = [v for hv in S[L + "attn"][t] for v in hv]
    ao = _dot_explained(o, flat, W[p + "self_attn.o_proj.weight"][c], f"attn_out[{t},{c}]")
    ao = _bias(o, W, p + "self_attn.o_proj.bias", c, ao, f"attn_out[{t},{c}]")
    o.check(f"{L}attn_out[{t},{c}]", ao, float(taps[L + "attn_out"][t, c]))
    rm = x[c] + ao
    o.say(f"resid_mid[{t},{c}] = x[{c}] + attn_out[{t},{c}] = {o.n(x[c])} + {o.n(ao)} = {o.r(rm)}")
    o.check(f"{L}resid_mid[{t},{c}]", rm, float(taps[L + "resid_mid"][t, c]))

    # 10. post-attention RMSNorm
    o.head("10. RMSNorm (post_attention_layernorm) of resid_mid")
    mi = _rmsnorm_explained(o, S[L + "resid_mid"][t], W[p + "post_attention_layernorm.weight"], eps, c,
                            "r", "mlp_in")
    o.check(f"{L}mlp_in[{t},{c}]", mi, float(taps[L + "mlp_in"][t, c]))
    mlp_in = S[L + "mlp_in"][t]

    # 11. SwiGLU (dense) or router + one expert (MoE)
    if cfg.is_moe_layer(layer):
        mo = _moe_explained(o, cfg, W, p, L, t, c, mlp_in, taps)
    else:
        I = cfg.intermediate_size
        i = c % I
        o.head(f"11. SwiGLU, MLP channel {i}: act = silu(gate) · up, silu(g) = g / (1 + exp(−g))")
        g = _dot_explained(o, mlp_in, W[p + "mlp.gate_proj.weight"][i], f"gate[{t},{i}]")
        o.check(f"{L}gate[{t},{i}]", g, float(taps[L + "gate"][t, i]))
        u = _dot_explained(o, mlp_in, W[p + "mlp.up_proj.weight"][i], f"up[{t},{i}]")
        o.check(f"{L}up[{t},{i}]", u, float(taps[L + "up"][t, i]))
        sg = silu(g)
        act = sg * u
        o.say(f"silu(gate) = {o.n(g)} / (1 + exp({o.n(-g)})) = {o.r(sg)};  act = {o.r(sg)} · {o.n(u)} = {o.r(act)}")
        o.check(f"{L}act[{t},{i}]", act, float(taps[L + "act"][t, i]))

        o.head(f"12. down_proj row {c} over all {I} MLP channels, then the residual")
        mo = _dot_explained(o, S[L + "act"][t], W[p + "mlp.down_proj.weight"][c], f"mlp_out[{t},{c}]")
    o.check(f"{L}mlp_out[{t},{c}]", mo, float(taps[L + "mlp_out"][t, c]))
    rp = S[L + "resid_mid"][t][c] + mo
    o.say(f"resid_post[{t},{c}] = resid_mid + mlp_out = {o.n(S[L + 'resid_mid'][t][c])} + {o.n(mo)} = {o.r(rp)}")
    o.check(f"{L}resid_post[{t},{c}]", rp, float(taps[L + "resid_post"][t, c]))

    # 13. final norm and one logit
    last = f"layers.{cfg.num_hidden_layers - 1}.resid_post"
    o.head("13. Final RMSNorm (model.norm) of the last layer's output, then the logit of the predicted token")
    fn = _rmsnorm_explained(o, S[last][t], W["model.norm.weight"], eps, c, "y", "final_norm")
    o.check(f"final_norm[{t},{c}]", fn, float(taps["final_norm"][t, c]))
    logits_t = S["logits"][t]
    best = max(range(len(logits_t)), key=lambda v: logits_t[v])
    lm = W.get("lm_head.weight", W["model.embed_tokens.weight"])
    lg = _dot_explained(o, S["final_norm"][t], lm[best], f"logits[{t},{best}]")
    o.check(f"logits[{t},{best}]", lg, float(taps["logits"][t, best]))

    # 14. the whole scalar forward
    o.head("14. The whole forward pass by the same loops, every tap and every token, against the oracle")
    worst = (-1.0, "", 0.0, 0.0)  # (relative difference, tap, scalar value, oracle value)
    n = 0
    for name, ref in taps.items():
        if name not in S:
            continue
        n += 1
        ours = np.array(S[name], dtype=np.float64).reshape(-1)
        refa = np.asarray(ref, dtype=np.float64).reshape(-1)
        with np.errstate(invalid="ignore"):
            d = np.abs(ours - refa) / np.maximum(1.0, np.abs(refa))
        same = (ours == refa) | (np.isnan(ours) & np.isnan(refa))
        d = np.where(same, 0.0, np.where(np.isnan(d), np.inf, d))  # NaN on one side only: worst there is
        k = int(np.argmax(d)) if d.size else 0
        if d.size and float(d[k]) > worst[0]:
            worst = (float(d[k]), name, float(ours[k]), float(refa[k]))
    o.say(f"{n} taps compared; largest relative difference {worst[0]:.1e} in {worst[1]}")
    o.check(f"all {n} taps, every element (worst in {worst[1]})", worst[2], worst[3])

    wt.lines.append("")
    wt.lines.append(f"{wt.passed}/{len(wt.checks)} checks passed")
    return wt


def _rmsnorm_explained(o: _Writer, x: list[float], w: list[float], eps: float, c: int, sym: str, out: str
                       ) -> float:
    n = len(x)
    ss, sq = 0.0, []
    for v in x:
        ss += v * v
        sq.append(f"{o.n(v)}²")
    ms = ss / n
    rms = math.sqrt(ms + eps)
    o.say(f"ms = ({' + '.join(sq)}) / {n} = {o.r(ms)}")
    o.say(f"rms = sqrt(ms + eps) = sqrt({o.r(ms)} + {eps:g}) = {o.r(rms)}")
    y = x[c] / rms * w[c]
    o.say(f"{out}[{c}] = {sym}{c} / rms · weight[{c}] = {o.n(x[c])} / {o.r(rms)} · {o.n(w[c])} = {o.r(y)}")
    return y


def _dot_explained(o: _Writer, a: list[float], b: list[float], out: str) -> float:
    acc, terms = 0.0, []
    for u, v in zip(a, b, strict=True):
        acc += u * v
        terms.append(f"{o.n(u)}·{o.n(v)}")
    o.say(f"{out} = {' + '.join(terms)} = {o.r(acc)}")
    return acc


def _bias(o: _Writer, W: dict, name: str, row: int, acc: float, out: str) -> float:
    """Add the projection's bias (attention_bias models) and say so."""
    if name not in W:
        return acc
    b = W[name][row]
    o.say(f"{out} + bias[{row}] = {o.r(acc)} + {o.n(b)} = {o.r(acc + b)}")
    return acc + b


def _numpy_scores(cfg, taps: dict, layer: int) -> np.ndarray:
    """q_rot·k_rot^T / sqrt(Dh) [Hq, T, S] from the oracle's taps (vectorised; the mask is not applied)."""
    q = np.asarray(taps[f"layers.{layer}.q_rot"], dtype=np.float64)
    k = np.asarray(taps[f"layers.{layer}.k_rot"], dtype=np.float64)
    k = k[:, np.arange(cfg.num_attention_heads) // cfg.n_rep]  # [S, Hq, Dh]
    return np.einsum("thd,shd->hts", q, k) / math.sqrt(cfg.head_dim)


def _moe_explained(o: _Writer, cfg, W, p: str, L: str, t: int, c: int, mlp_in: list[float], taps) -> float:
    E, K = cfg.num_experts, cfg.num_experts_per_tok
    o.head(f"11. MoE router: logits over {E} experts, softmax, top-{K}"
           + (", renormalised to sum 1" if cfg.norm_topk_prob else ""))
    router = []
    for e in range(E):
        router.append(_dot_explained(o, mlp_in, W[p + "mlp.gate.weight"][e], f"router_logits[{t},{e}]"))
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
        d = _dot_explained(o, act, W[q + "down_proj.weight"][c], f"expert {e} down[{c}]")
        total += we * d
        o.say(f"+ {o.r(we)} · {o.r(d)}  (running sum {o.r(total)})")
    o.say(f"mlp_out[{t},{c}] = {o.r(total)}")
    return total
