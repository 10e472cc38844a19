"""HuggingFace transformers as a qwen3lab backend: the peer reference, through forward hooks.

transformers is an optional dependency (`pip install 'qwen3lab[hf]'`), imported only when used.
Taps come from hooks on the model's own modules, so what is measured is transformers' code as is:
- module outputs: embed_tokens, input_layernorm (attn_in), q/k/v_proj (split per head), q_norm, k_norm,
  o_proj (attn_out), post_attention_layernorm (mlp_in), gate_proj/up_proj, the MLP / MoE block (mlp_out),
  the decoder layer (resid_post), the final norm, lm_head (logits); the MoE router's
  (router_logits, topk_weight, topk_idx) output tuple;
- module inputs: o_proj's (attn, per head), down_proj's (act), post_attention_layernorm's (resid_mid);
- q_rot / k_rot: the modeling module's `apply_rotary_pos_emb` is wrapped while a run is under way;
- probs: the attention weights eager attention returns (only with attn_implementation="eager").
`run_decode` prefills and then feeds one token per step through transformers' own KV cache, so HF can be
a KV-cache candidate as well as a reference.

Graft (each op consumes the reference's input) works by hooks returning the reference's value:
- grafted fully: embed, attn_in, q, k, v, q_norm, k_norm, q_rot, k_rot, attn, attn_out, mlp_in, gate, up,
  act, topk_idx, topk_weight, mlp_out, resid_post, final_norm, logits;
- resid_mid: grafted into post_attention_layernorm's input only; the layer's second residual add keeps
  transformers' own sum (of the grafted layer input and grafted attn_out, i.e. the reference's inputs);
- recorded but never grafted: probs (made and consumed inside the attention function) and router_logits
  (softmax and top-k run inside the same router forward).
HF in float64 still builds RMSNorm and the RoPE tables in float32, so ~2e-7 relative is its floor.
The model's parameters are checked against the config (check.check_weight_shapes: a transformers model built
from another config is refused, naming the tensor) and its taps go through the shared check (check.TapCheck).
"""

from __future__ import annotations

import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

from .. import taps as _taps
from ..config import Qwen3Config
from ..errors import InputError, MissingDependencyError, WeightsError
from ..models.base import RunResult, check_input_ids
from ..taps import dataflow_key, record_only, tap, to_numpy
from .check import TapCheck, check_weight_shapes

DTYPES = ("float64", "float32", "bfloat16", "float16")
NOT_GRAFTABLE = ("probs", "router_logits")


def require_transformers():
    try:
        import transformers
    except ImportError as e:
        raise MissingDependencyError(
            f"the hf backend needs HuggingFace transformers, which is not importable ({e}); "
            "install it with: pip install 'qwen3lab[hf]'"
        ) from None
    return transformers


def _torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise InputError(f"hf backend dtype {dtype!r} is not supported; use one of {DTYPES}")
    return getattr(torch, dtype)


