"""The checkpoint's tensor names and shapes for a config: the one place HF names are spelled out."""

from __future__ import annotations


def expected_shapes(cfg, include_lm_head: bool | None = None) -> dict[str, tuple[int, ...]]:
    """{hf_name: shape} of every tensor a Qwen3 / Qwen3-MoE checkpoint holds (per-expert layout, as the
    released checkpoints store it). A tied lm_head is left out unless include_lm_head is True."""
    D, V, Dh = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (D,)
        out[p + "self_attn.q_proj.weight"] = (Hq * Dh, D)
        out[p + "self_attn.k_proj.weight"] = (Hkv * Dh, D)
        out[p + "self_attn.v_proj.weight"] = (Hkv * Dh, D)
        out[p + "self_attn.o_proj.weight"] = (D, Hq * Dh)
        if cfg.attention_bias:
            out[p + "self_attn.q_proj.bias"] = (Hq * Dh,)
            out[p + "self_attn.k_proj.bias"] = (Hkv * Dh,)
            out[p + "self_attn.v_proj.bias"] = (Hkv * Dh,)
            out[p + "self_attn.o_proj.bias"] = (D,)
        out[p + "self_attn.q_norm.weight"] = (Dh,)
        out[p + "self_attn.k_norm.weight"] = (Dh,)
        out[p + "post_attention_layernorm.weight"] = (D,)
        if cfg.is_moe_layer(i):
            E, I = cfg.num_experts, cfg.moe_intermediate_size
            out[p + "mlp.gate.weight"] = (E, D)
            for e in range(E):
                q = f"{p}mlp.experts.{e}."
                out[q + "gate_proj.weight"] = (I, D)
                out[q + "up_proj.weight"] = (I, D)
                out[q + "down_proj.weight"] = (D, I)
        else:
            I = cfg.intermediate_size
            out[p + "mlp.gate_proj.weight"] = (I, D)
            out[p + "mlp.up_proj.weight"] = (I, D)
            out[p + "mlp.down_proj.weight"] = (D, I)
    out["model.norm.weight"] = (D,)
    if include_lm_head or (include_lm_head is None and not cfg.tie_word_embeddings):
        out["lm_head.weight"] = (V, D)
    return out
