"""Logits of each fast path's fused forward (what generation runs, no taps) against the float64 oracle.

    python benchmarks/accuracy_fast.py --model DIR [--text "..."] [--margins 0.05,0.2]

For one prompt (default: a 75-token English paragraph, so the prefill takes the many-row GEMM), each path's
logits at every position are compared with the NumPy float64 oracle's: cosine (min / mean over positions),
top-1 agreement over all positions, and top-1 agreement where the oracle has a clear winner (its top-1 logit
ahead of the second by more than each `--margins` value: on random weights many positions are near ties that
any rounding can flip). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import qwen3lab
from qwen3lab.fast import tune
from qwen3lab.tokenizer import Tokenizer

TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based ink and a wooden press adapted from those used to make wine. Within a few "
        "decades, printing shops had spread to more than two hundred cities across Europe, and the cost of books "
        "fell so quickly that reading stopped being a privilege of the clergy and the rich.")
PATHS = [("fp32 fast", "torch-fast", "float32"), ("bf16 fast", "torch-fast", "bfloat16"),
         ("bf16 eager", "torch", "bfloat16"), ("int8 fast", "torch-fast", "int8"), ("int4 fast", "torch-fast", "int4")]


def agreement(ref: np.ndarray, got: np.ndarray, margins: list[float]) -> dict:
    """Cosine and top-1 agreement of got [T, V] with ref [T, V]; top-1 also where ref's margin > each margin."""
    got = np.asarray(got, dtype=np.float64)
    cos = (ref * got).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(got, axis=-1)  # [T]
    same = ref.argmax(-1) == got.argmax(-1)  # [T]
    top2 = np.sort(ref, axis=-1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]  # [T] oracle's top-1 lead
    return {"cos_min": float(cos.min()), "cos_mean": float(cos.mean()), "top1": float(same.mean()),
            "top1_clear": {str(m): [int(same[gap > m].sum()), int((gap > m).sum())] for m in margins}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint dir (qwen3lab make-model DIR --preset qwen3-0.6b)")
    ap.add_argument("--text", default=TEXT)
    ap.add_argument("--margins", default="0.05,0.2", help="oracle top-1 leads that count as a clear winner")
    a = ap.parse_args()
    margins = [float(m) for m in a.margins.split(",")]
    ids = Tokenizer.from_dir(a.model).encode(a.text)
    ref = np.asarray(qwen3lab.load(a.model, backend="numpy").run(ids).logits, dtype=np.float64)  # [T, V]
    rows = {}
    for name, backend, dtype in PATHS:
        rows[name] = agreement(ref, qwen3lab.load(a.model, backend=backend, dtype=dtype).run(ids).logits, margins)
    print(f"{len(ids)} tokens; {tune.status() or 'prefill GEMM: not used'}")
    heads = " | ".join(f"top-1, lead > {m}" for m in margins)
    print(f"| path | logit cosine min / mean | top-1 | {heads} |")
    print("|---|---|---|" + "---|" * len(margins))
    for name, r in rows.items():
        clear = " | ".join(f"{r['top1_clear'][str(m)][0]}/{r['top1_clear'][str(m)][1]}" for m in margins)
        print(f"| {name} | {r['cos_min']:.5f} / {r['cos_mean']:.5f} | {100 * r['top1']:.1f} % | {clear} |")
    print(json.dumps({"bench": "accuracy_fast", "model": a.model, "tokens": len(ids), "results": rows}))


if __name__ == "__main__":
    main()