class HFBackend:
    """transformers' Qwen3ForCausalLM / Qwen3MoeForCausalLM behind `.run(input_ids, taps, graft)`.

    `model_path_or_model`: a checkpoint directory (loaded with AutoModelForCausalLM.from_pretrained, in
    `dtype`, default float32) or an already built transformers model (kept in its own dtype and device
    unless `dtype` / `device` are given). Experts run transformers' eager loop, so numbers are its own.
    """

    name = "hf"

    def __init__(self, model_path_or_model, dtype: str | None = None, device: str | None = None,
                 attn_implementation: str = "eager", experts_implementation: str = "eager"):
        import torch

        if isinstance(model_path_or_model, (str, Path)):
            path = Path(model_path_or_model)
            self.cfg = Qwen3Config.from_file(path)
            transformers = require_transformers()
            kwargs = {"dtype": _torch_dtype(dtype or "float32"), "attn_implementation": attn_implementation}
            if self.cfg.model_type == "qwen3_moe":
                kwargs["experts_implementation"] = experts_implementation
            hf_logging = transformers.utils.logging
            bar = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # qwen3lab's own progress display owns the terminal
            try:
                model = transformers.AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
            except (OSError, ValueError, RuntimeError) as e:
                raise WeightsError(f"{path}: transformers could not load the checkpoint: {e}") from None
            finally:
                if bar:
                    hf_logging.enable_progress_bar()
            model.to(device or "cpu")
        else:
            require_transformers()
            model = model_path_or_model
            self.cfg = Qwen3Config.from_dict(model.config.to_dict(), source=f"{type(model).__name__}.config")
            if dtype is not None:
                model.to(_torch_dtype(dtype))
            if device is not None:
                model.to(device)
        check_weight_shapes(self.cfg, {k: tuple(p.shape) for k, p in model.named_parameters()},
                            f"hf backend ({type(model).__name__})")
        self.check = TapCheck(self.cfg, "hf")
        self.model = model.eval()
        self.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.device = next(model.parameters()).device
        self._torch = torch

    # ---- running -----------------------------------------------------------------------------------
    def run(self, input_ids, taps=None, graft=None) -> RunResult:
        """Logits [T, V] and the selected taps (None: none; "all"; or names/patterns). With `graft`, the
        reference's taps replace transformers' values where hooks allow (module docstring); all taps are
        recorded unless `taps` says otherwise."""
        ids = check_input_ids(input_ids, self.cfg)
        return self._run(ids, 0, taps, graft)

    def run_decode(self, input_ids, decode_steps: int, taps=None, graft=None) -> RunResult:
        """Prefill the first T - decode_steps tokens, then feed the rest one per step through transformers'
        KV cache (DynamicCache). Step j's taps are prefixed `step{j}.` ([1, ...]; probs [Hq, 1, S])."""
        ids = check_input_ids(input_ids, self.cfg)
        if isinstance(decode_steps, bool) or not isinstance(decode_steps, int) or not 0 <= decode_steps < len(ids):
            raise InputError(f"decode_steps must be an integer in 0..{len(ids) - 1} (one prefill token at least) "
                             f"for {len(ids)} input ids, got {decode_steps!r}")
        return self._run(ids, decode_steps, taps, graft)

    def _run(self, ids: np.ndarray, decode_steps: int, taps, graft) -> RunResult:
        torch = self._torch
        x = torch.as_tensor(ids, device=self.device)[None]  # [1, T]
        P = x.shape[1] - decode_steps
        names = taps if (taps is not None or graft is None) else "all"
        if graft is not None:
            session = _taps.graft(graft, names=names)
        elif names is not None:
            session = _taps.record(names)
        else:
            session = None
        with ExitStack() as stack:
            rec = stack.enter_context(session) if session is not None else None
            if rec is not None:
                stack.enter_context(self._hooks())
            stack.enter_context(torch.no_grad())
            out = self.model(input_ids=x[:, :P], use_cache=decode_steps > 0)
            logits = [out.logits[0]]  # [P, V]
            for j in range(decode_steps):
                if rec is not None:
                    rec.prefix = f"step{j}."
                out = self.model(input_ids=x[:, P + j: P + j + 1], past_key_values=out.past_key_values,
                                 use_cache=True)
                logits.append(out.logits[0])  # [1, V]
        logits_np = to_numpy(torch.cat(logits, dim=0))  # [T, V]
        if rec is None:
            return RunResult(logits_np)
        # hooks fire in call order (probs after attn_out); hand taps back in dataflow order
        taps = self.check.all(rec.taps, x.shape[1], decode_steps)
        return RunResult(logits_np, dict(sorted(taps.items(), key=lambda kv: dataflow_key(kv[0]))))

    @contextmanager
    def _hooks(self):
        """Forward hooks on every tap site, and apply_rotary_pos_emb wrapped, for the duration of a run."""
        cfg, m = self.cfg, self.model
        Hq, Hkv, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        state = {"layer": None}  # which layer's attention is running (for the RoPE wrapper)
        with ExitStack() as stack:
            def on(module, hook):
                stack.callback(module.register_forward_hook(hook).remove)

            def pre(module, hook):
                stack.callback(module.register_forward_pre_hook(hook).remove)

            on(m.model.embed_tokens, _out("embed"))
            for i, layer in enumerate(m.model.layers):
                n, attn = f"layers.{i}", layer.self_attn
                on(layer.input_layernorm, _out(f"{n}.attn_in"))
                on(attn.q_proj, _out(f"{n}.q", heads=(Hq, Dh)))
                on(attn.k_proj, _out(f"{n}.k", heads=(Hkv, Dh)))
                on(attn.v_proj, _out(f"{n}.v", heads=(Hkv, Dh)))
                on(attn.q_norm, _out(f"{n}.q_norm"))
                on(attn.k_norm, _out(f"{n}.k_norm"))
                pre(attn, _set_layer(state, i))
                on(attn, _probs(f"{n}.probs"))
                pre(attn.o_proj, _in(f"{n}.attn", heads=(Hq, Dh)))
                on(attn.o_proj, _out(f"{n}.attn_out"))
                pre(layer.post_attention_layernorm, _in(f"{n}.resid_mid"))
                on(layer.post_attention_layernorm, _out(f"{n}.mlp_in"))
                if cfg.is_moe_layer(i):
                    assert hasattr(layer.mlp, "experts"), f"layer {i} should be a MoE block"
                    on(layer.mlp.gate, _router(n))
                else:
                    on(layer.mlp.gate_proj, _out(f"{n}.gate"))
                    on(layer.mlp.up_proj, _out(f"{n}.up"))
                    pre(layer.mlp.down_proj, _in(f"{n}.act"))
                on(layer.mlp, _out(f"{n}.mlp_out"))
                on(layer, _out(f"{n}.resid_post"))
            on(m.model.norm, _out("final_norm"))
            on(m.lm_head, _out("logits"))

            # Each modeling module calls its own global apply_rotary_pos_emb: wrap it there for this run.
            for mod in {sys.modules[type(layer.self_attn).__module__] for layer in m.model.layers}:
                orig = mod.apply_rotary_pos_emb
                mod.apply_rotary_pos_emb = _rope_wrapper(orig, state)
                stack.callback(setattr, mod, "apply_rotary_pos_emb", orig)
            yield


