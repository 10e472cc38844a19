"""Our decode linear kernel against what PyTorch already ships for the same product, on this CPU.

    python benchmarks/bench_torch_candidates.py [--layers 28] [--rows 1,8] [--runs 5] [--no-compile]

One pass = 28 gate/up-shaped weights (6144 x 1024, Qwen3-0.6B's fused gate/up), each its own tensor so they
stream from memory as in a decode step. For M rows (tokens in the step) it times, median of --runs passes:
- bf16: ours `linear_small`; `F.linear` (oneDNN / ATen); oneDNN's prepacked linear
  (`mkldnn._reorder_linear_weight` + `mkldnn._linear_pointwise`, where the build has it); and torch.compile's
  CPU code generation (inductor, `freezing`) of the same F.linear (skipped with --no-compile: it compiles for
  about a minute);
- int8 (per-row scales): ours `linear_small` against `torch._weight_int8pack_mm` (bf16 activations);
- int4 (group-wise scales, --groups): ours `linear_q4` against `torch._weight_int4pack_mm_for_cpu` over the same
  q (`torch._convert_weight_to_int4pack_for_cpu`; zero points 0, scales in x's dtype as the op wants them),
  skipped with a line where this torch lacks the ops. GB/s counts our format's bytes (packed nibbles + float32
  scales) for both, so the column compares speeds.
Each candidate's output is checked against ours first (relative error printed) so a fast wrong answer cannot win.
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from bench_fast_kernels import _median_ms as median_ms  # the same timing loop (this folder is on sys.path)

from qwen3lab.fast.build import kernels, status
from qwen3lab.fast.linear import Int4Linear, unpack_int4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def onednn_prepacked(Ws: list[torch.Tensor], M: int):
    """oneDNN's prepacked bf16 linear, or None where this torch build lacks it."""
    try:
        packed = [torch.ops.mkldnn._reorder_linear_weight(W, M) for W in Ws]
        return lambda x, i: torch.ops.mkldnn._linear_pointwise(x, packed[i], None, "none", [], "")
    except (RuntimeError, AttributeError):
        return None


def compiled_linear():
    import torch._inductor.config as ic

    ic.freezing = True
    return torch.compile(lambda x, W: F.linear(x, W), dynamic=False)


def candidates(k, x, Ws, Q, S, M: int, comp):
    """{name: f(i) -> output for weight i}: the bf16 candidates and the int8 ones, for input x [M, 1024]."""
    bf16 = {"ours linear_small (bf16)": lambda i: k.linear_small(x, Ws[i], None),
            "F.linear (bf16)": lambda i: F.linear(x, Ws[i])}
    pk = onednn_prepacked(Ws, M)
    if pk is not None:
        bf16["oneDNN prepacked linear (bf16)"] = lambda i: pk(x, i)
    if comp is not None:
        bf16["torch.compile inductor (bf16)"] = lambda i: comp(x, Ws[i])
    int8 = {"ours linear_small (int8)": lambda i: k.linear_small(x, Q[i], S[i]),
            "torch._weight_int8pack_mm (int8)": lambda i: torch._weight_int8pack_mm(x, Q[i], S[i].bfloat16())}
    return bf16, int8


def torch_int4(lins: list[Int4Linear], dtype: torch.dtype):
    """f(x, i) through torch's CPU int4 matmul over the same q and scales, or None where this torch lacks it."""
    if not (hasattr(torch, "_convert_weight_to_int4pack_for_cpu") and hasattr(torch, "_weight_int4pack_mm_for_cpu")):
        return None
    packed, sz = [], []
    for lin in lins:
        packed.append(torch._convert_weight_to_int4pack_for_cpu(unpack_int4(lin.weight).int() + 8, 1))
        s = lin.scales.t()  # [K/G, N]; its dequantisation is (nibble - 8) * scale + zero, zero 0 here
        sz.append(torch.stack([s, torch.zeros_like(s)], dim=-1).to(dtype).contiguous())  # [K/G, N, 2]
    G = lins[0].group_size
    return lambda x, i: torch._weight_int4pack_mm_for_cpu(x, packed[i], G, sz[i])


def int4_candidates(k, x, lins: list[Int4Linear], has_int4: bool):
    """{name: f(i)}: ours linear_q4 first, then torch's int4 matmul where this torch has it."""
    G = lins[0].group_size
    out = {f"ours linear_q4 (int4 g{G})": lambda i: k.linear_q4(x, lins[i].weight, lins[i].scales, G)}
    t4 = torch_int4(lins, x.dtype) if has_int4 else None
    if t4 is not None:
        out[f"torch int4pack_mm (int4 g{G})"] = lambda i: t4(x, i)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--warmups", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--groups", default="128,32", help="int4 group sizes to time")
    a = ap.parse_args()
    k = kernels()
    if k is None:
        raise SystemExit(f"no kernels to time: {status()}")
    g = torch.Generator().manual_seed(0)
    Ws = [(torch.randn(6144, 1024, generator=g) * 0.02).bfloat16() for _ in range(a.layers)]
    Q, S = [], []
    for W in Ws:
        s = W.float().abs().amax(1) / 127
        Q.append(torch.round(W.float() / s[:, None]).to(torch.int8))
        S.append(s)
    bf16_bytes, int8_bytes = sum(W.numel() * 2 for W in Ws), sum(q.numel() for q in Q)
    Q4 = {G: [Int4Linear.from_float(W, G) for W in Ws] for G in (int(v) for v in a.groups.split(","))}
    has_int4 = torch_int4(Q4[next(iter(Q4))][:1], torch.bfloat16) is not None
    if not has_int4:
        print(f"int4: torch {torch.__version__} lacks _weight_int4pack_mm_for_cpu or "
              "_convert_weight_to_int4pack_for_cpu; timing ours alone")
    print(f"{a.layers} x [6144, 1024] weights; ours: {status()}; {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"{'M':>3} {'candidate':>34} {'ms/pass':>9} {'GB/s':>6} {'rel. error vs ours':>19}")
    out = []
    comp = None if a.no_compile else compiled_linear()
    with torch.inference_mode():
        for M in (int(r) for r in a.rows.split(",")):
            x = torch.randn(M, 1024, generator=g).bfloat16()
            cands, cands8 = candidates(k, x, Ws, Q, S, M, comp)
            want = [k.linear_small(x, W, None) for W in Ws]
            wants8 = [k.linear_small(x, q, s) for q, s in zip(Q, S, strict=True)]
            groups = [(cands, want, bf16_bytes), (cands8, wants8, int8_bytes)]
            for lins in Q4.values():
                c4 = int4_candidates(k, x, lins, has_int4)
                ref4 = [next(iter(c4.values()))(i) for i in range(2)]  # ours is first
                groups.append((c4, ref4, sum(lin.weight.numel() + 4 * lin.scales.numel() for lin in lins)))
            for group, ref, nbytes in groups:
                for name, f in group.items():
                    err = max(rel(f(i), ref[i]) for i in range(2))
                    ms = median_ms(lambda f=f: [f(i) for i in range(len(Ws))], a.warmups, a.runs)
                    print(f"{M:>3} {name:>34} {ms:9.2f} {nbytes / ms / 1e6:6.1f} {err:19.2e}")
                    out.append({"rows": M, "candidate": name, "ms": round(ms, 3), "gbs": round(nbytes / ms / 1e6, 2),
                                "rel_error_vs_ours": err})
    print(json.dumps({"bench": "torch_candidates", "kernels": status(), "results": out}))


if __name__ == "__main__":
    main()
