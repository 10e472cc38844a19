"""`qwen3lab tiny`: build (or load) the tiny model, run it through the oracle, print every step, check it.

Order of the output: the model and its weights; the embedding; for each layer a header ("Layer 0 forward
pass") and its attention and MLP sublayers with every tap printed in full (plus the attention scores
before softmax); the final norm and logits; the stability table; the prediction; then, on request, the
hand-computed walkthrough and the torch-vs-oracle comparison. `--output` writes the JSON results.

`run_tiny_command(**cli_options) -> int` is what the CLI calls; the exit code is 0 when every check
passed (stability, walkthrough, comparison) and 1 when one did not. Bad input raises a Qwen3LabError.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import Qwen3Config
from ..errors import InputError, Qwen3LabError
from ..guards import check_output_dir, check_output_file, write_atomic, write_text_atomic
from ..models.numpy_ref import softmax64
from ..paths import resolve_model_path
from ..taps import split_name
from .compare import compare as cmp
from .compare import torch_candidate
from .config import DEFAULTS, check_model_size, parse_tokens, tiny_config
from .explain import explain as walk
from .forward import oracle, tiny_forward
from .printer import format_tap
from .stability import StabilityReport, check_stability, stats
from .weights import (
    FORMATS,
    INITS,
    checkpoint_tensors,
    init_weights,
    load_checkpoint_weights,
    read_weights,
    write_weights,
)

RULE = "=" * 78
CHECKS_LEGEND = ("checks: every tap: no NaN/Inf, max |x| <= 1e4 (hidden states: RMS growth vs embed); probs: rows "
                 "sum to 1, values in [0, 1], zeros above the causal diagonal, equal to softmax(scores); scores: "
                 "-inf exactly above the diagonal; attn_in, q_norm, k_norm, mlp_in, final_norm: unit RMS before "
                 "the weight; MoE: valid distinct experts, routing weights in [0, 1] summing to 1.")
SIZE_FLAGS = {  # flag -> (Qwen3Config field), for --model consistency checks
    "nlayer": "num_hidden_layers", "d": "hidden_size", "nh": "num_attention_heads", "nkvh": "num_key_value_heads",
    "dh": "head_dim", "di": "intermediate_size", "dctx": "max_position_embeddings", "dvoc": "vocab_size",
    "experts": "num_experts", "topk": "num_experts_per_tok",
}
WHAT = {
    "embed": "rows of model.embed_tokens.weight for the input tokens",
    "attn_in": "input_layernorm(x)",
    "q": "q_proj(attn_in), split into heads", "k": "k_proj(attn_in), split into heads",
    "v": "v_proj(attn_in), split into heads",
    "q_norm": "RMSNorm of each q head, q_norm.weight", "k_norm": "RMSNorm of each k head, k_norm.weight",
    "q_rot": "RoPE applied to q_norm", "k_rot": "RoPE applied to k_norm",
    "scores": "q_rot·k_rot / sqrt(head_dim), causal mask -inf",
    "probs": "softmax(scores): attention weights",
    "attn": "probs · v, per head", "attn_out": "o_proj(attn)", "resid_mid": "x + attn_out",
    "mlp_in": "post_attention_layernorm(resid_mid)",
    "gate": "gate_proj(mlp_in)", "up": "up_proj(mlp_in)", "act": "silu(gate) · up",
    "router_logits": "mlp.gate(mlp_in): one logit per expert", "topk_idx": "chosen experts, best first",
    "topk_weight": "weights of the chosen experts",
    "mlp_out": "MLP output", "resid_post": "resid_mid + mlp_out: the layer output",
    "final_norm": "model.norm(last layer output)", "logits": "lm_head(final_norm)",
}


@dataclass
class TinyResult:
    cfg: object
    weights: dict
    input_ids: list[int]
    source: str
    logits: np.ndarray
    taps: dict[str, np.ndarray]
    stability: StabilityReport
    walkthrough: object | None = None
    comparison: object | None = None
    messages: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.stability.passed and (self.walkthrough is None or self.walkthrough.ok)
                and (self.comparison is None or self.comparison.passed))

    def predictions(self) -> dict:
        last = np.asarray(self.logits[-1], dtype=np.float64)
        p = softmax64(last)
        order = sorted(range(len(p)), key=lambda v: (-p[v] if math.isfinite(p[v]) else math.inf, v))
        best = order[0]
        return {
            "input_tokens": list(self.input_ids),
            "next_token": int(best),
            "probability": _j(float(p[best])),
            "top3": [{"token": int(v), "probability": _j(float(p[v])), "logit": _j(float(last[v]))}
                     for v in order[:3]],
            "argmax_per_position": [int(np.nanargmax(r)) if np.isfinite(r).any() else None
                                    for r in np.asarray(self.logits, dtype=np.float64)],
        }

    def to_json(self) -> dict:
        layer_stats: dict[str, dict] = {"embedding": {}}
        for name, arr in self.taps.items():
            _, layer, site = split_name(name)
            group = "embedding" if name == "embed" else "final" if layer is None else f"layer_{layer}"
            layer_stats.setdefault(group, {})[site if layer is not None else name] = _stat_json(arr)
        out = {
            "config": self.cfg.to_hf_dict(),
            "test_input": {"tokens": list(self.input_ids), "weights": self.source},
            "final_logits": [[_j(float(v)) for v in row] for row in np.asarray(self.logits, dtype=np.float64)],
            "predictions": self.predictions(),
            "layer_statistics": layer_stats,
            "stability": self.stability.to_json(),
        }
        if self.walkthrough is not None:
            out["explain"] = self.walkthrough.to_json()
        if self.comparison is not None:
            out["compare"] = self.comparison.to_json()
        return out


def _j(v: float):
    """JSON has no NaN/Inf: they become null (the stability section counts them)."""
    return v if math.isfinite(v) else None


def _stat_json(arr) -> dict:
    s = stats(arr)
    return {k: s[k] for k in ("shape", "mean", "std", "min", "max")}


# ---- building the model -------------------------------------------------------------------------------
def build_model(sizes: dict, moe: bool, init: str, seed: int, weights_file, model_dir):
    """(cfg, weights, description of where the weights came from)."""
    if model_dir is not None:
        path = resolve_model_path(model_dir)
        cfg = Qwen3Config.from_file(path)
        for flag, v in sizes.items():
            have = getattr(cfg, SIZE_FLAGS[flag])
            if v is not None and v != have:
                raise InputError(f"--{flag} {v} contradicts {path}/config.json ({SIZE_FLAGS[flag]} = {have}); "
                                 f"with --model the sizes come from the checkpoint: drop --{flag}")
        if moe and not cfg.is_moe:
            raise InputError(f"--moe given but {path} is a dense model (model_type {cfg.model_type!r})")
        check_model_size(cfg, str(path))
        if weights_file is not None:
            return cfg, read_weights(weights_file, cfg), f"{weights_file} (config from {path})"
        return cfg, load_checkpoint_weights(path, cfg), f"checkpoint {path}"
    kw = {k: (DEFAULTS[k] if v is None else v) for k, v in sizes.items()}
    cfg = tiny_config(moe=moe, **kw)
    if weights_file is not None:
        return cfg, read_weights(weights_file, cfg), str(weights_file)
    if init not in INITS:
        raise InputError(f"unknown --init {init!r}; choose one of {', '.join(INITS)}")
    return cfg, init_weights(cfg, init, seed), f"--init {init}" + (f" --seed {seed}" if init == "random" else "")


def check_saves(save_weights, save_model_dir) -> None:
    """--save-weights and --save-model checked writable before the model is built (guards.py)."""
    if save_weights is not None:
        check_output_file(save_weights, "--save-weights", FORMATS)
    if save_model_dir is not None:
        out = check_output_dir(save_model_dir, "--save-model")
        if out.is_dir() and any(out.iterdir()) and not _holds_tiny_checkpoint(out):
            raise InputError(f"--save-model {out}: directory is not empty and holds no tiny checkpoint; refusing to "
                             f"overwrite what is there (choose an empty or new directory)")


def _holds_tiny_checkpoint(path: Path) -> bool:
    """A dir an earlier --save-model wrote (its config.json within tiny's sizes): saving again may replace it.
    Anything else (a real checkpoint, unrelated files) is never overwritten."""
    if not (path / "config.json").is_file():
        return False
    try:
        check_model_size(Qwen3Config.from_file(path), str(path))
    except Qwen3LabError:
        return False
    return True


def save_model(out_dir, cfg, weights: dict[str, np.ndarray]) -> Path:
    """A complete HF-layout checkpoint dir (config.json + model.safetensors, float32) via save_checkpoint."""
    import torch  # torch (a second to import) only when a checkpoint is written: the NumPy path stays light

    from ..checkpoint_save import save_checkpoint  # torch, as above

    tensors = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
               for k, v in checkpoint_tensors(weights, cfg).items()}
    return save_checkpoint(out_dir, cfg, tensors, dtype=torch.float32)


def run_tiny(*, d=None, nlayer=None, nh=None, nkvh=None, dh=None, di=None, dvoc=None, dctx=None,
             experts=None, topk=None, tokens=None, moe=False, init="random", seed=0, weights=None,
             save_weights=None, save_model_dir=None, model=None, explain=False, explain_layer=0,
             explain_token=None, explain_channel=0, explain_head=0, compare=None, dtype="float32",
             device="cpu", precision=4, width=80, candidate=None) -> TinyResult:
    """Everything `qwen3lab tiny` computes, without printing. `candidate`: a backend object to compare
    instead of the torch model (tests use a broken one)."""
    if not isinstance(precision, int) or not 0 <= precision <= 12:
        raise InputError(f"--precision must be an integer in 0..12, got {precision!r}")
    check_saves(save_weights, save_model_dir)
    if compare not in (None, "none", "torch") and candidate is None:
        raise InputError(f"--compare {compare!r} is not supported; use --compare torch")
    sizes = dict(nlayer=nlayer, d=d, nh=nh, nkvh=nkvh, dh=dh, di=di, dctx=dctx, dvoc=dvoc)
    if moe or model is not None:
        sizes.update(experts=experts, topk=topk)
    elif experts is not None or topk is not None:
        raise InputError("--experts/--topk need --moe")
    cfg, w, source = build_model(sizes, moe, init, seed, weights, model)
    ids = parse_tokens(tokens, cfg)
    msgs = []
    if save_weights is not None:
        path = write_atomic(save_weights, lambda tmp: write_weights(tmp, w, cfg), "--save-weights")
        msgs.append(f"wrote weights to {path}")
    if save_model_dir is not None:
        path = save_model(save_model_dir, cfg, w)
        msgs.append(f"wrote checkpoint {path} ({', '.join(sorted(p.name for p in path.iterdir()))})")
    run = tiny_forward(cfg, w, ids)
    res = TinyResult(cfg, w, ids, source, run.logits, run.taps, check_stability(cfg, run.taps, w), messages=msgs)
    if explain:
        res.walkthrough = walk(cfg, w, ids, run.taps, layer=explain_layer, token=explain_token,
                               channel=explain_channel, head=explain_head, precision=precision, width=width)
    if candidate is not None or compare == "torch":
        cand = candidate if candidate is not None else torch_candidate(cfg, w, dtype=dtype, device=device)
        res.comparison = cmp(cfg, oracle(cfg, w), cand, ids, precision=precision, width=width)
    return res


# ---- printing -----------------------------------------------------------------------------------------
def render(res: TinyResult, precision: int = 4, width: int = 80) -> str:
    cfg = res.cfg
    out: list[str] = []

    def section(title: str) -> None:
        out.extend(["", RULE, title, RULE])

    def sub(title: str) -> None:
        out.extend(["", f"--- {title} " + "-" * max(3, 74 - len(title))])

    def show(name: str) -> None:
        if name in res.taps:
            site = split_name(name)[2]
            what = WHAT.get(site, "")
            if site == "mlp_out":
                what = "Σ weight · expert(mlp_in), chosen experts" if cfg.is_moe_layer(split_name(name)[1]) \
                    else "down_proj(act)"
            out.append("")
            out.append(format_tap(name, res.taps[name], precision=precision, width=width, what=what))

    kind = f"Qwen3-MoE ({cfg.num_experts} experts, top-{cfg.num_experts_per_tok})" if cfg.is_moe else "Qwen3 (dense)"
    mlp = cfg.moe_intermediate_size if cfg.is_moe else cfg.intermediate_size
    out.append(f"qwen3lab tiny: {kind}")
    out.append(f"  layers {cfg.num_hidden_layers}, hidden {cfg.hidden_size}, heads {cfg.num_attention_heads} "
               f"(kv {cfg.num_key_value_heads}), head_dim {cfg.head_dim}, MLP {mlp}, vocab {cfg.vocab_size}, "
               f"context {cfg.max_position_embeddings}")
    out.append(f"  rms_norm_eps {cfg.rms_norm_eps:g}, rope_theta {cfg.rope_theta:g}, "
               f"lm_head {'tied' if cfg.tie_word_embeddings else 'untied'}")
    out.append(f"  weights: {res.source}")
    out.append("  computed by: the NumPy float64 oracle (qwen3lab.models.numpy_ref)")
    out.append(f"  input tokens: {res.input_ids} (matrix rows t0..t{len(res.input_ids) - 1})")
    out.extend(f"  {m}" for m in res.messages)

    section("Embedding")
    show("embed")
    for i in range(cfg.num_hidden_layers):
        section(f"Layer {i} forward pass")
        sub(f"Layer {i} attention")
        for site in ("attn_in", "q", "k", "v", "q_norm", "k_norm", "q_rot", "k_rot", "scores", "probs", "attn",
                     "attn_out", "resid_mid"):
            show(f"layers.{i}.{site}")
        sub(f"Layer {i} MLP" + (" (mixture of experts)" if cfg.is_moe_layer(i) else ""))
        for site in ("mlp_in", "gate", "up", "act", "router_logits", "topk_idx", "topk_weight", "mlp_out",
                     "resid_post"):
            show(f"layers.{i}.{site}")
    section("Final norm and LM head")
    show("final_norm")
    show("logits")

    section("Numerical stability")
    out.append(_stability_table(res.stability, precision))

    section("Prediction")
    p = res.predictions()
    out.append(f"input tokens: {p['input_tokens']}")
    pr = p["probability"]
    out.append(f"predicted next token: {p['next_token']} (probability "
               f"{'nan' if pr is None else f'{pr:.{precision}f}'})")
    out.append("top-3: " + ", ".join(
        f"{t['token']} (p {'nan' if t['probability'] is None else format(t['probability'], f'.{precision}f')})"
        for t in p["top3"]))
    out.append("argmax after each position: " + ", ".join(
        f"t{i} → {v}" for i, v in enumerate(p["argmax_per_position"])))

    if res.walkthrough is not None:
        section("Hand-computed walkthrough (--explain)")
        out.append(res.walkthrough.text())
    if res.comparison is not None:
        section("Compare (--compare)")
        out.append(res.comparison.text)

    out.append("")
    out.append(_summary(res))
    return "\n".join(out)


def _num(v, precision: int) -> str:
    if v is None:
        return "-"
    return f"{v:.{precision}f}" if abs(v) < 1e5 else f"{v:.{max(precision - 2, 1)}e}"


def _stability_table(rep: StabilityReport, precision: int) -> str:
    nw = max(len(t.name) for t in rep.taps)
    cw = max(9, precision + 6)
    lines = [f"{'tap':<{nw}} " + " ".join(f"{h:>{cw}}" for h in ("mean", "std", "min", "max")) + "  verdict"]
    for t in rep.taps:
        lines.append(f"{t.name:<{nw}} " + " ".join(_num(v, precision).rjust(cw) for v in (t.mean, t.std, t.min, t.max))
                     + f"  {t.verdict}")
    lines.append("")
    lines.extend(textwrap.wrap(CHECKS_LEGEND, 78, subsequent_indent="  "))
    for t in rep.taps:
        for msg in t.problems:
            lines.append(f"FAIL {t.name}: {msg}")
        for msg in t.warnings:
            lines.append(f"warn {t.name}: {msg}")
    fails = rep.failures()
    warns = sum(len(t.warnings) for t in rep.taps)
    lines.append((f"stability: all {len(rep.taps)} taps pass" if not fails else
                  f"stability: {len(fails)} tap(s) FAIL; the first in dataflow order is {fails[0].name}")
                 + (f" ({warns} warning{'s' if warns > 1 else ''})" if warns else ""))
    return "\n".join(lines)


def _summary(res: TinyResult) -> str:
    parts = ["stability " + ("passed" if res.stability.passed else "FAILED")]
    if res.walkthrough is not None:
        parts.append(f"explain {res.walkthrough.passed}/{len(res.walkthrough.checks)} checks passed")
    if res.comparison is not None:
        c = res.comparison
        parts.append("compare " + ("passed" if c.passed else f"FAILED at {c.first_divergence}"))
    return "summary: " + "; ".join(parts)


# ---- the command ------------------------------------------------------------------------------------------
def run_tiny_command(*, d=None, nlayer=None, nh=None, nkvh=None, dh=None, di=None, dvoc=None, dctx=None,
                     tokens=None, moe=False, experts=None, topk=None, init="random", seed=0, weights=None,
                     save_weights=None, save_model=None, model=None, explain=False, explain_layer=0,
                     explain_token=None, explain_channel=0, explain_head=0, compare=None, dtype="float32",
                     device="cpu", output=None, precision=4, width=80, out=None) -> int:
    """`qwen3lab tiny`: print every step of the tiny model; 0 when every check passed, else 1.

    Size flags left as None take the tiny defaults (or, with `model`, the checkpoint's sizes)."""
    stream = out or sys.stdout
    if output is not None:  # before the run: a path that cannot be written costs nothing
        output = check_output_file(output, "--output")
    res = run_tiny(d=d, nlayer=nlayer, nh=nh, nkvh=nkvh, dh=dh, di=di, dvoc=dvoc, dctx=dctx, experts=experts,
                   topk=topk, tokens=tokens, moe=moe, init=init, seed=seed, weights=weights,
                   save_weights=save_weights, save_model_dir=save_model, model=model, explain=explain,
                   explain_layer=explain_layer, explain_token=explain_token, explain_channel=explain_channel,
                   explain_head=explain_head, compare=compare, dtype=dtype, device=device,
                   precision=precision, width=width)
    print(render(res, precision=precision, width=width), file=stream)
    if output is not None:
        path = write_text_atomic(output, json.dumps(res.to_json(), indent=2, allow_nan=False) + "\n", "--output")
        print(f"wrote {path}", file=stream)
    return 0 if res.ok else 1
