"""Memory estimates for a Qwen3 / Qwen3-MoE config (`qwen3lab params`' memory part): weights in each storage
format, the KV cache and the peak activation of a prefill, in exact bytes with their assumptions spelled out
(memory_report's docstring and the `assumptions` list of its result); no allocator overheads.
"""

from __future__ import annotations

import math
from typing import Any

from .config import Qwen3Config
from .errors import InputError
from .shapes import expected_shapes

# bytes per element of the dtypes a user may name for weights, activations or the KV cache
FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
KV_DTYPE_BYTES = {**FLOAT_BYTES, "float8_e4m3fn": 1, "float8_e5m2": 1}
WEIGHT_DTYPES = ("float32", "bfloat16", "float16", "int8", "int4")
SCALE_BYTES = 2  # quantisation scales and unquantised 1-D tensors are kept in bf16
INT4_GROUP = 128


def _weight_bytes(cfg: Qwen3Config) -> dict[str, int]:
    """Bytes to hold the weights in each storage format (a tied embedding is stored once).

    int8: weight-only, symmetric, one bf16 scale per output row of every 2-D weight (projections, experts,
    router, embedding, lm_head). int4: packed two per byte, one bf16 scale per group of 128 inputs of
    each row (symmetric, no zero-points). 1-D tensors (norms, biases) stay bf16 in both."""
    out = dict.fromkeys(WEIGHT_DTYPES, 0)
    for shape in expected_shapes(cfg).values():
        n = math.prod(shape)
        for dt, b in FLOAT_BYTES.items():
            out[dt] += n * b
        if len(shape) == 1:
            out["int8"] += n * SCALE_BYTES
            out["int4"] += n * SCALE_BYTES
            continue
        rows, cols = shape[0], math.prod(shape[1:])
        out["int8"] += rows * cols + rows * SCALE_BYTES
        out["int4"] += rows * (math.ceil(cols / 2) + math.ceil(cols / INT4_GROUP) * SCALE_BYTES)
    return out


