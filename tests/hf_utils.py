"""Build a HuggingFace transformers Qwen3 / Qwen3-MoE model from a Qwen3Config and a weights dict.

The weights dict uses checkpoint names with one tensor per expert (as released checkpoints and
random_init store them); transformers 5 keeps a MoE layer's experts fused, so this is where they are
packed: `mlp.experts.gate_up_proj` [E, 2I, D] (each expert's gate rows, then its up rows) and
`mlp.experts.down_proj` [E, D, I].
"""

from __future__ import annotations

import torch

from qwen3lab.backends.hf import require_transformers


def hf_config(cfg, attn_implementation: str = "eager"):
    """transformers' config object for cfg (built from the config.json we would write)."""
    transformers = require_transformers()
    c = transformers.AutoConfig.for_model(**cfg.to_hf_dict())
    c._attn_implementation = attn_implementation
    return c


def hf_state_dict(cfg, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our per-expert checkpoint names -> transformers-5 parameter names (experts fused per layer)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        if ".mlp.experts." not in name:
            out[name] = t
    for i in range(cfg.num_hidden_layers):
        if not cfg.is_moe_layer(i):
            continue
        p = f"model.layers.{i}.mlp.experts."
        experts = range(cfg.num_experts)
        out[p + "gate_up_proj"] = torch.stack(
            [torch.cat([weights[f"{p}{e}.gate_proj.weight"], weights[f"{p}{e}.up_proj.weight"]], dim=0)
             for e in experts])  # [E, 2I, D]
        out[p + "down_proj"] = torch.stack([weights[f"{p}{e}.down_proj.weight"] for e in experts])  # [E, D, I]
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)  # transformers ties it to the embedding itself
    return out


def hf_model(cfg, weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
             attn_implementation: str = "eager", experts_implementation: str = "eager"):
    """transformers' Qwen3ForCausalLM / Qwen3MoeForCausalLM for cfg, holding exactly `weights`, in eval mode."""
    transformers = require_transformers()
    cls = getattr(transformers, cfg.architecture)
    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation}
    if cfg.is_moe:
        kwargs["experts_implementation"] = experts_implementation
    model = cls._from_config(hf_config(cfg, attn_implementation), **kwargs)
    sd = hf_state_dict(cfg, weights)
    params = dict(model.named_parameters())  # tied lm_head appears once, as the embedding
    missing = sorted(set(params) - set(sd))
    unexpected = sorted(set(sd) - set(params))
    assert not missing and not unexpected, f"missing {missing}, unexpected {unexpected}"
    with torch.no_grad():
        for name, p in params.items():
            assert tuple(p.shape) == tuple(sd[name].shape), (name, p.shape, sd[name].shape)
            p.copy_(sd[name].to(dtype))
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "lm_head not tied"
    return model.eval()
