"""`qwen3lab bench attention`: one Qwen3 attention layer, ours vs HF's, prefill and decode with a KV cache.

Notable:
- prefill: requests with new-token counts `seqlens` after cached pasts `past` (default [64, 128, 256, 256]
  after [512, 0, 0, 256]); TTFT of a request is the time from the start of the batch until its output
  is ready, averaged over the requests. Ours runs the batch as one packed (varlen) forward, so every
  request is ready at the end; HF's attention has no varlen path and takes each request in turn with its
  own DynamicCache (a padded batch would compute 4x the attention here).
- decode: one new token for each of 16 requests with past lengths 50, 100, 200, 400 (four each); ours as
  one packed forward over 16 caches, HF as one left-padded batch with a 4-D mask (what HF generate does
  for a batch); tokens/s = requests / step time.
- what a real model computes once per forward and shares across its layers (RoPE cos/sin, masks, attention
  plans) is built outside the timed region, for both; the KV caches are reset to the past before each run.
- before timing, ours and HF are run once on the same inputs and must agree (relative error under the
  dtype's tolerance), so both sides time the same computation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..config import Qwen3Config
from ..errors import InputError, NumericsError
from ..models.batch import Span, attention_plans
from ..models.paged_cache import DEFAULT_BLOCK_SIZE, KVPool, PagedSeqCache
from ..rope import rope_parameters
from ..shapes import expected_shapes
from .modules import hf_attention, layer_state, one_layer_config, our_attention, tap_names
from .report import make_record
from .settings import check_counts, resolve_dtype
from .timing import Progress, median, percentile, run_timed

DEFAULT_SEQLENS = (64, 128, 256, 256)
DEFAULT_PAST = (512, 0, 0, 256)
DEFAULT_DECODE_PAST = (50,) * 4 + (100,) * 4 + (200,) * 4 + (400,) * 4
DEFAULT_WARMUPS, DEFAULT_RUNS = 10, 100
# ||ours - hf|| / ||hf|| allowed by the parity check, per dtype
PARITY_RTOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@dataclass
class AttentionShape:
    seqlens: list[int]
    past: list[int]
    decode_past: list[int]

    def __post_init__(self) -> None:
        if len(self.seqlens) != len(self.past):
            raise InputError(f"--seqlens has {len(self.seqlens)} entries but --past has {len(self.past)}; "
                             "give one cached past length per request")
        if any(p < 0 for p in self.past) or any(p < 0 for p in self.decode_past):
            raise InputError("past lengths must be >= 0")


def estimate_bytes(cfg: Qwen3Config, seqlens: list[int], past: list[int], decode_past: list[int], repeat: int,
                   elt: int, hf: bool) -> int:
    """Memory the bench would allocate for these shapes, from the sizes alone (nothing is expanded, so a
    10**11-token request or a 10**12 --decode-repeat costs nothing to estimate). Counts the inputs, every KV
    cache, the q/k/v/output activations and the full score matrix (the math attention path's worst case), once
    for ours and once more for HF; plus the one-layer model the layer's weights come from (float32)."""

    D, H, Hkv, Dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def request(T: int, P: int) -> int:
        return (T * D * 2 + 2 * Hkv * P * Dh + 2 * Hkv * (P + T) * Dh  # x and output, past, cache
                + T * (H + 2 * Hkv) * Dh + H * T * (P + T))  # q, k, v and the scores

    per_impl = sum(request(T, P) for T, P in zip(seqlens, past, strict=False))
    per_impl += repeat * sum(request(1, P) for P in decode_past)
    if decode_past:  # HF's decode batch is left-padded to the longest past
        per_impl += 2 * repeat * len(decode_past) * Hkv * (max(decode_past) + 1) * Dh
    weights = sum(math.prod(s) for s in expected_shapes(one_layer_config(cfg)).values()) * 4
    return per_impl * elt * (2 if hf else 1) + weights


# ---- inputs shared by both implementations ---------------------------------------------------------
def make_inputs(cfg: Qwen3Config, shape: AttentionShape, dtype: torch.dtype, device: torch.device, seed: int):
    """Hidden states for every request and random cached keys/values for every past (post-norm, post-RoPE
    scale: unit variance, like what a k_norm'd key is)."""
    g = torch.Generator().manual_seed(seed + 1)
    D, Hkv, Dh = cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim

    def randn(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)

    prefill_x = [randn(T, D) for T in shape.seqlens]  # [T_i, D] each
    prefill_kv = [(randn(Hkv, P, Dh), randn(Hkv, P, Dh)) for P in shape.past]  # [Hkv, P_i, Dh] each
    decode_x = randn(len(shape.decode_past), D)  # [B, D]
    decode_kv = [(randn(Hkv, P, Dh), randn(Hkv, P, Dh)) for P in shape.decode_past]
    return prefill_x, prefill_kv, decode_x, decode_kv


# ---- ours ------------------------------------------------------------------------------------------
def rope_cos_sin(cfg: Qwen3Config, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin [1, N, 1, Dh] for the packed positions, built like the model builds its tables."""
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq, scale = rope_parameters(cfg)
    ang = positions.to(ct)[:, None] * torch.tensor(inv_freq, dtype=ct, device=positions.device)[None, :]
    ang = torch.cat((ang, ang), dim=-1)  # [N, Dh]
    N = positions.shape[0]
    return (ang.cos() * scale).to(dtype).view(1, N, 1, -1), (ang.sin() * scale).to(dtype).view(1, N, 1, -1)


class OursAttention:
    """Our attention layer over a packed batch; the requests' caches share one paged pool (of one layer)."""

    impl = "qwen3lab"

    def __init__(self, cfg: Qwen3Config, state, dtype: torch.dtype, device: torch.device):
        self.cfg, self.dtype, self.device = cfg, dtype, device
        self.mod = our_attention(cfg, state)
        self.names = tap_names(0)
        self.path = "plain eager"
        if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16):
            from ..fast import use_kernels  # what generation runs on a CPU: the kernel leaves

            self.path = f"fast ({use_kernels(self.mod)})"

    def _batch(self, xs: list[torch.Tensor], kvs, past: list[int]):
        """The requests' caches in one paged pool (one layer), as LLMEngine keeps them, holding their pasts."""
        Hkv, Dh = self.cfg.num_key_value_heads, self.cfg.head_dim
        bs = DEFAULT_BLOCK_SIZE
        need = [-(-(P + x.shape[0]) // bs) for x, P in zip(xs, past, strict=True)]
        pool = KVPool(1, sum(need), Hkv, bs, Dh, self.dtype, self.device)
        spans, first = [], 0
        for x, (k, v), P, n in zip(xs, kvs, past, need, strict=True):
            cache = PagedSeqCache(pool, list(range(first, first + n)), 0)
            first += n
            if P:
                cache.write(0, 0, k, v)  # k / v [Hkv, P, Dh]
                cache.advance(P)
            spans.append(Span(cache, P, x.shape[0]))
        positions = torch.cat([torch.arange(s.start, s.start + s.length, device=self.device) for s in spans])  # [N]
        cos, sin = rope_cos_sin(self.cfg, positions, self.dtype)
        plans = attention_plans(spans, self.device)
        packed = torch.cat(xs).unsqueeze(0)  # [1, N, D]
        return packed, cos, sin, plans

    def prefill(self, xs, kvs, past):
        """(timed fn(mark), setup, outputs fn) for the prefill batch."""
        packed, cos, sin, plans = self._batch(xs, kvs, past)
        n = len(xs)

        def timed(mark):
            self.mod(packed, cos, sin, plans, self.names)  # [1, N, D]
            for _ in range(n):  # every request of the packed batch is ready when the forward returns
                mark()

        def outputs():
            out = self.mod(packed, cos, sin, plans, self.names)[0]
            return list(out.split([x.shape[0] for x in xs]))

        return timed, None, outputs, n

    def decode(self, x, kvs, past):
        xs = list(x.split(1))
        packed, cos, sin, plans = self._batch(xs, kvs, past)

        def timed(mark):
            self.mod(packed, cos, sin, plans, self.names)

        def outputs():
            return self.mod(packed, cos, sin, plans, self.names)[0]  # [B, D]

        return timed, None, outputs


class HFAttention:
    """transformers' Qwen3Attention with a DynamicCache per request (prefill) / one padded batch (decode)."""

    impl = "hf"

    def __init__(self, cfg: Qwen3Config, state, dtype: torch.dtype, device: torch.device, attn_impl: str):
        self.cfg, self.dtype, self.device = cfg, dtype, device
        self.mod, self.rotary, self.hcfg = hf_attention(cfg, state, attn_impl)
        self.attn_impl = attn_impl

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, S] bool (True = attend) -> what the configured attention function expects."""
        if self.attn_impl == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill(
            ~allowed, torch.finfo(self.dtype).min)

    def _cache(self, k: torch.Tensor, v: torch.Tensor):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.hcfg)
        if k.shape[-2] > 0:
            cache.update(k, v, 0)
        return cache

    def prefill(self, xs, kvs, past):
        reqs = []
        for x, P in zip(xs, past, strict=True):
            T = x.shape[0]
            pos = torch.arange(P, P + T, device=self.device)[None]  # [1, T]
            cos, sin = self.rotary(x[None], pos)
            mask = None  # a fresh prefill: sdpa's is_causal, as HF's mask builder leaves it
            if P > 0 or self.attn_impl != "sdpa":
                allowed = torch.ones(T, P + T, dtype=torch.bool, device=self.device).tril(P)  # [T, S]
                mask = self._mask(allowed[None, None])
            reqs.append((x[None], (cos, sin), mask))
        caches: list[Any] = []

        def setup():
            caches[:] = [self._cache(k[None], v[None]) for k, v in kvs]

        def timed(mark):
            for (x, pe, mask), cache in zip(reqs, caches, strict=True):
                self.mod(hidden_states=x, position_embeddings=pe, attention_mask=mask, past_key_values=cache)
                mark()

        def outputs():
            setup()
            return [self.mod(hidden_states=x, position_embeddings=pe, attention_mask=mask,
                             past_key_values=cache)[0][0] for (x, pe, mask), cache in zip(reqs, caches, strict=True)]

        return timed, setup, outputs, len(xs)

    def decode(self, x, kvs, past):
        B, Pmax = len(past), max(past)
        Hkv, Dh = self.cfg.num_key_value_heads, self.cfg.head_dim
        k = torch.zeros(B, Hkv, Pmax, Dh, dtype=self.dtype, device=self.device)  # left-padded pasts
        v = torch.zeros_like(k)
        allowed = torch.zeros(B, 1, 1, Pmax + 1, dtype=torch.bool, device=self.device)
        for b, ((kb, vb), P) in enumerate(zip(kvs, past, strict=True)):
            k[b, :, Pmax - P:] = kb
            v[b, :, Pmax - P:] = vb
            allowed[b, ..., Pmax - P:] = True
        mask = self._mask(allowed)
        pos = torch.tensor(past, device=self.device)[:, None]  # [B, 1]
        hx = x[:, None]  # [B, 1, D]
        pe = self.rotary(hx, pos)
        caches: list[Any] = []

        def setup():
            caches[:] = [self._cache(k, v)]

        def timed(mark):
            self.mod(hidden_states=hx, position_embeddings=pe, attention_mask=mask, past_key_values=caches[0])

        def outputs():
            setup()
            return self.mod(hidden_states=hx, position_embeddings=pe, attention_mask=mask,
                            past_key_values=caches[0])[0][:, 0]  # [B, D]

        return timed, setup, outputs


def check_parity(what: str, ours: list[torch.Tensor], hf: list[torch.Tensor], dtype: torch.dtype) -> float:
    """Largest ||ours - hf|| / ||hf|| over the requests; raises NumericsError past the dtype's tolerance."""
    worst = 0.0
    for i, (a, b) in enumerate(zip(ours, hf, strict=True)):
        assert a.shape == b.shape, (what, i, a.shape, b.shape)
        a64, b64 = a.double(), b.double()
        rel = float((a64 - b64).norm() / b64.norm().clamp_min(1e-30))
        if not rel <= PARITY_RTOL[dtype]:
            raise NumericsError(
                f"attention {what}: ours and HF differ on request {i}: relative error {rel:.3g} > "
                f"{PARITY_RTOL[dtype]:g} ({dtype}); max |diff| {float((a64 - b64).abs().max()):.3g}, "
                f"max |hf| {float(b64.abs().max()):.3g}")
        worst = max(worst, rel)
    return worst


def run(cfg: Qwen3Config, device: torch.device, dtype_name: str, warmups: int = DEFAULT_WARMUPS,
        runs: int = DEFAULT_RUNS, shape: AttentionShape | None = None, hf: bool = True, hf_attn: str = "sdpa",
        seed: int = 0, progress: Progress | None = None) -> tuple[list[dict], dict[str, Any]]:
    """Both phases for ours (and HF). Returns (records, extra settings such as the parity errors)."""
    check_counts(warmups, runs)
    dtype = resolve_dtype(dtype_name)
    shape = shape or AttentionShape(list(DEFAULT_SEQLENS), list(DEFAULT_PAST), list(DEFAULT_DECODE_PAST))
    state = layer_state(cfg, "self_attn", seed, dtype, device)
    prefill_x, prefill_kv, decode_x, decode_kv = make_inputs(cfg, shape, dtype, device, seed)
    ours = OursAttention(cfg, state, dtype, device)
    impls: list[Any] = [ours]
    if hf:
        impls.append(HFAttention(cfg, state, dtype, device, hf_attn))
    prefill_tokens = sum(shape.seqlens)
    records: list[dict] = []
    parity: dict[str, float] = {}
    built = {}
    with torch.inference_mode():
        for impl in impls:
            built[impl.impl] = (impl.prefill(prefill_x, prefill_kv, shape.past),
                                impl.decode(decode_x, decode_kv, shape.decode_past))
        if hf:
            (_, _, ours_pre, _), (_, _, ours_dec) = built["qwen3lab"]
            (_, _, hf_pre, _), (_, _, hf_dec) = built["hf"]
            parity["prefill"] = check_parity("prefill", ours_pre(), hf_pre(), dtype)
            parity["decode"] = check_parity("decode", [ours_dec()], [hf_dec()], dtype)
    prefill_case = f"seqlens={_csv(shape.seqlens)} past={_csv(shape.past)}"
    decode_case = f"{len(shape.decode_past)} req past={_csv(sorted(set(shape.decode_past)))}"
    for impl in impls:
        (p_fn, p_setup, _, n_req), (d_fn, d_setup, _) = built[impl.impl]
        samples = run_timed(p_fn, device, warmups, runs, setup=p_setup, progress=progress,
                              label=f"{impl.impl} prefill")
        # TTFT: each request's mark is when its output was ready, from the start of the batch.
        assert all(len(s.marks) == n_req for s in samples)
        ttft = [sum(s.marks) / n_req for s in samples]
        totals = [s.total for s in samples]
        records.append(make_record(
            "attention", impl.impl, "prefill", prefill_case, device, dtype_name,
            ttft_ms=1e3 * median(ttft), latency_ms=1e3 * median(totals),
            latency_p90_ms=1e3 * percentile(totals, 90), tok_per_s=prefill_tokens / median(totals),
            requests=n_req, tokens=prefill_tokens))
        samples = run_timed(d_fn, device, warmups, runs, setup=d_setup, progress=progress,
                              label=f"{impl.impl} decode")
        totals = [s.total for s in samples]
        B = len(shape.decode_past)
        records.append(make_record(
            "attention", impl.impl, "decode", decode_case, device, dtype_name,
            tok_per_s=B / median(totals), latency_ms=1e3 * median(totals),
            latency_p90_ms=1e3 * percentile(totals, 90), requests=B, tokens=B))
    extra = {"seqlens": shape.seqlens, "past": shape.past, "decode_past": shape.decode_past,
             "hf_attn_implementation": hf_attn if hf else None, "hf_mode": {
                 "prefill": "one request at a time, DynamicCache each", "decode": "left-padded batch, 4-D mask"}
             if hf else None, "ours_mode": "one packed (varlen) forward, paged KV cache",
             "ours_path": ours.path,
             "parity_rel_error": parity}
    return records, extra


def _csv(xs) -> str:
    return ",".join(str(x) for x in xs)