def _check_count(what: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise InputError(f"{what} must be a positive integer, got {v!r}")
    return v


def _activations(cfg: Qwen3Config, B: int, T: int, b: int) -> dict[str, int]:
    """The activation terms of memory_report, in bytes.

    Peak activation for a prefill of B = batch sequences of T = context tokens (S = T, no past), b bytes per
    activation element, float32 = 4 bytes. Layers run one at a time and only the KV cache (counted
    separately) outlives a layer, so the peak is the residual stream plus the largest single phase:
        residual  = 2·B·T·D·b                 residual stream x and its RMSNorm output
        attention (fused kernel, e.g. flash / SDPA: scores never materialised)
                  = B·T·(Hq + 2·Hkv)·Dh·b     q, k, v
                  + B·T·Hq·Dh·b               attention output before o_proj
                  + B·Hq·T·4                  softmax log-sum-exp statistics
        attention (eager, scores materialised as in transformers' eager path)
                  = the q, k, v and output terms above
                  + 2·B·Hq·T·Dh·b             k and v repeated to Hq heads (GQA repeat_kv)
                  + B·Hq·T·S·(4 + b)          scores / softmax in float32 and the probabilities cast to b
        MLP dense = 3·B·T·I·b                 gate, up and silu(gate)·up alive together before down_proj
        MLP MoE   = B·T·E·4                   router logits / softmax in float32
                  + 3·B·T·K·I_moe·b           gate, up, act of every routed (token, expert) pair at once
                  + B·T·D·b                   the weighted sum of expert outputs
        logits    = B·T·V·4                   float32 logits for every position (B·V·4 if only the last
                                              position's logits are kept, as generation needs)
        peak      = residual + max(attention, MLP, logits)
    Not counted: weights and KV cache (reported separately), the causal mask, kernel workspaces, allocator
    fragmentation and framework overheads.
    """
    S, f32, L, Hkv, Dh = T, 4, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    D, Hq, V = cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size
    residual = 2 * B * T * D * b
    qkv_out = B * T * (Hq + 2 * Hkv) * Dh * b + B * T * Hq * Dh * b
    mlp = 0
    if any(not cfg.is_moe_layer(i) for i in range(L)):
        mlp = 3 * B * T * cfg.intermediate_size * b
    if cfg.is_moe:
        E, K, Im = cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
        mlp = max(mlp, B * T * E * f32 + 3 * B * T * K * Im * b + B * T * D * b)
    return {"residual": residual,
            "attention_fused": qkv_out + B * Hq * T * f32,
            "attention_eager": qkv_out + 2 * B * Hq * T * Dh * b + B * Hq * T * S * (f32 + b),
            "mlp": mlp,
            "logits": B * T * V * f32,
            "logits_last_token": B * V * f32}


def _assumptions(cfg: Qwen3Config, act_dtype: str) -> list[str]:
    return [
        *(["tied lm_head = embedding, stored once"] if cfg.tie_word_embeddings else []),
        "int8: weight-only, per-output-channel bf16 scales; int4: group size 128, bf16 scales, no zero-points;"
        " norms and biases stay bf16",
        f"activations in {act_dtype}; softmax and logits in float32",
        "peak activation = residual stream + the largest of attention / MLP / logits, one layer at a time;"
        " weights, KV cache, causal mask and workspaces not included",
        "MoE: all routed (token, expert) pairs computed at once",
    ]


def memory_report(cfg: Qwen3Config, context: int = 4096, batch: int = 1, dtype: str = "bfloat16",
                  kv_dtype: str | None = None) -> dict[str, Any]:
    """Weights, KV cache and prefill activation memory, in bytes.

    dtype: the weight format of the headline figure (float32, bfloat16, float16, int8, int4); activations
    are in `dtype` when it is a float type and in bfloat16 for the weight-only int8/int4 formats.
    kv_dtype: the KV cache element type (default: the activation dtype).

    KV cache: 2 (K and V) * layers * Hkv * head_dim * bytes per token; times context * batch.

    Peak activation: the formulas in _activations' docstring.
    """
    context = _check_count("context", context)
    batch = _check_count("batch", batch)
    if dtype not in WEIGHT_DTYPES:
        raise InputError(f"dtype {dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    act_dtype = dtype if dtype in FLOAT_BYTES else "bfloat16"
    kv_dtype = kv_dtype or act_dtype
    if kv_dtype not in KV_DTYPE_BYTES:
        raise InputError(f"kv_dtype {kv_dtype!r} is not one of {', '.join(KV_DTYPE_BYTES)}")

    weights = _weight_bytes(cfg)

    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * KV_DTYPE_BYTES[kv_dtype]
    kv_total = kv_per_token * context * batch

    a = _activations(cfg, batch, context, FLOAT_BYTES[act_dtype])
    residual, mlp = a["residual"], a["mlp"]
    peak_fused = residual + max(a["attention_fused"], mlp, a["logits"])
    peak_eager = residual + max(a["attention_eager"], mlp, a["logits"])

    notes = [f"context {context} exceeds max_position_embeddings {cfg.max_position_embeddings}"
             ] if context > cfg.max_position_embeddings else []
    return {
        "dtype": dtype,
        "weights_bytes": weights,
        "kv_cache": {
            "dtype": kv_dtype,
            "bytes_per_token": kv_per_token,
            "context": context,
            "batch": batch,
            "bytes": kv_total,
        },
        "activation_peak": {
            "dtype": act_dtype,
            "tokens": batch * context,
            "fused_bytes": peak_fused,
            "eager_bytes": peak_eager,
            # the same when only the last position's logits are computed (generation's prefill)
            "fused_bytes_last_logits": residual + max(a["attention_fused"], mlp, a["logits_last_token"]),
            "eager_bytes_last_logits": residual + max(a["attention_eager"], mlp, a["logits_last_token"]),
            "components": a,
        },
        # weights in `dtype` + KV cache for context * batch + activation peak
        "total_bytes": {
            "fused": weights[dtype] + kv_total + peak_fused,
            "eager": weights[dtype] + kv_total + peak_eager,
        },
        "assumptions": _assumptions(cfg, act_dtype),
        "notes": notes,
    }
