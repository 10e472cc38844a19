"""The layers a micro-benchmark times, ours and HuggingFace's, built from ONE weight dict.

Notable:
- weights come from random_init (seeded per tensor name, so a tensor does not depend on the layer count)
  for a one-layer copy of the config with a tiny vocabulary: only the layer's tensors are made, never a
  30B model's embedding or other layers;
- ours: qwen3lab.models.torch_model's Qwen3Attention / Qwen3MoeBlock, built on the meta device and given
  the tensors by name (HF names), so no random init is paid twice;
- HF: transformers' Qwen3Attention / Qwen3MoeAttention / Qwen3MoeSparseMoeBlock from the same config
  (`cfg.to_hf_dict()`), with the same tensors; HF's MoE experts are stored fused ([E, 2I, D] gate|up,
  [E, D, I] down), so ours' per-expert tensors are concatenated for it. The attention / experts
  implementation is what a full HF model picks by default (sdpa, grouped_mm) unless told otherwise.
"""

from __future__ import annotations

import torch

from ..config import Qwen3Config
from ..errors import ConfigError, InputError
from ..models.torch_model import SITES, Qwen3Attention, Qwen3MoeBlock
from ..random_init import random_weights
from .choices import HF_ATTN_IMPLS, HF_EXPERTS_IMPLS


def one_layer_config(cfg: Qwen3Config, moe: bool = False) -> Qwen3Config:
    """A one-layer copy of cfg with a tiny vocabulary; with moe=True its only layer is a MoE layer."""
    if moe and not cfg.is_moe:
        raise ConfigError(f"{cfg.source}: the MoE bench needs a qwen3_moe config (num_experts > 0), "
                          f"got model_type {cfg.model_type!r}")
    changes = {"num_hidden_layers": 1, "vocab_size": 16}
    if moe:
        changes.update(decoder_sparse_step=1, mlp_only_layers=[])
    elif cfg.is_moe:
        # the attention bench does not need 128 experts' tensors
        changes.update(num_experts=1, num_experts_per_tok=1, moe_intermediate_size=1, mlp_only_layers=[])
    elif cfg.intermediate_size > 1:
        changes.update(intermediate_size=1)
    return cfg.replace(**changes)


def layer_state(cfg: Qwen3Config, part: str, seed: int, dtype: torch.dtype, device: torch.device,
                moe: bool = False) -> dict[str, torch.Tensor]:
    """Layer 0's tensors under `model.layers.0.{part}.` with that prefix removed (part: self_attn | mlp)."""
    one = one_layer_config(cfg, moe=moe)
    prefix = f"model.layers.0.{part}."
    full = random_weights(one, seed=seed, dtype=torch.float32)
    out = {k[len(prefix):]: v.to(device=device, dtype=dtype) for k, v in full.items() if k.startswith(prefix)}
    del full
    assert out, prefix
    return out


def _assign(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    assert not missing and not unexpected, (missing, unexpected)
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


# ---- ours ------------------------------------------------------------------------------------------
def our_attention(cfg: Qwen3Config, state: dict[str, torch.Tensor]) -> torch.nn.Module:

    with torch.device("meta"):
        mod = Qwen3Attention(cfg, 0)
    return _assign(mod, state)


def our_moe_block(cfg: Qwen3Config, state: dict[str, torch.Tensor]) -> torch.nn.Module:

    with torch.device("meta"):
        mod = Qwen3MoeBlock(cfg)
    return _assign(mod, state)


def tap_names(layer: int = 0) -> dict[str, str]:
    """The site -> tap-name mapping a layer's modules are called with (as Qwen3DecoderLayer builds it)."""

    return {s: f"layers.{layer}.{s}" for s in SITES}


# ---- HuggingFace -----------------------------------------------------------------------------------
def require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise InputError("the HF peer needs transformers (pip install 'qwen3lab[hf]'); or pass --no-hf") from None


def hf_config(cfg: Qwen3Config, attn_impl: str = "sdpa", experts_impl: str = "grouped_mm"):
    require_transformers()
    if attn_impl not in HF_ATTN_IMPLS:
        raise InputError(f"--hf-attn {attn_impl!r}: choose one of {', '.join(HF_ATTN_IMPLS)}")
    if experts_impl not in HF_EXPERTS_IMPLS:
        raise InputError(f"--hf-experts {experts_impl!r}: choose one of {', '.join(HF_EXPERTS_IMPLS)}")
    from transformers import Qwen3Config as HFQwen3Config
    from transformers import Qwen3MoeConfig

    d = cfg.to_hf_dict()
    hcfg = Qwen3MoeConfig(**d) if cfg.model_type == "qwen3_moe" else HFQwen3Config(**d)
    hcfg._attn_implementation = attn_impl
    if cfg.model_type == "qwen3_moe":
        hcfg._experts_implementation = experts_impl
    return hcfg


def hf_attention(cfg: Qwen3Config, state: dict[str, torch.Tensor], attn_impl: str = "sdpa"):
    """(HF attention module for layer 0, HF rotary embedding module, HF config)."""
    hcfg = hf_config(cfg, attn_impl=attn_impl)
    if cfg.model_type == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeAttention as Attn
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRotaryEmbedding as Rotary
    else:
        from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention as Attn
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding as Rotary
    with torch.device("meta"):
        mod = Attn(hcfg, layer_idx=0)
    mod = _assign(mod, dict(state))
    device = next(iter(state.values())).device
    return mod, Rotary(hcfg).to(device), hcfg


def hf_moe_block(cfg: Qwen3Config, state: dict[str, torch.Tensor], experts_impl: str = "grouped_mm"):
    """HF's Qwen3MoeSparseMoeBlock holding ours' per-expert tensors in its fused layout."""
    hcfg = hf_config(cfg, experts_impl=experts_impl)
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    E = cfg.num_experts
    gate_up = torch.stack([torch.cat([state[f"experts.{e}.gate_proj.weight"], state[f"experts.{e}.up_proj.weight"]])
                           for e in range(E)])  # [E, 2I, D]: gate rows first, as HF's chunk(2) expects
    down = torch.stack([state[f"experts.{e}.down_proj.weight"] for e in range(E)])  # [E, D, I]
    with torch.device("meta"):
        mod = Qwen3MoeSparseMoeBlock(hcfg)
    return _assign(mod, {"gate.weight": state["gate.weight"], "experts.gate_up_proj": gate_up,
                         "experts.down_proj": down}), hcfg
