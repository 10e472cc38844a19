"""Parameter and memory accounting for a Qwen3 / Qwen3-MoE config (`qwen3lab params`).

Notable:
- Counts come from shapes.expected_shapes(cfg), the one place tensor names and shapes live, summed by
  part; nothing here re-derives a shape.
- Conventions that reproduce the model cards: a tied lm_head is the embedding and is counted once (lm_head
  0); "non-embedding" leaves out the embedding and an untied lm_head; "activated" (MoE) counts the
  embedding, lm_head, all attention and norms, every router and the top-k experts of each MoE layer (dense
  layers of a MoE model count fully). The cards round totals to nearest but truncate 30B-A3B's activated
  3.35B to "3.3B".
- Memory figures are estimates with their assumptions spelled out (memory_report's docstring and the
  `assumptions` list of its result); exact byte counts, no allocator overheads.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import Qwen3Config
from .errors import ConfigError, InputError
from .presets import preset_config
from .shapes import expected_shapes

# bytes per element of the dtypes a user may name for weights, activations or the KV cache
FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
KV_DTYPE_BYTES = {**FLOAT_BYTES, "float8_e4m3fn": 1, "float8_e5m2": 1}
WEIGHT_DTYPES = ("float32", "bfloat16", "float16", "int8", "int4")
SCALE_BYTES = 2  # quantisation scales and unquantised 1-D tensors are kept in bf16
INT4_GROUP = 128

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


@dataclass
class LayerParams:
    index: int
    moe: bool
    attention: int  # q/k/v/o projections (+ biases) and the per-head q_norm / k_norm
    mlp: int  # dense MLP gate/up/down (0 in a MoE layer)
    router: int  # MoE router `mlp.gate` (0 in a dense layer)
    experts: int  # all experts of the layer
    expert_each: int  # one expert (0 in a dense layer)
    experts_active: int  # the top-k experts a token runs through
    norms: int  # input_layernorm + post_attention_layernorm

    @property
    def total(self) -> int:
        return self.attention + self.mlp + self.router + self.experts + self.norms

    @property
    def activated(self) -> int:
        return self.attention + self.mlp + self.router + self.experts_active + self.norms


@dataclass
class ParamReport:
    source: str
    model_type: str
    tied: bool
    embedding: int
    layers: list[LayerParams]
    final_norm: int
    lm_head: int  # 0 when tied: the lm_head is the embedding
    total: int = 0
    non_embedding: int = 0
    activated: int | None = None  # None for a dense model
    by_part: dict[str, int] = field(default_factory=dict)


def _part(name: str) -> tuple[int | None, str]:
    """(layer index or None, part) of a checkpoint tensor name."""
    if name == "model.embed_tokens.weight":
        return None, "embedding"
    if name == "lm_head.weight":
        return None, "lm_head"
    if name == "model.norm.weight":
        return None, "final_norm"
    m = _LAYER.fullmatch(name)
    assert m, f"unclassified tensor {name}"
    i, rest = int(m.group(1)), m.group(2)
    if rest.startswith("self_attn."):
        return i, "attention"
    if rest in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        return i, "norms"
    if rest == "mlp.gate.weight":
        return i, "router"
    if rest.startswith("mlp.experts."):
        return i, "experts"
    if rest.startswith("mlp."):
        return i, "mlp"
    raise AssertionError(f"unclassified tensor {name}")


def count_params(cfg: Qwen3Config) -> ParamReport:
    """Parameters of `cfg` by part, summed from expected_shapes(cfg)."""
    top = {"embedding": 0, "lm_head": 0, "final_norm": 0}
    per_layer = [{"attention": 0, "norms": 0, "router": 0, "experts": 0, "mlp": 0}
                 for _ in range(cfg.num_hidden_layers)]
    per_expert: list[dict[int, int]] = [{} for _ in range(cfg.num_hidden_layers)]
    for name, shape in expected_shapes(cfg).items():
        n = math.prod(shape)
        i, part = _part(name)
        if i is None:
            top[part] += n
            continue
        per_layer[i][part] += n
        if part == "experts":
            e = int(name.split(".mlp.experts.")[1].split(".")[0])
            per_expert[i][e] = per_expert[i].get(e, 0) + n

    layers = []
    for i, d in enumerate(per_layer):
        sizes = set(per_expert[i].values())
        assert len(sizes) <= 1, f"layer {i}: experts of different sizes {sizes}"
        each = sizes.pop() if sizes else 0
        moe = cfg.is_moe_layer(i)
        assert moe == bool(each), f"layer {i}: MoE layer without experts (or the reverse)"
        k = cfg.num_experts_per_tok if moe else 0
        layers.append(LayerParams(index=i, moe=moe, attention=d["attention"], mlp=d["mlp"], router=d["router"],
                                  experts=d["experts"], expert_each=each, experts_active=k * each,
                                  norms=d["norms"]))

    by_part = {
        "embedding": top["embedding"],
        "attention": sum(L.attention for L in layers),
        "mlp": sum(L.mlp for L in layers),
        "router": sum(L.router for L in layers),
        "experts": sum(L.experts for L in layers),
        "layer_norms": sum(L.norms for L in layers),
        "final_norm": top["final_norm"],
        "lm_head": top["lm_head"],
    }
    total = sum(by_part.values())
    activated = None
    if cfg.is_moe:
        activated = top["embedding"] + top["lm_head"] + top["final_norm"] + sum(L.activated for L in layers)
    return ParamReport(
        source=cfg.source, model_type=cfg.model_type, tied=cfg.tie_word_embeddings,
        embedding=top["embedding"], layers=layers, final_norm=top["final_norm"], lm_head=top["lm_head"],
        total=total, non_embedding=total - top["embedding"] - top["lm_head"], activated=activated,
        by_part=by_part,
    )


# ---- memory ------------------------------------------------------------------------------------------

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


def memory_report(cfg: Qwen3Config, context: int = 4096, batch: int = 1, dtype: str = "bfloat16",
                  kv_dtype: str | None = None) -> dict[str, Any]:
    """Weights, KV cache and prefill activation memory, in bytes.

    dtype: the weight format of the headline figure (float32, bfloat16, float16, int8, int4); activations
    are in `dtype` when it is a float type and in bfloat16 for the weight-only int8/int4 formats.
    kv_dtype: the KV cache element type (default: the activation dtype).

    KV cache: 2 (K and V) * layers * Hkv * head_dim * bytes per token; times context * batch.

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
    context = _check_count("context", context)
    batch = _check_count("batch", batch)
    if dtype not in WEIGHT_DTYPES:
        raise InputError(f"dtype {dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    act_dtype = dtype if dtype in FLOAT_BYTES else "bfloat16"
    kv_dtype = kv_dtype or act_dtype
    if kv_dtype not in KV_DTYPE_BYTES:
        raise InputError(f"kv_dtype {kv_dtype!r} is not one of {', '.join(KV_DTYPE_BYTES)}")

    weights = _weight_bytes(cfg)

    L, Hkv, Dh = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    kv_per_token = 2 * L * Hkv * Dh * KV_DTYPE_BYTES[kv_dtype]
    kv_total = kv_per_token * context * batch

    B, T, S, b, f32 = batch, context, context, FLOAT_BYTES[act_dtype], 4
    D, Hq, V = cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size
    residual = 2 * B * T * D * b
    qkv_out = B * T * (Hq + 2 * Hkv) * Dh * b + B * T * Hq * Dh * b
    attn_fused = qkv_out + B * Hq * T * f32
    attn_eager = qkv_out + 2 * B * Hq * T * Dh * b + B * Hq * T * S * (f32 + b)
    mlp = 0
    if any(not cfg.is_moe_layer(i) for i in range(L)):
        mlp = 3 * B * T * cfg.intermediate_size * b
    if cfg.is_moe:
        E, K, Im = cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
        mlp = max(mlp, B * T * E * f32 + 3 * B * T * K * Im * b + B * T * D * b)
    logits = B * T * V * f32
    logits_last = B * V * f32
    peak_fused = residual + max(attn_fused, mlp, logits)
    peak_eager = residual + max(attn_eager, mlp, logits)

    notes = []
    if context > cfg.max_position_embeddings:
        notes.append(f"context {context} exceeds max_position_embeddings {cfg.max_position_embeddings}")
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
            "tokens": B * T,
            "fused_bytes": peak_fused,
            "eager_bytes": peak_eager,
            # the same when only the last position's logits are computed (generation's prefill)
            "fused_bytes_last_logits": residual + max(attn_fused, mlp, logits_last),
            "eager_bytes_last_logits": residual + max(attn_eager, mlp, logits_last),
            "components": {
                "residual": residual,
                "attention_fused": attn_fused,
                "attention_eager": attn_eager,
                "mlp": mlp,
                "logits": logits,
                "logits_last_token": logits_last,
            },
        },
        # weights in `dtype` + KV cache for context * batch + activation peak
        "total_bytes": {
            "fused": weights[dtype] + kv_total + peak_fused,
            "eager": weights[dtype] + kv_total + peak_eager,
        },
        "assumptions": [
            *(["tied lm_head = embedding, stored once"] if cfg.tie_word_embeddings else []),
            "int8: weight-only, per-output-channel bf16 scales; int4: group size 128, bf16 scales, no zero-points;"
            " norms and biases stay bf16",
            f"activations in {act_dtype}; softmax and logits in float32",
            "peak activation = residual stream + the largest of attention / MLP / logits, one layer at a time;"
            " weights, KV cache, causal mask and workspaces not included",
            "MoE: all routed (token, expert) pairs computed at once",
        ],
        "notes": notes,
    }


