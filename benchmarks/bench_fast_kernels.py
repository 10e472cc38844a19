"""The fast path's kernels alone, against what torch offers, on a model's real projection shapes.

    python benchmarks/bench_fast_kernels.py [--preset qwen3-0.6b] [--dtype bfloat16] [--rows 1,8,32,64]
                                            [--layers 28] [--context 544] [--threads N]
                                            [--quant int8|int4] [--group-size 128] [--no-linear]

- linear: one decode step's projections (fused qkv, o, fused gate/up, down for `--layers` layers, then
  lm_head), each layer its own weights so they stream from memory as in a real step, not from cache. For
  each row count M (tokens in the step) it times our `linear_small` (the streaming kernel), our
  `linear_large` (bands of weights widened to float32 + sgemm; bf16 / int8 only) and torch's F.linear, and
  prints ms per step, weight GB/s and GFLOP/s: the crossover row count is what fast/linear.py's SMALL_M
  encodes. With --quant the same step's weights quantised (activations in --dtype): int8 times
  `linear_small` / `linear_large` with per-row scales and gemm.py's `int8_gemm_bf16`; int4 (--group-size) times
  `linear_q4` (decode), `linear_q4_large` (dequantised bands + sgemm) and torch's
  `_weight_int4pack_mm_for_cpu` over the same q (where this torch has it). GB/s counts the stored bytes
  (int4: packed nibbles + float32 scales).
- attention: one decode step of `attend_decode` (contiguous caches) and `attend_paged_decode` (the same keys
  in a paged pool of 16-position blocks, shuffled block tables) for batch 1 and 8 at `--context` positions,
  against F.scaled_dot_product_attention over the contiguous caches and the paged fallback (one gather + one
  SDPA per layer), with the KV bytes read per second.
Medians of `--runs` after `--warmups`; the machine's other load moves these figures, so compare columns of one
run, not runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from qwen3lab.fast.build import kernels, status
from qwen3lab.fast.gemm import band_rows_for, int8_gemm_bf16
from qwen3lab.fast.linear import Int4Linear, Int8Linear, unpack_int4
from qwen3lab.models.paged_cache import KVPool, PagedDecode, PagedSeqCache, attend_paged_decode
from qwen3lab.presets import preset_config


def _median_ms(fn, warmups: int, runs: int) -> float:
    for _ in range(warmups):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def step_weights(cfg, layers: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """[N, K] weights of one decode step: per layer fused qkv, o, fused gate/up, down; then lm_head."""
    D, Dh, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    shapes = [((Hq + 2 * Hkv) * Dh, D), (D, Hq * Dh), (2 * I, D), (D, I)] * layers + [(cfg.vocab_size, D)]
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(s, generator=g) * 0.02).to(dtype) for s in shapes]


def _torch_int4pack(mods: list[Int4Linear], dtype: torch.dtype):
    """torch's CPU int4 matmul over each module's q / scales (zero points 0), as f(x, i); None where missing."""
    if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        return None
    packed = [torch._convert_weight_to_int4pack_for_cpu(unpack_int4(m.weight).int() + 8, 1) for m in mods]
    sz = [torch.stack([m.scales.t(), torch.zeros_like(m.scales.t())], -1).to(dtype).contiguous() for m in mods]
    G = mods[0].group_size
    return lambda x, i: torch._weight_int4pack_mm_for_cpu(x, packed[i], G, sz[i])


def quant_impls(k, Ws: list[torch.Tensor], quant: str, group_size: int, dtype: torch.dtype):
    """(modules, {name: f(x, i)}, stored bytes) for the step's weights quantised to int8 or int4."""
    if quant == "int8":
        mods = [Int8Linear.from_float(W) for W in Ws]
        impls = {"linear_small": lambda x, i: k.linear_small(x, mods[i].weight, mods[i].scale),
                 "linear_large": lambda x, i: k.linear_large(x, mods[i].weight, mods[i].scale,
                                                             band_rows_for(mods[i].in_features))}
        if dtype == torch.bfloat16:
            impls["int8_gemm_bf16"] = lambda x, i: int8_gemm_bf16(x, mods[i].weight, mods[i].scale)
        return mods, impls, sum(m.weight.numel() + 4 * m.scale.numel() for m in mods)
    mods = [Int4Linear.from_float(W, group_size) for W in Ws]
    impls = {"linear_q4": lambda x, i: k.linear_q4(x, mods[i].weight, mods[i].scales, group_size),
             "linear_q4_large": lambda x, i: k.linear_q4_large(x, mods[i].weight, mods[i].scales, group_size,
                                                               band_rows_for(mods[i].in_features))}
    t4 = _torch_int4pack(mods, dtype)
    if t4 is not None:
        impls["int4pack_mm"] = t4
    return mods, impls, sum(m.weight.numel() + 4 * m.scales.numel() for m in mods)


def _step(f, xs: dict[int, torch.Tensor], Ws: list[torch.Tensor]):
    """One decode step's projections through f(x, i), weight i."""
    return lambda: [f(xs[W.shape[1]], i) for i, W in enumerate(Ws)]


