"""Model presets: the official Qwen3 configs (real shapes) plus two tiny ones for tests."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from .config import Qwen3Config
from .errors import ConfigError

# preset name -> bundled official config file
OFFICIAL = {
    "qwen3-0.6b": "Qwen3-0.6B.json",
    "qwen3-1.7b": "Qwen3-1.7B.json",
    "qwen3-4b": "Qwen3-4B.json",
    "qwen3-8b": "Qwen3-8B.json",
    "qwen3-14b": "Qwen3-14B.json",
    "qwen3-32b": "Qwen3-32B.json",
    "qwen3-30b-a3b": "Qwen3-30B-A3B.json",
    "qwen3-235b-a22b": "Qwen3-235B-A22B.json",
}

# Small models with the real vocabulary (so the real tokenizer's ids are valid) and a head_dim that is
# deliberately not hidden/heads, as in every real Qwen3.
_TINY: dict[str, Any] = {
    "model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 151936,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
    "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645,
    "torch_dtype": "bfloat16",
}
TINY = {
    "tiny": _TINY,
    "tiny-moe": {**_TINY, "model_type": "qwen3_moe", "num_experts": 8, "num_experts_per_tok": 2,
                 "moe_intermediate_size": 32, "norm_topk_prob": True, "decoder_sparse_step": 1,
                 "mlp_only_layers": [], "tie_word_embeddings": False},
}

PRESETS = [*OFFICIAL, *TINY]


def preset_dict(name: str) -> dict[str, Any]:
    key = name.lower()
    if key in TINY:
        return dict(TINY[key])
    if key in OFFICIAL:
        text = resources.files("qwen3lab").joinpath("data", "configs", OFFICIAL[key]).read_text()
        return json.loads(text)
    raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")


def preset_config(name: str, **overrides: Any) -> Qwen3Config:
    """The preset's config, with overrides such as num_hidden_layers=4 applied and validated."""
    d = preset_dict(name)
    d.update({k: v for k, v in overrides.items() if v is not None})
    return Qwen3Config.from_dict(d, source=f"preset {name}")