# ---- hook factories ----------------------------------------------------------------------------------
# Module tensors have a batch of one: [1, T, ...]. Taps see [T, ...] views split per head where the site is;
# whatever tap() hands back (the reference under graft) is reshaped to the module's tensor.
def _canon(x, heads):
    v = x[0]
    return v if heads is None else v.unflatten(-1, heads)


def _swap(name: str, x, heads=None):
    """tap() the canonical view of x; None when nothing replaced it, else the replacement shaped like x."""
    view = _canon(x, heads)
    y = tap(name, view)
    return None if y is view else y.reshape(x.shape)


def _out(name: str, heads=None):
    def hook(module, args, output):
        if isinstance(output, tuple):  # older decoder layers return (hidden_states, ...)
            y = _swap(name, output[0], heads)
            return None if y is None else (y, *output[1:])
        return _swap(name, output, heads)
    return hook


def _in(name: str, heads=None):
    def hook(module, args):
        y = _swap(name, args[0], heads)
        return None if y is None else (y, *args[1:])
    return hook


def _set_layer(state: dict, i: int):
    def hook(module, args):
        state["layer"] = i
    return hook


def _probs(name: str):
    def hook(module, args, output):
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is not None:  # only eager attention returns them: [1, Hq, T, S]
            record_only(name, weights[0])
    return hook


def _router(n: str):
    def hook(module, args, output):
        logits, weights, idx = output  # [T, E], [T, K], [T, K]: batch already flattened into T
        record_only(f"{n}.router_logits", logits)
        new_idx = tap(f"{n}.topk_idx", idx)
        new_w = tap(f"{n}.topk_weight", weights)
        if new_idx is idx and new_w is weights:
            return None
        return logits, new_w, new_idx
    return hook


def _rope_wrapper(orig, state: dict):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        q_embed, k_embed = orig(q, k, cos, sin, *args, **kwargs)  # [1, H, T, Dh] each
        i = state["layer"]
        if i is None:
            return q_embed, k_embed
        out = []
        for site, x in (("q_rot", q_embed), ("k_rot", k_embed)):
            view = x[0].transpose(0, 1)  # [T, H, Dh]
            y = tap(f"layers.{i}.{site}", view)
            out.append(x if y is view else y.transpose(0, 1)[None].contiguous())
        return out[0], out[1]
    return apply_rotary_pos_emb


__all__ = ["HFBackend", "MissingDependencyError", "NOT_GRAFTABLE", "require_transformers"]