def bench_linear(k, Ws, rows: list[int], warmups: int, runs: int, quant: str | None = None,
                 group_size: int = 128) -> None:
    dtype = Ws[0].dtype
    flops_per_row = 2 * sum(W.numel() for W in Ws)
    if quant is None:
        nbytes = sum(W.numel() * W.element_size() for W in Ws)
        impls = {"linear_small": lambda x, i: k.linear_small(x, Ws[i], None),
                 "F.linear": lambda x, i: F.linear(x, Ws[i])}
        if dtype == torch.bfloat16:
            impls["linear_large"] = lambda x, i: k.linear_large(x, Ws[i], None, band_rows_for(Ws[i].shape[1]))
        what = str(dtype)
    else:
        _, impls, nbytes = quant_impls(k, Ws, quant, group_size, dtype)
        what = f"{quant}{f' (group size {group_size})' if quant == 'int4' else ''} weights, {dtype} activations"
    print(f"linear: {len(Ws)} weights, {nbytes / 1e9:.2f} GB per step, {what}")
    print(f"{'M':>4} {'impl':>15} {'ms/step':>9} {'GB/s':>7} {'GFLOP/s':>8}")
    for M in rows:
        xs = {W.shape[1]: torch.randn(M, W.shape[1]).to(dtype) for W in Ws}
        for name, f in impls.items():
            ms = _median_ms(_step(f, xs, Ws), warmups, runs)
            print(f"{M:>4} {name:>15} {ms:9.2f} {nbytes / ms / 1e6:7.1f} {M * flops_per_row / ms / 1e6:8.1f}")


def _ours(k, q, kn, vn, kc, vc, pos, scale):
    def run():
        for i in range(len(kc)):
            k.attend_decode(q, kn, vn, kc[i], vc[i], pos, scale)
    return run


def _sdpa(q, kc, vc, context, scale):
    def run():  # per sequence, [1, H, 1, Dh] queries over [1, Hkv, S, Dh] keys/values
        for i in range(len(kc)):
            for b in range(q.shape[0]):
                F.scaled_dot_product_attention(q[b, :, None][None], kc[i][b][None, :, :context],
                                               vc[i][b][None, :, :context], scale=scale, enable_gqa=True)
    return run


def _paged(k, q, kn, vn, kc, vc, context, scale, fallback: bool):
    """The caches copied into one pool of 16-position blocks (a random table per sequence); each layer's step."""
    B, Hkv, cap, Dh = len(kc[0]), *kc[0][0].shape
    bs, nb = 16, -(-cap // 16)
    pool = KVPool(len(kc), B * nb, Hkv, bs, Dh, q.dtype)
    ids = torch.randperm(B * nb).tolist()
    caches = [PagedSeqCache(pool, ids[b * nb:(b + 1) * nb], context - 1) for b in range(B)]
    for i in range(len(kc)):
        for b, c in enumerate(caches):
            t = torch.tensor(c.block_table)
            pad = nb * bs - cap
            pool.k[i][t] = F.pad(kc[i][b], (0, 0, 0, pad)).view(Hkv, nb, bs, Dh).transpose(0, 1)
            pool.v[i][t] = F.pad(vc[i][b], (0, 0, 0, pad)).view(Hkv, nb, bs, Dh).transpose(0, 1)
    paged = PagedDecode(caches, q.device)

    def run():
        for i in range(len(kc)):
            if fallback:
                attend_paged_decode(q[None], kn[None], vn[None], paged, i, scale, torch.float32)
            else:
                k.attend_paged_decode(q, kn, vn, *paged.layer(i), paged.tables, paged.pos, scale)
    return run


def bench_attention(k, cfg, context: int, dtype: torch.dtype, layers: int, warmups: int, runs: int) -> None:
    Hq, Hkv, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    print(f"attention: decode at {context} positions, {layers} layers, {dtype}")
    print(f"{'batch':>5} {'impl':>14} {'ms/step':>9} {'KV GB/s':>8}")
    for B in (1, 8):
        cap = context + 16
        kc = [[torch.randn(Hkv, cap, Dh).to(dtype) for _ in range(B)] for _ in range(layers)]  # [Hkv, cap, Dh]
        vc = [[torch.randn(Hkv, cap, Dh).to(dtype) for _ in range(B)] for _ in range(layers)]
        q = torch.randn(B, Hq, Dh).to(dtype)
        kn, vn = torch.randn(B, Hkv, Dh).to(dtype), torch.randn(B, Hkv, Dh).to(dtype)
        kv_bytes = 2 * layers * B * Hkv * context * Dh * q.element_size()
        scale = Dh ** -0.5
        for name, fn in (("attend_decode", _ours(k, q, kn, vn, kc, vc, [context - 1] * B, scale)),
                         ("SDPA", _sdpa(q, kc, vc, context, scale)),
                         ("paged kernel", _paged(k, q, kn, vn, kc, vc, context, scale, fallback=False)),
                         ("paged gather", _paged(k, q, kn, vn, kc, vc, context, scale, fallback=True))):
            ms = _median_ms(fn, warmups, runs)
            print(f"{B:>5} {name:>14} {ms:9.2f} {kv_bytes / ms / 1e6:8.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen3-0.6b")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--rows", default="1,8,32,64", help="tokens per step (M) to time")
    ap.add_argument("--layers", type=int, default=None, help="layers of weights (default: the model's)")
    ap.add_argument("--context", type=int, default=544)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--warmups", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quant", choices=["int8", "int4"], default=None, help="quantised weights (linear table)")
    ap.add_argument("--group-size", type=int, default=128, help="int4 group size along K (32 or 128)")
    ap.add_argument("--no-attention", action="store_true", help="time the linear table only")
    ap.add_argument("--no-linear", action="store_true", help="time the attention table only")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    k = kernels()
    if k is None:
        raise SystemExit(f"no kernels to time: {status()}")
    cfg = preset_config(a.preset)
    layers = a.layers or cfg.num_hidden_layers
    dtype = getattr(torch, a.dtype)
    print(f"{a.preset}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    with torch.inference_mode():
        if not a.no_linear:
            bench_linear(k, step_weights(cfg, layers, dtype), [int(r) for r in a.rows.split(",")], a.warmups,
                         a.runs, a.quant, a.group_size)
        if not a.no_attention:
            bench_attention(k, cfg, a.context, dtype, layers, a.warmups, a.runs)


if __name__ == "__main__":
    main()
