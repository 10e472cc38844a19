"""The NumPy oracle: Qwen3 / Qwen3-MoE as plain functions over the checkpoint's weights dict.

Slow on purpose where speed would cost clarity, and obviously correct:
- float64 by default (float32 on request); attention and router softmax always in float64;
- one sequence, whole-sequence forward; KV-cache "decode" is a full recompute sliced per step;
- GQA by group: query head h reads key/value head h // n_rep (the repetition is written out);
- q_norm / k_norm are per-head RMSNorms over head_dim, applied BEFORE RoPE;
- RoPE rotates half-split pairs (channel j with j + Dh/2); YaRN's scale is already in cos/sin;
- MoE: softmax over router logits, top-k, renormalise if norm_topk_prob, experts looped one by one;
- every DESIGN.md tap site goes through `tap()` and the returned value is what flows on (graft);
  attention probs are always computed (it is NumPy) but kept only when a recorder asks for them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .. import taps as _taps
from ..config import Qwen3Config
from ..errors import InputError, WeightsError
from ..rope import cos_sin
from ..shapes import expected_shapes
from ..taps import tap
from .base import RunResult, check_input_ids

DTYPES = {"float64": np.float64, "float32": np.float32}


# ---- the ops ---------------------------------------------------------------------------------------
def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x * 1/sqrt(mean(x^2) + eps) * weight, over the last axis."""
    ms = np.mean(x * x, axis=-1, keepdims=True)
    return x * (1.0 / np.sqrt(ms + eps)).astype(x.dtype) * weight


