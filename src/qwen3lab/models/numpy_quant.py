"""The fast path's weight formats (qwen3lab.fast.quant) written again in float64 NumPy: the oracle's side of
`verify --quantised-reference`.

A quantised candidate (torch-fast --dtype int8 / int4) differs from the float64 oracle by two things: the
format's rounding of every weight (large, by design: ~0.10 relative per matmul for int4 on random weights)
and its own arithmetic (kernels, activation dtype: what a port must get right). Running the oracle on weights
quantised and dequantised by the same rules leaves only the second, so the candidate can be held to its
activations' tolerance (bfloat16 for --dtype int4) and a kernel bug stands out instead of hiding in the noise.

Rules (the same as fast/linear.py, computed independently here):
- which tensors: every 2-D projection (q/k/v, o, gate/up, down, each expert's) and lm_head (a tied lm_head
  gets its own quantised copy: the embedding rows stay float); not the embedding, not the MoE router
  (`mlp.gate`), not the 1-D norms.
- int8: symmetric per output row: scale = max|w| / 127, q = round(w / scale) (half to even), |q| <= 127.
- int4: symmetric per group of `group_size` along the input dim (llama.cpp Q4_0's rule): m = the group's value
  of largest |w| (signed), scale = m / -8, q = clamp(round(w / scale), -8, 7); an all-zero group stays zero.
- scales are rounded to float32 (what the candidate stores) before dequantising: w' = q * scale.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..config import Qwen3Config
from ..errors import InputError

FORMATS = ("int8", "int4")


def quantised_names(weights: Mapping[str, np.ndarray]) -> list[str]:
    """The checkpoint names the format applies to (module docstring), lm_head excluded."""
    return [n for n, w in weights.items() if np.ndim(w) == 2 and n != "model.embed_tokens.weight"
            and n != "lm_head.weight" and not n.endswith(".mlp.gate.weight")]


def _int8(w: np.ndarray) -> np.ndarray:
    s = np.abs(w).max(axis=1, keepdims=True) / 127.0  # [N, 1]
    s = np.where(s > 0, s, 1.0).astype(np.float32).astype(np.float64)
    q = np.clip(np.round(w / s), -127, 127)
    return q * s


def _int4(w: np.ndarray, group_size: int) -> np.ndarray:
    N, K = w.shape
    if K % group_size:
        raise InputError(f"int4 group size {group_size} does not divide K = {K} (weight of shape [{N}, {K}])")
    g = w.reshape(N, K // group_size, group_size)  # [N, groups, G]
    idx = np.abs(g).argmax(axis=2)[..., None]  # the first of equal |w|, as torch's argmax
    m = np.take_along_axis(g, idx, axis=2)  # [N, groups, 1] signed
    s = (m / -8.0).astype(np.float32).astype(np.float64)
    s = np.where(s != 0, s, 1.0)
    q = np.clip(np.round(g / s), -8, 7)
    return (q * s).reshape(N, K)


def quantise_weights(weights: Mapping[str, np.ndarray], cfg: Qwen3Config, fmt: str,
                     group_size: int | None = None) -> dict[str, np.ndarray]:
    """A copy of the float64 weights with every projection (and lm_head) quantised and dequantised by `fmt`."""
    if fmt not in FORMATS:
        raise InputError(f"no NumPy rule for weight format {fmt!r}; one of {', '.join(FORMATS)}")
    if fmt == "int4" and group_size is None:
        raise InputError("int4 needs its group size")
    rule = _int8 if fmt == "int8" else (lambda w: _int4(w, group_size))
    out = dict(weights)
    for name in quantised_names(weights):
        out[name] = rule(np.asarray(weights[name], dtype=np.float64))
    head = weights.get("lm_head.weight") if not cfg.tie_word_embeddings else None
    if head is None:
        head = weights["model.embed_tokens.weight"]
    out["lm_head.weight"] = rule(np.asarray(head, dtype=np.float64))
    return out


def q8_0(x: np.ndarray, block: int = 32) -> np.ndarray:
    """ggml's q8_0 applied and undone along the last dim (blocks of `block`: d = max|x| / 127 in float32,
    q = round(x / d)), for weights and for the activations ggml's CPU dot products quantise. An emulation of the
    format for calibrating and testing verify's q8_0 tolerance, not a GGUF reader."""
    g = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)  # [..., nblocks, block]
    d = np.abs(g).max(axis=-1, keepdims=True) / 127.0
    d = np.where(d > 0, d, 1.0).astype(np.float32)
    return (np.round(g / d) * d).reshape(x.shape)