# ---- sources ------------------------------------------------------------------------------------------

def params_from_args(model: str | Path | None = None, config: str | Path | None = None,
                     preset: str | None = None) -> Qwen3Config:
    """The config named by exactly one of --model DIR, --config FILE, --preset NAME."""
    given = [(flag, v) for flag, v in (("--model", model), ("--config", config), ("--preset", preset))
             if v is not None]
    if not given:
        raise ConfigError("no model given: pass one of --model DIR, --config FILE, --preset NAME")
    if len(given) > 1:
        raise ConfigError(f"give only one of --model, --config, --preset (got {', '.join(f for f, _ in given)})")
    if model is not None:
        path = Path(model)
        if not path.is_dir():
            raise ConfigError(f"--model {path}: not a directory (a checkpoint dir holding config.json; "
                              f"use --config for a file)")
        return Qwen3Config.from_file(path / "config.json")
    if config is not None:
        return Qwen3Config.from_file(config)
    return preset_config(preset)


# ---- output ------------------------------------------------------------------------------------------

def fmt_count(n: int) -> str:
    """440467456 -> '440.5M', 30532122624 -> '30.53B'."""
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}B" if suffix == "B" else f"{n / div:.1f}{suffix}"
    return str(n)


def fmt_bytes(n: int) -> str:
    for div, unit in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def _layer_groups(layers: list[LayerParams]) -> list[tuple[int, int, LayerParams]]:
    """Runs of consecutive layers with identical counts: (first, last, representative)."""
    groups: list[tuple[int, int, LayerParams]] = []

    def key(L: LayerParams) -> tuple:
        return (L.moe, L.attention, L.mlp, L.router, L.experts, L.norms)

    for L in layers:
        if groups and key(groups[-1][2]) == key(L) and groups[-1][1] == L.index - 1:
            groups[-1] = (groups[-1][0], L.index, groups[-1][2])
        else:
            groups.append((L.index, L.index, L))
    return groups