def rotate_half(x: np.ndarray) -> np.ndarray:
    """[x1, x2] -> [-x2, x1] on the last axis (half-split pairs: channel j pairs with j + Dh/2)."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [T, H, Dh] rotated by the angles of its token's position; cos/sin [T, Dh] from rope.cos_sin."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


def softmax64(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax in float64 whatever the input dtype (masked entries are -inf and come out 0). NaN or all -inf
    rows give NaN without a warning: tiny's stability checks feed it broken values on purpose and report them."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(x - np.max(x, axis=axis, keepdims=True))
        return e / np.sum(e, axis=axis, keepdims=True)


def kv_head_of(Hq: int, Hkv: int) -> np.ndarray:
    """[Hq]: the key/value head each query head reads (GQA: query head h uses kv head h // (Hq // Hkv))."""
    return np.arange(Hq) // (Hq // Hkv)


def gqa_scores(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Scaled attention scores q·k / sqrt(Dh), unmasked. q [T, Hq, Dh], k [S, Hkv, Dh] -> [Hq, T, S]."""
    T, Hq, Dh = q.shape
    k_h = k[:, kv_head_of(Hq, k.shape[1])]  # [S, Hq, Dh]: each query head's key head
    return np.einsum("thd,shd->hts", q, k_h) * (1.0 / np.sqrt(Dh))


def topk_weights(probs: np.ndarray, idx, cfg: Qwen3Config) -> np.ndarray:
    """Router probabilities [T, E] at the chosen experts idx [T, K], renormalised to sum 1 when
    cfg.norm_topk_prob (Qwen3-MoE's default): the MoE block's expert weights [T, K]."""
    w = np.take_along_axis(probs, np.asarray(idx, dtype=np.int64), axis=-1)  # [T, K]
    return w / np.sum(w, axis=-1, keepdims=True) if cfg.norm_topk_prob else w


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """x @ weight.T (+ bias): weights are stored [out, in] as in the checkpoint."""
    y = x @ weight.T
    return y if bias is None else y + bias


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, k_pos: np.ndarray,
              name: str | None = None) -> np.ndarray:
    """Causal GQA attention. q [T, Hq, Dh], k/v [S, Hkv, Dh] -> [T, Hq, Dh].

    Query head h uses key/value head h // n_rep; a query at position p sees keys at positions <= p;
    scores are scaled by 1/sqrt(head_dim). `name` (e.g. "layers.3") taps the probs [Hq, T, S].
    """
    T, Hq, Dh = q.shape
    v_h = v[:, kv_head_of(Hq, v.shape[1])]  # [S, Hq, Dh]
    scores = gqa_scores(q, k)  # [Hq, T, S]
    allowed = k_pos[None, :] <= q_pos[:, None]  # [T, S]
    scores = np.where(allowed[None], scores, -np.inf)
    probs = softmax64(scores).astype(q.dtype)  # [Hq, T, S]
    if name is not None:
        probs = tap(f"{name}.probs", probs)
    return np.einsum("hts,shd->thd", probs, v_h)  # [T, Hq, Dh]


def _t(prefix: str | None, site: str, x):
    """Tap x at f"{prefix}.{site}" when a prefix is given (experts inside a MoE block are not tap sites)."""
    return x if prefix is None else tap(f"{prefix}.{site}", x)


def mlp(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray,
        name: str | None = None) -> np.ndarray:
    """SwiGLU: down(silu(gate(x)) * up(x)). x [T, D] -> [T, D]; taps gate/up/act when named."""
    gate = _t(name, "gate", linear(x, w_gate))  # [T, I]
    up = _t(name, "up", linear(x, w_up))  # [T, I]
    act = _t(name, "act", silu(gate) * up)  # [T, I]
    return linear(act, w_down)


def moe(x: np.ndarray, w: Mapping[str, np.ndarray], p: str, cfg: Qwen3Config, name: str | None = None
        ) -> np.ndarray:
    """Sparse MoE block. x [T, D] -> [T, D]. `p` is the layer's weight prefix "model.layers.{i}."."""
    T, D = x.shape
    E, K = cfg.num_experts, cfg.num_experts_per_tok
    logits = _t(name, "router_logits", linear(x, w[p + "mlp.gate.weight"]))  # [T, E]
    probs = softmax64(logits)  # [T, E] float64
    # Highest K probabilities, best first (stable: on an exact tie the lower expert id wins).
    idx = np.argsort(-probs, axis=-1, kind="stable")[:, :K]  # [T, K]
    # Weights are gathered at the (possibly grafted) chosen experts, so grafting topk_idx alone stays consistent.
    idx = _t(name, "topk_idx", idx)
    topw = _t(name, "topk_weight", topk_weights(probs, idx, cfg).astype(x.dtype))
    out = np.zeros_like(x)  # [T, D]
    for e in range(E):
        rows, slot = np.nonzero(idx == e)  # tokens routed to expert e, and where e sits in their top-k
        if rows.size == 0:
            continue
        q = f"{p}mlp.experts.{e}."
        y = mlp(x[rows], w[q + "gate_proj.weight"], w[q + "up_proj.weight"], w[q + "down_proj.weight"])
        out[rows] += y * topw[rows, slot][:, None]  # a token picks an expert at most once: rows are unique
    return out


def decoder_layer(x: np.ndarray, w: Mapping[str, np.ndarray], cfg: Qwen3Config, i: int,
                  cos: np.ndarray, sin: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """One Qwen3 decoder layer over the whole sequence. x [T, D] -> [T, D]."""
    T, D = x.shape
    Hq, Hkv, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    eps = cfg.rms_norm_eps
    p, n = f"model.layers.{i}.", f"layers.{i}"
    a = p + "self_attn."

    h = tap(f"{n}.attn_in", rms_norm(x, w[p + "input_layernorm.weight"], eps))  # [T, D]
    q = tap(f"{n}.q", linear(h, w[a + "q_proj.weight"], w.get(a + "q_proj.bias")).reshape(T, Hq, Dh))
    k = tap(f"{n}.k", linear(h, w[a + "k_proj.weight"], w.get(a + "k_proj.bias")).reshape(T, Hkv, Dh))
    v = tap(f"{n}.v", linear(h, w[a + "v_proj.weight"], w.get(a + "v_proj.bias")).reshape(T, Hkv, Dh))
    q = tap(f"{n}.q_norm", rms_norm(q, w[a + "q_norm.weight"], eps))  # per head, over Dh
    k = tap(f"{n}.k_norm", rms_norm(k, w[a + "k_norm.weight"], eps))
    q = tap(f"{n}.q_rot", rope(q, cos, sin))
    k = tap(f"{n}.k_rot", rope(k, cos, sin))
    o = tap(f"{n}.attn", attention(q, k, v, positions, positions, name=n))  # [T, Hq, Dh]
    o = tap(f"{n}.attn_out", linear(o.reshape(T, Hq * Dh), w[a + "o_proj.weight"], w.get(a + "o_proj.bias")))
    x = tap(f"{n}.resid_mid", x + o)  # [T, D]

    h = tap(f"{n}.mlp_in", rms_norm(x, w[p + "post_attention_layernorm.weight"], eps))
    if cfg.is_moe_layer(i):
        m = moe(h, w, p, cfg, name=n)
    else:
        m = mlp(h, w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"], w[p + "mlp.down_proj.weight"], name=n)
    m = tap(f"{n}.mlp_out", m)
    return tap(f"{n}.resid_post", x + m)


def lm_head_weight(w: Mapping[str, np.ndarray], cfg: Qwen3Config) -> np.ndarray:
    if "lm_head.weight" in w:
        return w["lm_head.weight"]
    if cfg.tie_word_embeddings:
        return w["model.embed_tokens.weight"]
    raise WeightsError("missing tensor 'lm_head.weight' (tie_word_embeddings is false)")


def forward(weights: Mapping[str, np.ndarray], cfg: Qwen3Config, input_ids, positions=None) -> np.ndarray:
    """Logits [T, V] for one sequence, computed in the dtype of the weights (float64 or float32)."""
    ids = np.asarray(input_ids, dtype=np.int64)
    T = ids.shape[0]
    positions = np.arange(T) if positions is None else np.asarray(positions, dtype=np.int64)
    embed = weights["model.embed_tokens.weight"]
    cos, sin = (t.astype(embed.dtype) for t in cos_sin(cfg, positions))  # [T, Dh] each

    x = tap("embed", embed[ids])  # [T, D]
    for i in range(cfg.num_hidden_layers):
        x = decoder_layer(x, weights, cfg, i, cos, sin, positions)
    x = tap("final_norm", rms_norm(x, weights["model.norm.weight"], cfg.rms_norm_eps))
    return tap("logits", linear(x, lm_head_weight(weights, cfg)))  # [T, V]


# ---- the backend -----------------------------------------------------------------------------------
def _as_numpy(x, dtype) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x.astype(dtype, copy=False)
    import torch  # the oracle is NumPy: torch (a second to import) only when handed a tensor

    if isinstance(x, torch.Tensor):
        t = x.detach().to("cpu")
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()  # exact; NumPy has no bfloat16
        return t.numpy().astype(dtype, copy=False)
    return np.asarray(x, dtype=dtype)


class NumpyBackend:
    """The float64 oracle as a backend: `.run(input_ids, taps=None, graft=None) -> RunResult`."""

    name = "numpy"

    def __init__(self, weights_np: Mapping, cfg: Qwen3Config, dtype: str = "float64"):
        if dtype not in DTYPES:
            raise InputError(f"numpy backend dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
        self.cfg, self.dtype = cfg, dtype
        np_dtype = DTYPES[dtype]
        converted: dict[int, np.ndarray] = {}  # id(source) -> array, so a tied lm_head is converted once
        self.weights: dict[str, np.ndarray] = {}
        for k, v in weights_np.items():
            if id(v) not in converted:
                converted[id(v)] = _as_numpy(v, np_dtype)
            self.weights[k] = converted[id(v)]
        self._check_weights()

    def _check_weights(self) -> None:
        for k, shape in expected_shapes(self.cfg).items():
            if k not in self.weights:
                raise WeightsError(f"numpy backend: missing tensor {k!r} (expected shape {list(shape)})")
            if tuple(self.weights[k].shape) != shape:
                raise WeightsError(f"numpy backend: tensor {k!r} has shape {list(self.weights[k].shape)}, "
                                   f"expected {list(shape)}")
        lm_head_weight(self.weights, self.cfg)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str = "float64") -> NumpyBackend:
        import torch  # the checkpoint loader is torch's (safetensors, checks): only when reading a checkpoint

        from ..weights import load_weights

        if dtype not in DTYPES:
            raise InputError(f"numpy backend dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
        cfg = Qwen3Config.from_file(path)
        w = load_weights(path, cfg, dtype=getattr(torch, dtype), device="cpu")
        return cls(w, cfg, dtype=dtype)

    def _session(self, names, graft):
        if graft is not None:
            return _taps.graft(graft, names=names)
        if names is not None:
            return _taps.record(names)
        return None

    def run(self, input_ids, taps=None, graft=None) -> RunResult:
        """Logits [T, V] and the selected taps (None: no taps; "all"; or names/patterns). With `graft`
        (reference taps), each op consumes the reference's input; all taps are recorded unless `taps` says."""
        ids = check_input_ids(input_ids, self.cfg)
        session = self._session(taps, graft)
        if session is None:
            return RunResult(forward(self.weights, self.cfg, ids))
        with session as rec:
            logits = forward(self.weights, self.cfg, ids)
        return RunResult(logits, rec.taps)

    def run_decode(self, input_ids, decode_steps: int, taps=None, graft=None) -> RunResult:
        """What a KV-cache run of prefill + `decode_steps` single-token steps records, by full recompute.

        Prefill taps cover the first P = T - decode_steps tokens (probs [Hq, P, P]); step j (0-based) is the
        token at position P + j, its taps prefixed `step{j}.` with a leading 1 (probs [Hq, 1, P + j + 1]).
        A graft dict in that same layout is stitched back into whole-sequence taps first.
        """
        ids = check_input_ids(input_ids, self.cfg)
        T = ids.shape[0]
        if isinstance(decode_steps, bool) or not isinstance(decode_steps, int) or not 0 <= decode_steps < T:
            raise InputError(f"decode_steps must be an integer in 0..{T - 1} (one prefill token at least) "
                             f"for {T} input ids, got {decode_steps!r}")
        P = T - decode_steps
        whole_graft = None if graft is None else _stitch(graft, P, decode_steps)
        names = taps if taps is not None else (None if graft is None else "all")
        if names is None:
            return self.run(ids)
        # Record with the same selection, applied to the per-step names afterwards.
        wanted = _taps.record(names)
        full = self.run(ids, taps=_unstepped(names), graft=whole_graft)
        return RunResult(full.logits, _taps.split_steps(full.taps, P, decode_steps, keep=wanted.selects))


def _unstepped(names):
    """A tap selection with any `step{j}.` prefixes dropped (the full recompute has no steps)."""
    if names in (None, "all"):
        return names
    names = [names] if isinstance(names, str) else list(names)
    return [re.sub(r"^step[^.]*\.", "", n) for n in names]


def _stitch(graft: Mapping[str, np.ndarray], P: int, steps: int) -> dict[str, np.ndarray]:
    """Prefill + per-step reference taps -> whole-sequence taps (only sites present for every piece)."""
    out: dict[str, np.ndarray] = {}
    for name, prefill in graft.items():
        if _taps.split_name(name)[0] is not None:
            continue
        pieces = [np.asarray(prefill)] + [graft.get(f"step{j}.{name}") for j in range(steps)]
        if any(p is None for p in pieces):
            continue
        pieces = [np.asarray(p) for p in pieces]
        if _taps.split_name(name)[2] == "probs":
            Hq, T = pieces[0].shape[0], P + steps
            full = np.zeros((Hq, T, T), dtype=pieces[0].dtype)
            full[:, :P, :P] = pieces[0]
            for j, p in enumerate(pieces[1:]):
                full[:, P + j, : P + j + 1] = p.reshape(Hq, P + j + 1)
            out[name] = full
        else:
            out[name] = np.concatenate(pieces, axis=0)
    return out
