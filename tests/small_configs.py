"""The small Qwen3 / Qwen3-MoE config the model tests share: real structure (GQA 2, head_dim 32 = hidden /
heads, tied embedding; MoE: 8 experts, top-2, untied), sizes small enough for float64 references."""

from __future__ import annotations

from qwen3lab.config import Qwen3Config


def small_cfg(moe: bool = False, **kw) -> Qwen3Config:
    d = {"model_type": "qwen3_moe" if moe else "qwen3", "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
         "vocab_size": 512, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 256,
         "tie_word_embeddings": True}
    if moe:
        d.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                 tie_word_embeddings=False)
    d.update(kw)
    return Qwen3Config.from_dict(d, source="test config")
