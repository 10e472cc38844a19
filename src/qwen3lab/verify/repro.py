"""`--repro DIR`: the first failing op as a standalone NumPy reproduction.

For the culprit (else the first divergence), DIR gets `repro.npz` (the reference's input to the op, the op's
weight, the reference's output = expected, the candidate's output) and `repro.py`, a script with the op's
formula that needs only NumPy: it recomputes the expected output from the input and weight (proving the
formula) and prints how far the candidate's output is from it. Ops covered: the projections (q, k, v,
attn_out, gate, up, a dense mlp_out, router_logits, logits) and the RMSNorms (attn_in, mlp_in, q_norm,
k_norm, final_norm); for another tap the report says so and nothing is written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..taps import split_name
from .report import VerifyReport

SCRIPT = '''"""Reproduce {name}: {what}. Needs only NumPy: python repro.py"""
import numpy as np

d = np.load("repro.npz")
x, w, want, got = d["input"], d["weight"], d["expected"], d["candidate"]


def rmsnorm(x, w, eps={eps!r}):
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-300))


y = ({formula}).reshape(want.shape)
print("formula vs the reference's output (should be ~1e-15):", rel(y, want))
print("candidate vs the reference's output:", rel(got, want))
'''


def _op(cfg, name: str):
    """(input tap, weight name, formula, what) of the op that makes tap `name`, or None."""
    _, i, site = split_name(name)
    p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
    lin = "x.reshape(x.shape[0], -1).astype(np.float64) @ w.T"
    norm = "rmsnorm(x, w)"
    table = {
        "q": (f"layers.{i}.attn_in", a + "q_proj.weight", lin), "k": (f"layers.{i}.attn_in", a + "k_proj.weight", lin),
        "v": (f"layers.{i}.attn_in", a + "v_proj.weight", lin),
        "attn_out": (f"layers.{i}.attn", a + "o_proj.weight", lin),
        "gate": (f"layers.{i}.mlp_in", p + "mlp.gate_proj.weight", lin),
        "up": (f"layers.{i}.mlp_in", p + "mlp.up_proj.weight", lin),
        "router_logits": (f"layers.{i}.mlp_in", p + "mlp.gate.weight", lin),
        "attn_in": ("embed" if i == 0 else f"layers.{(i or 0) - 1}.resid_post", p + "input_layernorm.weight", norm),
        "mlp_in": (f"layers.{i}.resid_mid", p + "post_attention_layernorm.weight", norm),
        "q_norm": (f"layers.{i}.q", a + "q_norm.weight", norm), "k_norm": (f"layers.{i}.k", a + "k_norm.weight", norm),
    }
    if i is not None and not cfg.is_moe_layer(i):
        table["mlp_out"] = (f"layers.{i}.act", p + "mlp.down_proj.weight", lin)
    last = f"layers.{cfg.num_hidden_layers - 1}.resid_post"
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    top = {"final_norm": (last, "model.norm.weight", norm), "logits": ("final_norm", head, lin)}
    got = top.get(site) if i is None else table.get(site)
    if got is None:
        return None
    return (*got, "RMSNorm" if got[2] == norm else "x @ W.T")


def write_repro(rep: VerifyReport, out: Path, model_path) -> str:
    """Write DIR/repro.npz and DIR/repro.py for the first failing op; a sentence saying what was written."""
    from ..models.numpy_ref import NumpyBackend  # here: loads the checkpoint only when --repro is asked for

    arrays = rep.culprit_arrays or rep.divergence_arrays
    if arrays is None:
        return "--repro: nothing failed, nothing to reproduce"
    name, cand, _ = arrays
    op = None if split_name(name)[0] is not None else _op(rep.cfg, name)  # decode steps: not yet
    if op is None or model_path is None:
        return (f"--repro: {name}'s op has no standalone reproduction yet (prefill projections and RMSNorms do, "
                f"with --model-path)")
    inp, wname, formula, what = op
    ref = NumpyBackend.from_pretrained(model_path)
    taps = ref.run(np.asarray(rep.input_ids, dtype=np.int64), taps=[inp, name]).taps
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "repro.npz", input=taps[inp], weight=ref.weights[wname], expected=taps[name], candidate=cand)
    (out / "repro.py").write_text(SCRIPT.format(name=name, what=f"{what} of {inp} with {wname}",
                                                eps=rep.cfg.rms_norm_eps, formula=formula))
    source = "the isolated run (its own op on the reference's input)" if rep.culprit_arrays else "the plain run"
    return f"--repro: wrote {out}/repro.npz and repro.py for {name} ({what}); the candidate's output is from {source}"
