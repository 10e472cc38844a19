"""config.py against the official Qwen3 configs, the published model-card figures, and what transformers 5 writes."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from qwen3lab.config import Qwen3Config
from qwen3lab.errors import ConfigError

CONFIG_DIR = resources.files("qwen3lab").joinpath("data", "configs")

# From the Qwen3 model cards (fixtures README): layers, query heads, kv heads, experts total/active, tied.
MODEL_CARDS = {
    "Qwen3-0.6B": (28, 16, 8, 0, 0, True),
    "Qwen3-1.7B": (28, 16, 8, 0, 0, True),
    "Qwen3-4B": (36, 32, 8, 0, 0, True),
    "Qwen3-8B": (36, 32, 8, 0, 0, False),
    "Qwen3-14B": (40, 40, 8, 0, 0, False),
    "Qwen3-32B": (64, 64, 8, 0, 0, False),
    "Qwen3-30B-A3B": (48, 32, 4, 128, 8, False),
    "Qwen3-235B-A22B": (94, 64, 4, 128, 8, False),
}


@pytest.mark.parametrize("name", sorted(MODEL_CARDS))
def test_official_configs(name):
    path = CONFIG_DIR.joinpath(f"{name}.json")
    raw = json.loads(path.read_text())
    cfg = Qwen3Config.from_file(str(path))
    layers, hq, hkv, experts, active, tied = MODEL_CARDS[name]
    got = (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_experts,
           cfg.num_experts_per_tok, cfg.tie_word_embeddings)
    assert got == MODEL_CARDS[name], f"{name}: parsed {got}, model card says {MODEL_CARDS[name]}"
    # head_dim is explicit: 128 in every released Qwen3, also where hidden/heads is something else
    assert cfg.head_dim == 128 == raw["head_dim"], f"{name}: head_dim {cfg.head_dim}"
    if name in ("Qwen3-0.6B", "Qwen3-4B", "Qwen3-32B", "Qwen3-30B-A3B", "Qwen3-235B-A22B"):
        assert cfg.hidden_size // cfg.num_attention_heads != 128  # e.g. 0.6B: 1024 / 16 = 64
    assert cfg.n_rep == hq // hkv
    assert cfg.hidden_size == raw["hidden_size"] and cfg.vocab_size == raw["vocab_size"] == 151936
    assert cfg.rope_theta == raw["rope_theta"] == 1_000_000.0 and cfg.rope_scaling is None
    assert cfg.rms_norm_eps == raw["rms_norm_eps"] and cfg.max_position_embeddings == raw["max_position_embeddings"]
    assert cfg.is_moe == bool(experts)
    if experts:
        assert cfg.model_type == "qwen3_moe" and cfg.architecture == "Qwen3MoeForCausalLM"
        assert cfg.moe_intermediate_size == raw["moe_intermediate_size"] and cfg.norm_topk_prob is True
        assert all(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    else:
        assert cfg.model_type == "qwen3" and not any(cfg.is_moe_layer(i) for i in range(layers))
        assert cfg.intermediate_size == raw["intermediate_size"]


def _ours_vs_hf(ours: Qwen3Config, hf) -> dict:
    """Fields where our parse differs from the transformers config object (empty when they agree)."""
    rp = dict(hf.rope_parameters)
    pairs = {
        "hidden_size": (ours.hidden_size, hf.hidden_size),
        "intermediate_size": (ours.intermediate_size, hf.intermediate_size),
        "num_hidden_layers": (ours.num_hidden_layers, hf.num_hidden_layers),
        "num_attention_heads": (ours.num_attention_heads, hf.num_attention_heads),
        "num_key_value_heads": (ours.num_key_value_heads, hf.num_key_value_heads),
        "head_dim": (ours.head_dim, hf.head_dim),
        "vocab_size": (ours.vocab_size, hf.vocab_size),
        "rms_norm_eps": (ours.rms_norm_eps, hf.rms_norm_eps),
        "max_position_embeddings": (ours.max_position_embeddings, hf.max_position_embeddings),
        "tie_word_embeddings": (ours.tie_word_embeddings, hf.tie_word_embeddings),
        "attention_bias": (ours.attention_bias, hf.attention_bias),
        "rope_theta": (ours.rope_theta, rp["rope_theta"]),
        "rope_type": ((ours.rope_scaling or {}).get("rope_type", "default"), rp["rope_type"]),
        "rope_factor": ((ours.rope_scaling or {}).get("factor"), rp.get("factor")),
        "rope_original_max": ((ours.rope_scaling or {}).get("original_max_position_embeddings"),
                              rp.get("original_max_position_embeddings")),
    }
    if hf.model_type == "qwen3_moe":
        pairs.update({
            "num_experts": (ours.num_experts, hf.num_experts),
            "num_experts_per_tok": (ours.num_experts_per_tok, hf.num_experts_per_tok),
            "moe_intermediate_size": (ours.moe_intermediate_size, hf.moe_intermediate_size),
            "norm_topk_prob": (ours.norm_topk_prob, hf.norm_topk_prob),
            "decoder_sparse_step": (ours.decoder_sparse_step, hf.decoder_sparse_step),
            "mlp_only_layers": (list(ours.mlp_only_layers), list(hf.mlp_only_layers)),
        })
    return {k: v for k, v in pairs.items() if v[0] != v[1]}


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


@pytest.mark.hf
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_transformers5_saved_config_parses(tmp_path, moe):
    transformers = pytest.importorskip("transformers")
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=24, vocab_size=1000, rms_norm_eps=1e-5,
                  max_position_embeddings=131072, tie_word_embeddings=not moe,
                  rope_parameters={**YARN, "rope_theta": 500000.0})
    if moe:
        hf = transformers.Qwen3MoeConfig(**common, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=16,
                                         norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[0])
    else:
        hf = transformers.Qwen3Config(**common)
    hf.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in written  # the transformers-5 layout is what this test is about
    if moe:
        assert "num_local_experts" in written or "num_experts" in written
    ours = Qwen3Config.from_file(tmp_path)
    hf_back = type(hf).from_pretrained(tmp_path)  # what transformers itself reads back
    diff = _ours_vs_hf(ours, hf_back)
    assert not diff, f"field: (ours, transformers): {diff}"
    assert ours.rope_scaling["rope_type"] == "yarn" and ours.rope_theta == 500000.0
    if moe:
        # layers 1 and 3 are MoE ((i+1) % 2 == 0); layer 0 is listed in mlp_only_layers
        assert [ours.is_moe_layer(i) for i in range(4)] == [False, True, False, True]


@pytest.mark.hf
def test_transformers4_rope_scaling_and_roundtrip(tmp_path):
    # The transformers-4 layout (rope_theta + rope_scaling, num_experts) and our own writer agree.
    d = json.loads(CONFIG_DIR.joinpath("Qwen3-30B-A3B.json").read_text())
    d["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    cfg = Qwen3Config.from_dict(d)
    assert cfg.rope_scaling == YARN
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    back = Qwen3Config.from_file(tmp_path)
    assert back.to_hf_dict() == cfg.to_hf_dict()


# ---- errors ---------------------------------------------------------------------------------------
def _tiny_dict(**changes):
    d = {"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 1000}
    d.update(changes)
    return {k: v for k, v in d.items() if v is not None}


def _error(tmp_path, d_or_text) -> str:
    p = tmp_path / "config.json"
    p.write_text(d_or_text if isinstance(d_or_text, str) else json.dumps(d_or_text))
    with pytest.raises(ConfigError) as e:
        Qwen3Config.from_file(p)
    msg = str(e.value)
    assert str(p) in msg, f"message does not name the file: {msg}"
    return msg


def test_error_malformed_json(tmp_path):
    msg = _error(tmp_path, '{"model_type": "qwen3",\n "hidden_size": 64,,}')
    assert "malformed JSON at line 2" in msg, msg


def test_error_not_an_object(tmp_path):
    assert "expected a JSON object" in _error(tmp_path, "[1, 2]")


def test_error_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        Qwen3Config.from_file(tmp_path)


def test_error_unknown_model_type(tmp_path):
    msg = _error(tmp_path, _tiny_dict(model_type="llama"))
    assert "unknown model_type 'llama'" in msg and "qwen3_moe" in msg, msg


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size",
                                   "num_attention_heads"])
def test_error_missing_field(tmp_path, field):
    msg = _error(tmp_path, _tiny_dict(**{field: None}))
    assert f"missing field '{field}'" in msg, msg


def test_error_missing_moe_field(tmp_path):
    d = _tiny_dict(model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2)
    assert "missing field 'moe_intermediate_size'" in _error(tmp_path, d)


def test_error_heads_not_divisible(tmp_path):
    msg = _error(tmp_path, _tiny_dict(num_attention_heads=6, num_key_value_heads=4))
    assert "num_attention_heads (6) is not divisible by num_key_value_heads (4)" in msg, msg


@pytest.mark.parametrize("field,value", [("hidden_size", 0), ("num_hidden_layers", -1), ("head_dim", 0),
                                         ("vocab_size", -5), ("intermediate_size", 0), ("num_key_value_heads", 0)])
def test_error_nonpositive_sizes(tmp_path, field, value):
    msg = _error(tmp_path, _tiny_dict(**{field: value}))
    assert f"field '{field}' must be > 0, got {value}" in msg, msg


def test_error_moe_zero_experts_and_topk(tmp_path):
    d = _tiny_dict(model_type="qwen3_moe", num_experts=0, num_experts_per_tok=2, moe_intermediate_size=32)
    assert "field 'num_experts' must be > 0, got 0" in _error(tmp_path, d)
    d = _tiny_dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=6, moe_intermediate_size=32)
    assert "num_experts_per_tok (6) exceeds num_experts (4)" in _error(tmp_path, d)


def test_error_bad_types(tmp_path):
    assert "field 'hidden_size' must be an integer, got '64'" in _error(tmp_path, _tiny_dict(hidden_size="64"))
    assert "rms_norm_eps" in _error(tmp_path, _tiny_dict(rms_norm_eps=-1e-6))
