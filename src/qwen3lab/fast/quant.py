"""Weight-only quantisation, applied to a loaded model from outside (gpt-fast style module swap).

`quantise(model, "int8")`: every projection (q/k/v, o, gate/up, down, experts, lm_head) becomes an Int8Linear:
int8 weights, one float32 scale per output row (max |w| / 127, round to nearest), activations, norms, RoPE,
attention and the KV cache stay in the model dtype, products are accumulated in float32. The embedding stays
in the model dtype (a row gather reads one row per token); a tied lm_head gets its own int8 copy. The MoE
router stays in the model dtype (it decides which experts run). Fused q/k/v (gate/up) are quantised as the
fused tensor and the HF-named modules become row views of it, as for float weights.

The accuracy cost is measured against the float64 oracle by tests/test_fast_verify.py and stated in the README.
"""

from __future__ import annotations

import functools

from torch import nn

from .. import pages
from .linear import FastLinear, Int8Linear

QUANT_MODES = ("int8",)


def _q_mod(mod: nn.Module, ranges, fused: bool = False) -> Int8Linear:
    if isinstance(mod, Int8Linear):
        return mod
    assert isinstance(mod, (nn.Linear, FastLinear)) and getattr(mod, "bias", None) is None, mod
    # a memory-mapped original's file pages are given back block by block as quantised: it is not read again
    # (a tied embedding reads a few rows per step; they fault back in from the file)
    return Int8Linear.from_float(mod.weight, fused=fused, file_ranges=ranges)


def _views(fused: Int8Linear, parts: list[str], owner: nn.Module) -> None:
    """owner.<part> = Int8Linear over rows of the fused int8 weight / scales (views, no copy)."""
    start = 0
    for name in parts:
        n = getattr(owner, name).weight.shape[0]
        setattr(owner, name, Int8Linear(fused.weight[start:start + n], fused.scale[start:start + n]))
        start += n


def quantise(model, mode: str = "int8", file_ranges=None):
    """Replace the model's projection weights by int8 ones in place (see module docstring); returns model."""
    assert mode in QUANT_MODES, mode
    ranges = pages.file_ranges() if file_ranges is None else file_ranges
    _q = functools.partial(_q_mod, ranges=ranges)
    for layer in model.model.layers:
        attn = layer.self_attn
        if attn.qkv_proj is not None:
            attn.qkv_proj = _q(attn.qkv_proj, fused=True)
            _views(attn.qkv_proj, ["q_proj", "k_proj", "v_proj"], attn)
        else:
            attn.q_proj, attn.k_proj, attn.v_proj = _q(attn.q_proj), _q(attn.k_proj), _q(attn.v_proj)
        attn.o_proj = _q(attn.o_proj)
        mlps = [layer.mlp] if not layer.is_moe else list(layer.mlp.experts)
        for mlp in mlps:
            if mlp.gate_up_proj is not None:
                mlp.gate_up_proj = _q(mlp.gate_up_proj, fused=True)
                _views(mlp.gate_up_proj, ["gate_proj", "up_proj"], mlp)
            else:
                mlp.gate_proj, mlp.up_proj = _q(mlp.gate_proj), _q(mlp.up_proj)
            mlp.down_proj = _q(mlp.down_proj)
    model.lm_head = _q(model.lm_head)
    model.quant = mode
    return model
