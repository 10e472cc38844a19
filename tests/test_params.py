"""qwen3lab.params: counts against the published model cards, an independent closed form, random_init and
HF transformers; memory figures against hand arithmetic."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from qwen3lab.config import Qwen3Config
from qwen3lab.errors import ConfigError, InputError
from qwen3lab.params import count_params, memory_report, params_from_args, params_json, run_params_command
from qwen3lab.presets import preset_config
from qwen3lab.random_init import random_weights

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "qwen3lab" / "data" / "configs"

# Model cards (shared/fixtures/README.md): (total, digits it is rounded to in B), (non-embedding, digits), tied
PUBLISHED = {
    "Qwen3-0.6B": ((0.6, 1), (0.44, 2), True),
    "Qwen3-1.7B": ((1.7, 1), (1.4, 1), True),
    "Qwen3-4B": ((4.0, 1), (3.6, 1), True),
    "Qwen3-8B": ((8.2, 1), (6.95, 2), False),
    "Qwen3-14B": ((14.8, 1), (13.2, 1), False),
    "Qwen3-32B": ((32.8, 1), (31.2, 1), False),
    "Qwen3-30B-A3B": ((30.5, 1), (29.9, 1), False),
    "Qwen3-235B-A22B": ((235, 0), (234, 0), False),
}


def closed_form(cfg: Qwen3Config) -> dict[str, int]:
    """Written from the architecture, independently of shapes.expected_shapes."""
    D, V, Dh, L = cfg.hidden_size, cfg.vocab_size, cfg.head_dim, cfg.num_hidden_layers
    Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    attn = D * Hq * Dh + 2 * D * Hkv * Dh + Hq * Dh * D + 2 * Dh  # q, k, v, o, q_norm, k_norm
    if cfg.attention_bias:
        attn += Hq * Dh + 2 * Hkv * Dh + D
    norms = 2 * D
    moe_layers = 0
    if cfg.model_type == "qwen3_moe":
        moe_layers = sum(1 for i in range(L) if i not in cfg.mlp_only_layers and (i + 1) % cfg.decoder_sparse_step == 0)
    dense_layers = L - moe_layers
    expert = 3 * D * cfg.moe_intermediate_size
    emb = V * D
    lm = 0 if cfg.tie_word_embeddings else V * D
    total = (emb + lm + L * (attn + norms) + dense_layers * 3 * D * cfg.intermediate_size
             + moe_layers * (cfg.num_experts * D + cfg.num_experts * expert) + D)
    activated = total - moe_layers * (cfg.num_experts - cfg.num_experts_per_tok) * expert
    return {"total": total, "non_embedding": total - emb - lm, "embedding": emb, "lm_head": lm,
            "activated": activated if moe_layers else None}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_reproduces_model_card(name):
    cfg = Qwen3Config.from_file(CONFIGS / f"{name}.json")
    r = count_params(cfg)
    (tot, td), (ne, nd), tied = PUBLISHED[name]
    got = (round(r.total / 1e9, td), round(r.non_embedding / 1e9, nd))
    assert got == (tot, ne), f"{name}: total {r.total:,} non-embedding {r.non_embedding:,} -> {got}, card {(tot, ne)}"
    assert r.tied is tied and (r.lm_head == 0) is tied
    assert r.lm_head in (0, r.embedding)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_equals_closed_form(name):
    cfg = Qwen3Config.from_file(CONFIGS / f"{name}.json")
    r = count_params(cfg)
    got = {"total": r.total, "non_embedding": r.non_embedding, "embedding": r.embedding, "lm_head": r.lm_head,
           "activated": r.activated}
    assert got == closed_form(cfg)
    assert sum(r.by_part.values()) == r.total
    assert r.embedding + r.final_norm + r.lm_head + sum(L.total for L in r.layers) == r.total


def test_activated_moe():
    a3b = count_params(Qwen3Config.from_file(CONFIGS / "Qwen3-30B-A3B.json")).activated
    a22b = count_params(Qwen3Config.from_file(CONFIGS / "Qwen3-235B-A22B.json")).activated
    # The card's "3.3B" is 3,353,032,704 truncated (rounding to nearest would print 3.4B).
    assert a3b == 3_353_032_704 and math.floor(a3b / 1e8) / 10 == 3.3, a3b
    assert round(a22b / 1e9) == 22, a22b
    assert count_params(preset_config("qwen3-8b")).activated is None


VARIANTS = {
    "tiny": ("tiny", {}),
    "tiny-bias": ("tiny", {"attention_bias": True}),
    "tiny-untied": ("tiny", {"tie_word_embeddings": False}),
    "tiny-moe": ("tiny-moe", {}),
    # dense layer 0 via mlp_only_layers and MoE only on every second layer
    "tiny-moe-mixed": ("tiny-moe", {"num_hidden_layers": 4, "mlp_only_layers": [1], "decoder_sparse_step": 2,
                                    "tie_word_embeddings": True}),
}


def _variant(key: str) -> Qwen3Config:
    name, kw = VARIANTS[key]
    return preset_config(name, vocab_size=1000, **kw)  # small vocab keeps HF model construction quick


@pytest.mark.parametrize("key", sorted(VARIANTS))
def test_tiny_matches_random_init_and_closed_form(key):
    cfg = _variant(key)
    r = count_params(cfg)
    numel = sum(t.numel() for t in random_weights(cfg).values())
    assert r.total == numel == closed_form(cfg)["total"], (r.total, numel, closed_form(cfg))
    assert r.activated == closed_form(cfg)["activated"]


@pytest.mark.hf
@pytest.mark.parametrize("key", sorted(VARIANTS))
def test_tiny_matches_transformers(key):
    transformers = pytest.importorskip("transformers")
    cfg = _variant(key)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg.to_hf_dict()))
    hf = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    r = count_params(cfg)
    assert r.total == hf, f"{key}: ours {r.total:,} vs transformers {hf:,}"
    # a saved state dict holds the tied lm_head as a second copy, as the 0.6B/1.7B files do
    stored = sum(t.numel() for t in model.state_dict().values())
    assert stored == r.total + (r.embedding if cfg.tie_word_embeddings else 0)


def test_kv_cache_bytes():
    cfg = preset_config("qwen3-0.6b")
    m = memory_report(cfg, context=4096, batch=3, dtype="bfloat16")
    assert m["kv_cache"]["bytes_per_token"] == 2 * 28 * 8 * 128 * 2 == 114688
    assert m["kv_cache"]["bytes"] == 114688 * 4096 * 3
    assert memory_report(cfg, dtype="float32")["kv_cache"]["bytes_per_token"] == 2 * 114688
    assert memory_report(cfg, kv_dtype="float8_e4m3fn")["kv_cache"]["bytes_per_token"] == 114688 // 2
    assert memory_report(cfg, dtype="int4")["kv_cache"]["dtype"] == "bfloat16"  # weight-only quantisation
    m30 = memory_report(preset_config("qwen3-30b-a3b"))
    assert m30["kv_cache"]["bytes_per_token"] == 2 * 48 * 4 * 128 * 2


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_float_weight_bytes_are_bytes_times_total(name):
    cfg = Qwen3Config.from_file(CONFIGS / f"{name}.json")
    total = count_params(cfg).total
    w = memory_report(cfg)["weights_bytes"]
    # published bf16 checkpoint sizes are 2 bytes x total parameters
    assert (w["bfloat16"], w["float16"], w["float32"]) == (2 * total, 2 * total, 4 * total)


def test_quantised_weight_bytes_hand_arithmetic():
    cfg = preset_config("qwen3-0.6b")  # every matrix's input width is a multiple of 128
    D, V, Dh, L, I = 1024, 151936, 128, 28, 3072
    Hq, Hkv = 16, 8
    vectors = L * (2 * D + 2 * Dh) + D  # norms, stay bf16
    matrices = count_params(cfg).total - vectors
    rows = V + L * (Hq * Dh + 2 * Hkv * Dh + D + 2 * I + D)  # output channels of every matrix
    w = memory_report(cfg)["weights_bytes"]
    assert w["int8"] == matrices + 2 * rows + 2 * vectors
    assert w["int4"] == matrices // 2 + 2 * (matrices // 128) + 2 * vectors


def test_activation_peak_hand_arithmetic():
    m = memory_report(preset_config("qwen3-0.6b"), context=4096, batch=1, dtype="bfloat16")["activation_peak"]
    T, D, V, Hq, Hkv, Dh, I = 4096, 1024, 151936, 16, 8, 128, 3072
    c = m["components"]
    assert c["residual"] == 2 * T * D * 2
    assert c["logits"] == T * V * 4 and c["logits_last_token"] == V * 4
    qkv_out = T * (Hq + 2 * Hkv) * Dh * 2 + T * Hq * Dh * 2
    assert c["attention_fused"] == qkv_out + Hq * T * 4
    assert c["attention_eager"] == qkv_out + 2 * Hq * T * Dh * 2 + Hq * T * T * (4 + 2)
    assert c["mlp"] == 3 * T * I * 2
    assert m["fused_bytes"] == 2 * T * D * 2 + T * V * 4  # full-sequence float32 logits dominate
    assert m["fused_bytes_last_logits"] == 2 * T * D * 2 + 3 * T * I * 2  # then the MLP does
    assert m["eager_bytes_last_logits"] == 2 * T * D * 2 + c["attention_eager"]
    # eager attention is quadratic in the context, fused linear
    m2 = memory_report(preset_config("qwen3-0.6b"), context=8192)["activation_peak"]["components"]
    assert m2["attention_fused"] == 2 * c["attention_fused"]
    assert m2["attention_eager"] - 2 * c["attention_eager"] == Hq * 8192 * 8192 * 6 - 2 * Hq * T * T * 6


def test_moe_activation_counts_routed_pairs():
    cfg = preset_config("qwen3-30b-a3b")
    c = memory_report(cfg, context=1024, batch=2)["activation_peak"]["components"]
    BT = 2 * 1024
    assert c["mlp"] == BT * 128 * 4 + 3 * BT * 8 * 768 * 2 + BT * 2048 * 2


def test_sources(tmp_path):
    cfg = preset_config("qwen3-30b-a3b")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    by_model = count_params(params_from_args(model=tmp_path)).total
    by_config = count_params(params_from_args(config=CONFIGS / "Qwen3-30B-A3B.json")).total
    by_preset = count_params(params_from_args(preset="qwen3-30b-a3b")).total
    assert by_model == by_config == by_preset == 30_532_122_624


def test_source_errors(tmp_path):
    with pytest.raises(ConfigError, match="--model DIR, --config FILE, --preset NAME"):
        params_from_args()
    with pytest.raises(ConfigError, match="only one of.*--config, --preset"):
        params_from_args(config="x.json", preset="tiny")
    with pytest.raises(ConfigError, match="not a directory"):
        params_from_args(model=tmp_path / "missing")
    with pytest.raises(ConfigError, match="config.json not found"):
        params_from_args(model=tmp_path)
    with pytest.raises(ConfigError, match="unknown preset 'qwen9'"):
        params_from_args(preset="qwen9")
    cfg = preset_config("tiny")
    with pytest.raises(InputError, match="dtype 'int3'"):
        memory_report(cfg, dtype="int3")
    with pytest.raises(InputError, match="kv_dtype 'int8'"):
        memory_report(cfg, kv_dtype="int8")
    with pytest.raises(InputError, match="context must be a positive integer, got 0"):
        memory_report(cfg, context=0)
    with pytest.raises(InputError, match="batch"):
        memory_report(cfg, batch=-1)


def test_json_output():
    buf = io.StringIO()
    obj = run_params_command(None, None, "qwen3-30b-a3b", 2048, 2, "int4", True, console=Console(file=buf))
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1
    d = json.loads(lines[0])
    assert d == json.loads(json.dumps(obj))
    for key in ("total", "non_embedding", "embedding", "lm_head", "activated", "by_part", "memory"):
        assert key in d
    assert d["activated"] == 3_353_032_704
    assert d["memory"]["kv_cache"]["bytes"] == 2 * 48 * 4 * 128 * 2 * 2048 * 2
    mem = d["memory"]
    assert mem["total_bytes"]["fused"] == (mem["weights_bytes"]["int4"] + mem["kv_cache"]["bytes"]
                                           + mem["activation_peak"]["fused_bytes"])
    dense = params_json(count_params(preset_config("qwen3-0.6b")), memory_report(preset_config("qwen3-0.6b")))
    assert json.loads(json.dumps(dense))["activated"] is None


def test_table_output():
    buf = io.StringIO()
    run_params_command(None, None, "qwen3-0.6b", 4096, 1, "bfloat16", False, console=Console(file=buf, width=140))
    text = buf.getvalue()
    for s in ("0.60B", "440.5M", "596,049,920", "tied", "114,688", "layers 0–27 MLP"):
        assert s in text, f"{s!r} missing from:\n{text}"
    buf = io.StringIO()
    run_params_command(None, None, "qwen3-30b-a3b", 4096, 1, "bfloat16", False, console=Console(file=buf, width=140))
    text = buf.getvalue()
    for s in ("30.53B", "3.35B", "experts (128 × 4.7M)", "router"):
        assert s in text, f"{s!r} missing from:\n{text}"
