"""`qwen3lab bench moe`: the Qwen3-MoE sparse block (router + experts), ours vs HF's Qwen3MoeSparseMoeBlock.

Notable:
- shape from the config (default Qwen3-30B-A3B: hidden 2048, 128 experts, top-8, moe_intermediate 768);
  input width is cfg.hidden_size, never a constant;
- prefill-sized and decode-sized token counts; latency and tokens/s per count;
- routing statistics of ours' router on the benchmark input (read through the `topk_idx` tap): tokens per
  expert, the coefficient of variation of expert load (population std / mean), experts never hit;
- decode counts also get a roofline fraction: the block must read the router and every expert the batch
  hits, so (those bytes / latency) / measured bandwidth says how close it runs to the memory limit;
- before timing, ours and HF run once on the same input and must agree within the dtype's tolerance.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import taps
from ..config import Qwen3Config
from ..errors import NumericsError
from .attention import PARITY_RTOL
from .bandwidth import DTYPE_BYTES, measure_bandwidth
from .modules import HF_EXPERTS_IMPLS, hf_moe_block, layer_state, our_moe_block, tap_names
from .report import make_record
from .settings import check_counts, resolve_dtype
from .timing import Progress, median, percentile, run_timed

DEFAULT_PREFILL_TOKENS = (512,)
DEFAULT_DECODE_TOKENS = (1, 8)
DEFAULT_WARMUPS, DEFAULT_RUNS = 3, 20


def routing_stats(topk_idx: np.ndarray | torch.Tensor, num_experts: int) -> dict[str, Any]:
    """Load statistics of a routing decision topk_idx [N, K] (expert ids).

    load of an expert = number of (token, slot) assignments it received; cv = population std / mean
    (0 = perfectly even); never_hit = experts with load 0.
    """
    idx = topk_idx.detach().cpu().numpy() if isinstance(topk_idx, torch.Tensor) else np.asarray(topk_idx)
    idx = idx.reshape(-1, idx.shape[-1])  # [N, K] (a leading batch dim of 1 is folded)
    counts = np.bincount(idx.reshape(-1).astype(np.int64), minlength=num_experts)
    assert counts.shape == (num_experts,), (counts.shape, num_experts)
    mean = float(counts.mean())
    never = [int(e) for e in np.flatnonzero(counts == 0)]
    return {
        "tokens": int(idx.shape[0]),
        "top_k": int(idx.shape[1]),
        "tokens_per_expert": [int(c) for c in counts],
        "load_mean": mean,
        "load_min": int(counts.min()),
        "load_max": int(counts.max()),
        "load_cv": float(counts.std() / mean) if mean > 0 else 0.0,
        "max_over_mean": float(counts.max() / mean) if mean > 0 else 0.0,
        "experts_hit": num_experts - len(never),
        "experts_never_hit": len(never),
        "never_hit_ids": never,
    }


def our_routing(block: torch.nn.Module, x: torch.Tensor, layer: int = 0) -> np.ndarray:
    """topk_idx [N, K] that our block chooses for x [1, N, D], read from its `topk_idx` tap."""

    name = f"layers.{layer}.topk_idx"
    with torch.inference_mode(), taps.record([name]) as rec:
        block(x, tap_names(layer))
    return rec.taps[name].reshape(x.shape[1], -1)


def _moe_bytes(cfg: Qwen3Config, dtype_name: str, stats: dict[str, Any]) -> int:
    """Weight bytes a forward must read: the router and the experts it hits (3 matrices each)."""
    esize = DTYPE_BYTES[dtype_name]
    per_expert = 3 * cfg.moe_intermediate_size * cfg.hidden_size
    return esize * (cfg.num_experts * cfg.hidden_size + stats["experts_hit"] * per_expert)


def run(cfg: Qwen3Config, device: torch.device, dtype_name: str, warmups: int = DEFAULT_WARMUPS,
        runs: int = DEFAULT_RUNS, prefill_tokens=DEFAULT_PREFILL_TOKENS, decode_tokens=DEFAULT_DECODE_TOKENS,
        hf: bool = True, hf_experts: str = "grouped_mm", seed: int = 0, roofline: bool = True,
        progress: Progress | None = None) -> tuple[list[dict], dict[str, Any]]:
    check_counts(warmups, runs)
    dtype = resolve_dtype(dtype_name)
    state = layer_state(cfg, "mlp", seed, dtype, device, moe=True)
    ours = our_moe_block(cfg, state)
    hf_block = hf_moe_block(cfg, state, hf_experts)[0] if hf else None
    names = tap_names(0)
    bw = measure_bandwidth(device) if roofline and decode_tokens else None
    g = torch.Generator().manual_seed(seed + 2)
    cases = [("prefill", n) for n in prefill_tokens] + [("decode", n) for n in decode_tokens]
    records: list[dict] = []
    parity: dict[str, float] = {}
    routing: dict[str, Any] = {}
    for phase, n in cases:
        x = torch.randn(1, n, cfg.hidden_size, generator=g).to(device=device, dtype=dtype)  # [1, N, D]
        case = f"tokens={n}"
        stats = routing_stats(our_routing(ours, x), cfg.num_experts)
        routing[case] = stats
        if hf_block is not None:
            with torch.inference_mode():
                a, b = ours(x, names).double(), hf_block(x).double()
            rel = float((a - b).norm() / b.norm().clamp_min(1e-30))
            if not rel <= PARITY_RTOL[dtype]:
                raise NumericsError(f"moe {case}: ours and HF differ: relative error {rel:.3g} > "
                                    f"{PARITY_RTOL[dtype]:g} ({dtype}); max |diff| {float((a - b).abs().max()):.3g}")
            parity[case] = rel
        impls: list[tuple[str, Any]] = [("qwen3lab", lambda mark, x=x: ours(x, names))]
        if hf_block is not None:
            impls.append(("hf", lambda mark, x=x: hf_block(x)))
        for impl, fn in impls:
            samples = run_timed(fn, device, warmups, runs, progress=progress, label=f"{impl} {phase} {n} tok")
            t = [s.total for s in samples]
            med = median(t)
            frac = None
            if bw is not None and phase == "decode":
                frac = _moe_bytes(cfg, dtype_name, stats) / med / (bw.read_gbs * 1e9)
            rec = make_record("moe", impl, phase, case, device, dtype_name, tok_per_s=n / med,
                                latency_ms=1e3 * med, latency_p90_ms=1e3 * percentile(t, 90),
                                roofline_fraction=frac, tokens=n)
            if impl == "qwen3lab":
                rec["routing"] = {k: stats[k] for k in ("load_cv", "experts_hit", "experts_never_hit", "load_max",
                                                        "load_mean")}
            records.append(rec)
    extra = {"prefill_tokens": list(prefill_tokens), "decode_tokens": list(decode_tokens),
             "hidden_size": cfg.hidden_size, "num_experts": cfg.num_experts, "top_k": cfg.num_experts_per_tok,
             "moe_intermediate_size": cfg.moe_intermediate_size,
             "hf_experts_implementation": hf_experts if hf else None, "parity_rel_error": parity,
             "routing": routing, "bandwidth": bw.as_dict() if bw else None}
    return records, extra


__all__ = ["run", "routing_stats", "our_routing", "HF_EXPERTS_IMPLS"]
