"""Clean-run errors of ggml block formats (q8_0, q4_0, q4_k) against the float64 oracle: verify's tolerances.

A port running block-quantised weights (llama.cpp, GGUF) is compared with the float64 oracle on the original
weights, so a clean run's error is the format's rounding loss. This measures it with NumPy emulations of the
formats (weights quantised in blocks along the input dim, and the activations of every matmul quantised the way
ggml's CPU dot products quantise them), runs the oracle's code in float32 on them, and prints the worst relative
error and 1 - cosine over every tap, plus the same for two real bugs (ffn_down x1.1, q_norm weight -> 1) on the
clean format, so a threshold can sit between the two.

Emulations (ggml's block layouts, scales kept in float32, not their 16-bit storage):
- q8_0: blocks of 32, d = max|w| / 127, q = round(w / d); activations q8_0 too (ggml_vec_dot_q8_0_q8_0);
- q4_0: blocks of 32, d = w[argmax |w|] / -8, q = clip(round(w / d), -8, 7); activations q8_0;
- q4_k: approximated as 4-bit blocks of 32 with a scale and a min (q4_k's sub-blocks, without the 6-bit
  quantisation of the scales and mins); activations 8-bit in blocks of 256 (q8_K).

    .venv/bin/python benchmarks/calibrate_block_formats.py [--layers 4] [--tokens 16]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from qwen3lab.make_model import make_model
from qwen3lab.models import numpy_ref
from qwen3lab.models.numpy_quant import q8_0, quantised_names
from qwen3lab.models.numpy_ref import NumpyBackend
from qwen3lab.verify.metrics import compare_arrays


def blocks(w: np.ndarray, b: int) -> np.ndarray:
    return w.reshape(*w.shape[:-1], w.shape[-1] // b, b)  # [..., nblocks, b]


def q8(w: np.ndarray, b: int = 32) -> np.ndarray:
    return q8_0(w, b)


def q4_0(w: np.ndarray) -> np.ndarray:
    g = blocks(w, 32)
    m = np.take_along_axis(g, np.abs(g).argmax(axis=-1)[..., None], axis=-1)
    d = np.where(m != 0, m / -8.0, 1.0).astype(np.float32)
    return (np.clip(np.round(g / d), -8, 7) * d).reshape(w.shape)


def q4_k(w: np.ndarray) -> np.ndarray:
    g = blocks(w, 32)
    lo, hi = g.min(axis=-1, keepdims=True), g.max(axis=-1, keepdims=True)
    d = np.where(hi > lo, (hi - lo) / 15.0, 1.0).astype(np.float32)
    return (np.clip(np.round((g - lo) / d), 0, 15) * d + lo).reshape(w.shape)


FORMATS = {"q8_0": (q8, 32), "q4_0": (q4_0, 32), "q4_k": (q4_k, 256)}


def run(model: Path, ids, fmt: str | None, bug=None) -> dict[str, np.ndarray]:
    b = NumpyBackend.from_pretrained(model, dtype="float32")
    if fmt is not None:
        wq, act_block = FORMATS[fmt]
        for n in quantised_names(b.weights):
            b.weights[n] = wq(b.weights[n].astype(np.float64)).astype(np.float32)
    if bug is not None:
        bug(b.weights)
    orig = numpy_ref.linear

    def linear(x, w, bias=None):  # activations quantised as ggml's dot products do
        return orig(q8(x, act_block).astype(x.dtype) if fmt and x.shape[-1] % act_block == 0 else x, w, bias)

    numpy_ref.linear = linear
    try:
        return b.run(ids, taps="all").taps
    finally:
        numpy_ref.linear = orig


def worst(taps, ref) -> tuple[float, float, str]:
    rel, cos, at = 0.0, 0.0, ""
    for k, v in taps.items():
        if k.endswith("topk_idx"):
            continue
        m = compare_arrays(v, ref[k], ("token",) * np.ndim(v))
        if m.relative_error > rel:
            rel, at = m.relative_error, k
        cos = max(cos, 1 - m.cosine_similarity)
    return rel, cos, at


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp) / "m", preset="qwen3-0.6b", layers=a.layers, vocab_size=4096, seed=1)
        ids = rng.integers(0, 4096, a.tokens).tolist()
        ref = NumpyBackend.from_pretrained(model).run(ids, taps="all").taps
        down = lambda w: w.__setitem__("model.layers.1.mlp.down_proj.weight",  # noqa: E731
                                       w["model.layers.1.mlp.down_proj.weight"] * 1.1)
        qn = lambda w: w["model.layers.0.self_attn.q_norm.weight"].__setitem__(slice(None), 1.0)  # noqa: E731
        print(f"qwen3-0.6b shapes, {a.layers} layers, {a.tokens} random tokens; worst tap against float64")
        for fmt in FORMATS:
            for label, bug in (("clean", None), ("ffn_down x1.1", down), ("q_norm -> 1", qn)):
                rel, cos, at = worst(run(model, ids, fmt, bug), ref)
                print(f"{fmt:5s} {label:14s} rel {rel:.4f}  1-cos {cos:.2e}  at {at}")


if __name__ == "__main__":
    main()
