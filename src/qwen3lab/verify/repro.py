"""`--repro DIR`: the first failing op as a standalone NumPy reproduction.

For the culprit (else the first divergence), DIR gets `repro.npz` (the reference's inputs to the op, its weight
or tables, the reference's output = expected, the candidate's output) and `repro.py`, a script with the op's
formula that needs only NumPy: it recomputes the expected output from the inputs (proving the formula) and
prints how far the candidate's output is from it. Ops covered, prefill taps: the projections (q, k, v,
attn_out, gate, up, a dense mlp_out, router_logits, logits), the RMSNorms (attn_in, mlp_in, q_norm, k_norm,
final_norm), RoPE (q_rot, k_rot: with the cos / sin tables of the model's positions, YaRN included), attention
(probs, attn: causal, GQA, scaled by 1/sqrt(head_dim)) and silu(gate) * up (act); for another tap the report
says so and nothing is written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..taps import split_name
from .report import VerifyReport

SCRIPT = '''"""Reproduce {name}: {what}. Needs only NumPy: python repro.py"""
import numpy as np

d = np.load("repro.npz")
want, got = d["expected"], d["candidate"]


def rmsnorm(x, w, eps={eps!r}):
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, cos, sin):  # x [T, H, Dh]; channel j turns with channel j + Dh/2 by its position's angle
    x = x.astype(np.float64)
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


def probs(q, k):  # q [T, Hq, Dh], k [T, Hkv, Dh] -> [Hq, T, T]: causal softmax of q.k / sqrt(Dh), GQA
    q, k = q.astype(np.float64), k.astype(np.float64)
    T, Hq, Dh = q.shape
    kh = k[:, np.arange(Hq) // (Hq // k.shape[1])]
    s = np.einsum("thd,shd->hts", q, kh) / np.sqrt(Dh)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def attend(q, k, v):  # -> [T, Hq, Dh]
    p = probs(q, k)
    vh = v.astype(np.float64)[:, np.arange(q.shape[1]) // (q.shape[1] // v.shape[1])]
    return np.einsum("hts,shd->thd", p, vh)


def silu_mul(g, u):
    g = g.astype(np.float64)
    return g / (1 + np.exp(-g)) * u


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-300))


y = ({formula}).reshape(want.shape)
print("formula vs the reference's output (should be ~1e-15):", rel(y, want))
print("candidate vs the reference's output:", rel(got, want))
'''

LIN = "d['x'].reshape(d['x'].shape[0], -1).astype(np.float64) @ d['w'].T"
NORM = "rmsnorm(d['x'], d['w'])"


def _op(cfg, name: str):
    """(inputs {npz key: tap}, weight name or None, formula, what) of the op that makes tap `name`, or None."""
    _, i, site = split_name(name)
    p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
    L = f"layers.{i}."
    table = {
        "q": ({"x": L + "attn_in"}, a + "q_proj.weight", LIN), "k": ({"x": L + "attn_in"}, a + "k_proj.weight", LIN),
        "v": ({"x": L + "attn_in"}, a + "v_proj.weight", LIN),
        "attn_out": ({"x": L + "attn"}, a + "o_proj.weight", LIN),
        "gate": ({"x": L + "mlp_in"}, p + "mlp.gate_proj.weight", LIN),
        "up": ({"x": L + "mlp_in"}, p + "mlp.up_proj.weight", LIN),
        "router_logits": ({"x": L + "mlp_in"}, p + "mlp.gate.weight", LIN),
        "attn_in": ({"x": "embed" if i == 0 else f"layers.{(i or 0) - 1}.resid_post"}, p + "input_layernorm.weight",
                    NORM),
        "mlp_in": ({"x": L + "resid_mid"}, p + "post_attention_layernorm.weight", NORM),
        "q_norm": ({"x": L + "q"}, a + "q_norm.weight", NORM), "k_norm": ({"x": L + "k"}, a + "k_norm.weight", NORM),
        "q_rot": ({"x": L + "q_norm"}, None, "rope(d['x'], d['cos'], d['sin'])"),
        "k_rot": ({"x": L + "k_norm"}, None, "rope(d['x'], d['cos'], d['sin'])"),
        "probs": ({"q": L + "q_rot", "k": L + "k_rot"}, None, "probs(d['q'], d['k'])"),
        "attn": ({"q": L + "q_rot", "k": L + "k_rot", "v": L + "v"}, None, "attend(d['q'], d['k'], d['v'])"),
        "act": ({"g": L + "gate", "u": L + "up"}, None, "silu_mul(d['g'], d['u'])"),
    }
    if i is not None and not cfg.is_moe_layer(i):
        table["mlp_out"] = ({"x": L + "act"}, p + "mlp.down_proj.weight", LIN)
    last = f"layers.{cfg.num_hidden_layers - 1}.resid_post"
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    top = {"final_norm": ({"x": last}, "model.norm.weight", NORM), "logits": ({"x": "final_norm"}, head, LIN)}
    got = top.get(site) if i is None else table.get(site)
    if got is None:
        return None
    what = {LIN: "x @ W.T", NORM: "RMSNorm"}.get(got[2], got[2].split("(")[0])
    return (*got, what)


def write_repro(rep: VerifyReport, out: Path, model_path) -> str:
    """Write DIR/repro.npz and DIR/repro.py for the first failing op; a sentence saying what was written."""
    from ..models.numpy_ref import NumpyBackend  # here: loads the checkpoint only when --repro is asked for
    from ..rope import cos_sin

    arrays = rep.culprit_arrays or rep.divergence_arrays
    if arrays is None:
        return "--repro: nothing failed, nothing to reproduce"
    name, cand, _ = arrays
    op = None if split_name(name)[0] is not None else _op(rep.cfg, name)  # decode steps: not yet
    if op is None or model_path is None:
        return (f"--repro: {name}'s op has no standalone reproduction yet (prefill projections, RMSNorms, RoPE, "
                f"attention and silu*up do, with --model-path)")
    inputs, wname, formula, what = op
    ref = NumpyBackend.from_pretrained(model_path)
    ids = np.asarray(rep.input_ids, dtype=np.int64)
    taps = ref.run(ids, taps=[*inputs.values(), name]).taps
    data = {k: taps[t] for k, t in inputs.items()}
    if wname is not None:
        data["w"] = ref.weights[wname]
    if "rope(" in formula:
        data["cos"], data["sin"] = cos_sin(rep.cfg, np.arange(len(ids)))  # [T, Dh] each: the model's own angles
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "repro.npz", expected=taps[name], candidate=cand, **data)
    src = ", ".join(inputs.values()) + (f" with {wname}" if wname else "")
    (out / "repro.py").write_text(SCRIPT.format(name=name, what=f"{what} of {src}", eps=rep.cfg.rms_norm_eps,
                                                formula=formula))
    source = "the isolated run (its own op on the reference's input)" if rep.culprit_arrays else "the plain run"
    return f"--repro: wrote {out}/repro.npz and repro.py for {name} ({what}); the candidate's output is from {source}"
