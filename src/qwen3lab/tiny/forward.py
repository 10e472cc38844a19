"""The tiny model through the NumPy float64 oracle: every tap, attention probs, and the scores before softmax.

Attention scores before softmax are not a DESIGN.md tap (no backend materialises them on the fast path).
They are recomputed here from the oracle's own q_rot and k_rot as q_rot·k_rot^T / sqrt(Dh), causally
masked with -inf, and slotted in as `layers.i.scores` just before `layers.i.probs`; the stability check
then holds the recorded probs against softmax(scores), which exercises the model's softmax and mask.
"""

from __future__ import annotations

import numpy as np

from ..models.base import RunResult
from ..models.numpy_ref import NumpyBackend, gqa_scores
from ..taps import split_name, tap_sites


def oracle(cfg, weights: dict[str, np.ndarray], dtype: str = "float64"):
    return NumpyBackend(weights, cfg, dtype=dtype)


def run_all_taps(backend, input_ids: list[int]) -> RunResult:
    """Every tap of the model including the optional probs (asked for by name)."""
    return backend.run(input_ids, taps=tap_sites(backend.cfg, probs=True))


def attention_scores(cfg, q_rot: np.ndarray, k_rot: np.ndarray) -> np.ndarray:
    """[Hq, T, S] scaled scores with -inf above the causal diagonal. q_rot [T, Hq, Dh], k_rot [S, Hkv, Dh]."""
    T, S = q_rot.shape[0], k_rot.shape[0]
    scores = gqa_scores(np.asarray(q_rot, dtype=np.float64), np.asarray(k_rot, dtype=np.float64))  # [Hq, T, S]
    future = np.arange(S)[None, :] > (np.arange(T)[:, None] + S - T)  # [T, S]
    return np.where(future[None], -np.inf, scores)


def with_scores(cfg, taps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The taps in dataflow order with `layers.i.scores` inserted before each `layers.i.probs`."""
    out: dict[str, np.ndarray] = {}
    for name, arr in taps.items():
        step, layer, site = split_name(name)
        if site == "probs" and step is None:
            q, k = taps.get(f"layers.{layer}.q_rot"), taps.get(f"layers.{layer}.k_rot")
            if q is not None and k is not None:
                out[f"layers.{layer}.scores"] = attention_scores(cfg, q, k)
        out[name] = arr
    return out


def tiny_forward(cfg, weights: dict[str, np.ndarray], input_ids: list[int]) -> RunResult:
    """Oracle logits and every tap (probs and scores included), in dataflow order."""
    res = run_all_taps(oracle(cfg, weights), input_ids)
    return RunResult(res.logits, with_scores(cfg, res.taps))