def params_json(report: ParamReport, memory: dict[str, Any]) -> dict[str, Any]:
    """One JSON-ready object: total, non_embedding, embedding, lm_head, activated (None for dense),
    by_part, per-layer counts and the memory figures."""
    return {
        "source": report.source,
        "model_type": report.model_type,
        "tie_word_embeddings": report.tied,
        "total": report.total,
        "non_embedding": report.non_embedding,
        "embedding": report.embedding,
        "lm_head": report.lm_head,
        "activated": report.activated,
        "by_part": dict(report.by_part),
        "layers": [{**asdict(L), "total": L.total} for L in report.layers],
        "memory": memory,
    }


def render_params(report: ParamReport, memory: dict[str, Any], console) -> None:
    """Print the parameter and memory tables (rich)."""
    from rich.table import Table

    t = Table(title=f"Parameters — {report.source}", title_justify="left")
    for name in ("part", "per layer", "layers", "count", "exact", "share"):
        t.add_column(name, justify="left" if name == "part" else "right")

    def row(label: str, n: int, per_layer: int | None = None, nl: int | None = None, style: str = "") -> None:
        t.add_row(f"{style}{label}", "" if per_layer is None else fmt_count(per_layer), "" if nl is None else str(nl),
                  f"{style}{fmt_count(n)}", f"{n:,}", f"{100 * n / report.total:.1f}%")

    row("embedding", report.embedding)
    for first, last, L in _layer_groups(report.layers):
        nl = last - first + 1
        span = f"layer {first}" if nl == 1 else f"layers {first}–{last}"
        parts = [("attention (q/k/v/o, q/k norm)", L.attention)]
        if L.moe:
            parts.append(("router", L.router))
            parts.append((f"experts ({L.experts // L.expert_each} × {fmt_count(L.expert_each)})", L.experts))
        else:
            parts.append(("MLP (gate/up/down)", L.mlp))
        parts.append(("norms (input, post-attention)", L.norms))
        for label, n in parts:
            row(f"{span} {label}", n * nl, per_layer=n, nl=nl)
    row("final norm", report.final_norm)
    if report.tied:
        t.add_row("lm_head", "", "", "tied", "= embedding", "")
    else:
        row("lm_head", report.lm_head)
    t.add_section()
    total_txt = f"{report.total / 1e9:.2f}B" if report.total >= 1e8 else fmt_count(report.total)  # cards speak in B
    t.add_row("[bold]total", "", "", f"[bold]{total_txt}", f"{report.total:,}", "100.0%")
    row("non-embedding", report.non_embedding)
    if report.activated is not None:
        row("activated per token", report.activated)
    console.print(t)

    m = Table(title=f"Memory — context {memory['kv_cache']['context']} × batch {memory['kv_cache']['batch']}",
              title_justify="left")
    for name in ("what", "size", "bytes"):
        m.add_column(name, justify="left" if name == "what" else "right")

    def mrow(label: str, n: int, style: str = "") -> None:
        m.add_row(f"{style}{label}", f"{style}{fmt_bytes(n)}", f"{n:,}")

    for dt, n in memory["weights_bytes"].items():
        mrow(f"weights {dt}" + (" ◀" if dt == memory["dtype"] else ""), n)
    kv = memory["kv_cache"]
    m.add_section()
    mrow(f"KV cache per token ({kv['dtype']})", kv["bytes_per_token"])
    mrow(f"KV cache, {kv['context']} tokens × batch {kv['batch']}", kv["bytes"])
    a = memory["activation_peak"]
    m.add_section()
    mrow(f"prefill activation peak, fused attention ({a['dtype']})", a["fused_bytes"])
    mrow("prefill activation peak, eager attention", a["eager_bytes"])
    mrow("  same, last-position logits only (fused)", a["fused_bytes_last_logits"])
    mrow("  same, last-position logits only (eager)", a["eager_bytes_last_logits"])
    for k, v in a["components"].items():
        mrow(f"  {k}", v)
    m.add_section()
    tb = memory["total_bytes"]
    mrow(f"weights {memory['dtype']} + KV + peak (fused)", tb["fused"], style="[bold]")
    mrow(f"weights {memory['dtype']} + KV + peak (eager)", tb["eager"])
    console.print(m)
    for note in memory["assumptions"]:
        console.print(f"[dim]· {note}")
    for note in memory["notes"]:
        console.print(f"[yellow]! {note}")


def run_params_command(model: str | None, config: str | None, preset: str | None, context: int = 4096,
                       batch: int = 1, dtype: str = "bfloat16", as_json: bool = False, console=None
                       ) -> dict[str, Any]:
    """`qwen3lab params`: print the tables (or one JSON line with as_json) and return the JSON object."""
    cfg = params_from_args(model=model, config=config, preset=preset)
    report = count_params(cfg)
    memory = memory_report(cfg, context=context, batch=batch, dtype=dtype)
    obj = params_json(report, memory)
    if as_json:
        out = console.file if console is not None else sys.stdout
        out.write(json.dumps(obj) + "\n")
    else:
        if console is None:
            from rich.console import Console
            console = Console()
        render_params(report, memory, console)
    return obj
