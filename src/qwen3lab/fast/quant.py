"""Weight-only quantisation, applied to a loaded model from outside (gpt-fast style module swap).

`quantise(model, "int8")`: every projection (q/k/v, o, gate/up, down, experts, lm_head) becomes an Int8Linear:
int8 weights, one float32 scale per output row (max |w| / 127, round to nearest), activations, norms, RoPE,
attention and the KV cache stay in the model dtype, products are accumulated in float32. The embedding stays
in the model dtype (a row gather reads one row per token); a tied lm_head gets its own int8 copy. The MoE
router stays in the model dtype (it decides which experts run). Fused q/k/v (gate/up) are quantised as the
fused tensor and the HF-named modules become row views of it, as for float weights.

`quantise(model, "int4", group_size=128)`: the same projections become Int4Linear: symmetric int4 with one
float32 scale per group of `group_size` (32 or 128) weights along K, llama.cpp Q4_0's scale rule and nibble
layout (linear.py's Int4Linear says exactly); everything else as for int8, fused tensors' views slicing rows of
both the packed weight and the scales. model.group_size records the group size.

The accuracy cost is measured against the float64 oracle by tests/test_fast_verify.py and stated in the README.
"""

from __future__ import annotations

import functools

from torch import nn

from .. import pages
from ..runspec import QUANTS, default_group
from .linear import INT4_GROUPS, FastLinear, Int4Linear, Int8Linear, check_int4_group

QUANT_MODES = QUANTS  # runspec.py's table: what RunSpec offers is what quantise does


def _q_mod(mod: nn.Module, ranges, fused: bool = False, mode: str = "int8", group_size: int = 128) -> nn.Module:
    cls = Int8Linear if mode == "int8" else Int4Linear
    if isinstance(mod, cls):
        return mod
    assert isinstance(mod, (nn.Linear, FastLinear)) and getattr(mod, "bias", None) is None, mod
    # a memory-mapped original's file pages are given back block by block as quantised: it is not read again
    # (a tied embedding reads a few rows per step; they fault back in from the file)
    if mode == "int8":
        return Int8Linear.from_float(mod.weight, fused=fused, file_ranges=ranges)
    return Int4Linear.from_float(mod.weight, group_size, fused=fused, file_ranges=ranges)


def _views(fused: nn.Module, parts: list[str], owner: nn.Module) -> None:
    """owner.<part> = Int8Linear / Int4Linear over rows of the fused quantised weight and its scales (views, no
    copy)."""
    start = 0
    for name in parts:
        n = getattr(owner, name).weight.shape[0]
        setattr(owner, name, fused.rows(start, n))
        start += n


def int4_group(model) -> int | None:
    """The default int4 group size for `model` (runspec.default_group over every projection's K); None when
    none fits (quantise then names the weight)."""
    return default_group(mod.weight.shape[1] for mod in _linears(model))


def _linears(model):
    return [mod for mod in model.modules() if isinstance(mod, (nn.Linear, FastLinear))]


def quantise(model, mode: str = "int8", file_ranges=None, group_size: int | None = None, before_layer=None):
    """Replace the model's projection weights by int8 / int4 ones in place (see module docstring); returns model.
    group_size: int4's group along K (32 or 128; it must divide every projection's K, else InputError); None:
    int4_group(model), 128 for every Qwen3 checkpoint. before_layer(layer): run on each decoder layer just before
    it is quantised (fast.optimize fuses its projections there)."""
    assert mode in QUANT_MODES, mode
    if mode == "int4" and group_size is None:
        group_size = int4_group(model) or max(INT4_GROUPS)
    if mode == "int4":  # every shape checked before any module is replaced: no half-quantised model on error
        for mod in _linears(model):
            check_int4_group(mod.weight.shape, group_size)
    ranges = pages.file_ranges() if file_ranges is None else file_ranges
    _q = functools.partial(_q_mod, ranges=ranges, mode=mode, group_size=group_size)
    for layer in model.model.layers:
        if before_layer is not None:
            before_layer(layer)
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
    if mode == "int4":
        model.group_size = group_size
    return model
