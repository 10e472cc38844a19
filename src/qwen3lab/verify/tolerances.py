"""Pass/fail thresholds: defaults per candidate dtype, the `simple` preset, and flag overrides.

A tap passes when cosine >= cos_min, relative error <= rel_max, MSE <= mse_max (when set), it has no
NaN/Inf the reference lacks, and (topk_idx) the fraction of tokens whose expert set matches the
reference's, or differs only at a near tie (metrics.py), is >= topk_match_min (1: every token).
MSE is scale-dependent (logits are large, embeddings small), so the per-dtype
defaults leave it unset and rely on relative error and cosine; the `simple` preset sets all three.

The per-dtype numbers were calibrated by measurement: torch (each dtype) against the NumPy float64 oracle,
Qwen3-0.6B shapes with random weights, 32 random tokens, worst tap of the run (4 layers / 28 layers):
- float64: 3.8e-15 / 5.0e-15 relative. The threshold 1e-9 is far above that and far below what an
  epsilon in the wrong place does (RMSNorm eps 1e-5 instead of 1e-6: ~1e-5 relative; x/(rms+eps) instead
  of x*rsqrt(ms+eps): ~2e-5), both caught (tests/test_verify_bugzoo.py).
- float32: 1.6e-6 / 2.2e-6 (1 - cosine 2.3e-12): threshold 1e-4 relative, 1 - 1e-8 cosine.
- float16: 2.0e-3 / 3.1e-3 (1 - cosine 4.9e-6): threshold 0.03, cosine 0.999.
- bfloat16: 1.6e-2 / 2.6e-2 (1 - cosine 3.3e-4): threshold 0.08, cosine 0.995. MoE with 64-128 experts,
  top-8, routing pinned at near ties (routing.py): worst 1.9e-2 (bf16), 2.8e-3 (fp16).
- int8 (weight-only int8, per-row scales: `torch-fast --dtype int8`, whatever its activation dtype): its own
  row, looser than bfloat16. Rounding a weight to one of 255 steps of its row's max |w| costs about 8x what
  bfloat16's mantissa does per weight, and the bfloat16 thresholds raised false alarms on correct int8 runs.
  Measured on Qwen3-0.6B shapes, 28 layers, with 2-4 decode steps: worst 0.069 (7 tokens), 0.073 (128
  random tokens), 0.079-0.081 (a 75-token paragraph), 1 - cosine at most 3.1e-3; bfloat16 on the same
  paragraph 0.030. Threshold 0.12, cosine 0.99: 1.5x the worst relative error seen, and still tight enough
  that every planted bug bfloat16 catches is caught at it (softmax scale 1/sqrt(hidden) on the zoo's small
  model is lost from 0.15 up).
- int4 (weight-only int4, Q4_0-style groups of 128 with float32 scales: `torch-fast --dtype int4`): rounding
  a weight to one of 16 steps of its group's largest |w| costs ~0.10 relative error per matmul on random
  Gaussian weights (measured: layer 0's q/k/v taps 0.102-0.105, the textbook step/sqrt(12) figure), and a
  random 28-layer model amplifies it: worst 0.75 (7 tokens) and 0.82 (a 75-token paragraph), 2 decode steps,
  1 - cosine up to 0.29, at the late layers' mlp_out. Threshold 1.2 relative, cosine 0.5: 1.5x the worst
  seen. That is loose by nature; to check an int4 port's arithmetic rather than the format's loss, verify it
  against the oracle on the same quantised weights (`--quantised-reference`), at its activations' tolerance.
- q8_0 / q4_0 / q4_k (ggml block formats, a dump's `dtype`): measured with NumPy emulations of the formats
  (weights in blocks of 32 along the input dim, every matmul's activations quantised as ggml's CPU dot
  products do), the oracle's code in float32, Qwen3-0.6B shapes, 4 layers, 16 random tokens
  (`benchmarks/calibrate_block_formats.py`): q8_0 clean 0.038 (1 - cosine 7.2e-4), ffn_down x1.1 0.105, q_norm
  weight -> 1 0.120. Then llama.cpp's real Q8_0 at all 28 layers (`benchmarks/calibrate_llama_cpp.py /tmp/q06
  --dtype int8`: llama.cpp as the candidate, GGUF by its own converter and llama-quantize, 2 decode steps, two
  inputs, f16 and f32 KV cache): clean worst 0.066 (1 - cosine 2.2e-3, the late layers' mlp_out), the same
  bugs planted before conversion 0.107 (ffn_down x1.1: 1 - cosine 5.2e-4, a scale only the relative error
  sees) and 0.102 (q_norm -> 1: 1 - cosine 5.1e-3). Threshold 0.085 relative, 1 - 3.5e-3 cosine: between
  the clean runs and the bugs on both measures. q4_0 clean 0.44 and q4_k (emulated as 4-bit blocks of 32 with scale
  and min) 0.38, a 10% bug adding ~0.01: nothing between; they take int4's row (1.2, cosine 0.5), measured
  at 28 layers on a coarser format. Check a q4 port's arithmetic with the oracle on the same weights instead.
- KV cache in lower precision than the compute (`kv_dtype` in dump metadata, `--kv-dtype`; llama.cpp's
  default is an f16 cache with f32 compute): K and V rounded to the cache dtype before attention, float32
  compute, against float64, Qwen3-0.6B shapes (4 layers) and tiny-moe, 32 tokens: f16 3.8e-4 at the
  attention taps and 5.7e-4 after them (every later tap inherits it; 1 - cosine 1.6e-7); bf16 3.1e-3 /
  4.6e-3 (1 - cosine 1.1e-5); llama.cpp measured 1.5e-4 (f16, layers.0.probs). So the cache's tolerance
  (float16: 2e-3, 1 - 1e-6; bfloat16: 0.015, 1 - 5e-5) applies from the first tap that reads the cache
  (layers.0.probs) on, where it is looser than the compute's; the taps before it (embed, layer 0's
  projections, norms and RoPE) keep the compute's. In the isolated run only the taps that read the cache
  (probs, attn, attn_out) get it: every other op there ran on the reference's inputs.
Every planted bug but the RMSNorm-epsilon one is still caught at float32 and bfloat16 thresholds.
An unknown dtype label is an error that lists the known ones.
When the reference is itself lower precision than float64, the looser of the two dtypes applies.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..backends.dtypes import ALIASES as _ALIASES
from ..backends.dtypes import normalize_dtype
from ..errors import Qwen3LabError
from ..taps import split_name
from .metrics import TapMetrics


@dataclass(frozen=True)
class Tolerance:
    cos_min: float
    rel_max: float
    mse_max: float | None = None
    topk_match_min: float = 1.0
    name: str = "custom"
    kv: Tolerance | None = None  # the KV cache's, for the taps downstream of it (module docstring)
    bands: dict | None = None  # {tap: Tolerance} from --band (band.py); taps not in it keep these thresholds

    def to_dict(self) -> dict:
        return {"name": self.name, "cos_min": self.cos_min, "rel_max": self.rel_max, "mse_max": self.mse_max,
                "topk_match_min": self.topk_match_min, "kv": self.kv.to_dict() if self.kv else None,
                "band": {k: {"rel_max": v.rel_max, "cos_min": v.cos_min} for k, v in (self.bands or {}).items()}}


DTYPE_DEFAULTS: dict[str, Tolerance] = {
    "float64": Tolerance(cos_min=1 - 1e-12, rel_max=1e-9, name="float64"),
    "float32": Tolerance(cos_min=1 - 1e-8, rel_max=1e-4, name="float32"),
    "float16": Tolerance(cos_min=0.999, rel_max=0.03, name="float16"),
    "bfloat16": Tolerance(cos_min=0.995, rel_max=0.08, name="bfloat16"),
    "int8": Tolerance(cos_min=0.99, rel_max=0.12, name="int8"),
    "int4": Tolerance(cos_min=0.5, rel_max=1.2, name="int4"),
    "q8_0": Tolerance(cos_min=1 - 3.5e-3, rel_max=0.085, name="q8_0"),
    "q4_0": Tolerance(cos_min=0.5, rel_max=1.2, name="q4_0"),
    "q4_k": Tolerance(cos_min=0.5, rel_max=1.2, name="q4_k"),
}
KV_DEFAULTS: dict[str, Tolerance] = {
    "float32": DTYPE_DEFAULTS["float32"],
    "float16": Tolerance(cos_min=1 - 1e-6, rel_max=2e-3, name="float16 KV cache"),
    "bfloat16": Tolerance(cos_min=1 - 5e-5, rel_max=0.015, name="bfloat16 KV cache"),
}
KV_READERS = ("k_cache", "v_cache", "probs", "attn", "attn_out")  # the cache itself and the taps computed from it
_BEFORE_CACHE = ("embed", "attn_in", "q", "k", "v", "q_norm", "k_norm", "q_rot", "k_rot")
PRESETS: dict[str, Tolerance] = {
    "simple": Tolerance(cos_min=0.99, rel_max=0.01, mse_max=1e-4, name="simple"),
}
# tighter first: the tolerance of a comparison is that of its least precise side
_LOOSENESS = ["float64", "float32", "float16", "bfloat16", "q8_0", "int8", "q4_k", "q4_0", "int4"]
def _known(d: str, what: str, table) -> str:
    if d not in table:
        raise Qwen3LabError(f"unknown {what} {d!r}: known labels are {', '.join(table)} (aliases "
                            f"{', '.join(_ALIASES)})")
    return d


def tolerance_for(cand_dtype: str | None, ref_dtype: str | None = "float64", *, preset: str | None = None,
                  cos_min: float | None = None, mse_max: float | None = None,
                  rel_max: float | None = None, kv_dtype: str | None = None) -> Tolerance:
    """The tolerance for comparing a `cand_dtype` candidate against a `ref_dtype` reference, with the
    `preset` (e.g. "simple") or per-dtype default, then any explicit threshold overriding it; `kv_dtype` (the
    candidate's KV cache) loosens the taps downstream of the cache where it is looser (module docstring)."""
    if preset is not None:
        if preset not in PRESETS:
            raise Qwen3LabError(f"unknown tolerance preset {preset!r}; choose one of {', '.join(PRESETS)}")
        tol = PRESETS[preset]
    else:
        dts = [_known(normalize_dtype(d), "dtype", DTYPE_DEFAULTS) for d in (cand_dtype, ref_dtype)]
        tol = DTYPE_DEFAULTS[_LOOSENESS[max(_LOOSENESS.index(d) for d in dts)]]
    if kv_dtype is not None:
        kv = KV_DEFAULTS[_known(normalize_dtype(kv_dtype), "KV-cache dtype", KV_DEFAULTS)]
        if kv.rel_max > tol.rel_max or kv.cos_min < tol.cos_min:
            tol = replace(tol, kv=kv, name=f"{tol.name}, {kv.name} from layers.0.probs on")
    changes = {k: v for k, v in (("cos_min", cos_min), ("mse_max", mse_max), ("rel_max", rel_max)) if v is not None}
    for k, v in changes.items():
        if not isinstance(v, (int, float)) or v != v or v < 0:
            raise Qwen3LabError(f"--{k.replace('_', '-')} must be a non-negative number, got {v!r}")
    if changes:
        tol = replace(tol, **changes, name=f"{tol.name}+overrides")
    return tol


def for_tap(tol: Tolerance, name: str, grafted: bool = False) -> Tolerance:
    """The tolerance of one tap: the KV cache's for the taps it reaches (all of them after layers.0's attention;
    in a grafted run only the ones that read the cache), else the compute's; a --band threshold first."""
    band = (tol.bands or {}).get(_no_step(name))
    if band is not None:
        return band
    if tol.kv is None:
        return tol
    _, layer, site = split_name(name)
    if site in KV_READERS or (not grafted and not (site in _BEFORE_CACHE and layer in (None, 0))):
        return replace(tol.kv, topk_match_min=tol.topk_match_min, mse_max=tol.mse_max)
    return tol


def _no_step(name: str) -> str:
    return name.split(".", 1)[1] if split_name(name)[0] is not None else name


def check(m: TapMetrics, tol: Tolerance, site: str) -> list[str]:
    """Reasons the tap fails (empty list: it passes)."""
    why = []
    if m.nonfinite_mismatch:
        why.append(f"{m.nonfinite_mismatch} NaN/Inf value(s) not in the reference "
                   f"(candidate NaN {m.nan_candidate}, Inf {m.inf_candidate}; "
                   f"reference NaN {m.nan_reference}, Inf {m.inf_reference})")
    if site == "topk_idx":
        if m.match_fraction is not None:
            T = m.tokens or 1
            differ = round((1 - m.match_fraction) * T)
            ok = 1 - (differ - (m.near_tie_tokens or 0)) / T  # tokens that match, or differ at a near tie
            if ok < tol.topk_match_min:
                ties = f", {m.near_tie_tokens} of them near ties" if m.near_tie_tokens else ""
                why.append(f"expert set differs on {differ} of {T} tokens{ties} (matching or near-tie tokens "
                           f"{ok:.1%} < {tol.topk_match_min:.0%})")
        return why
    if not m.relative_error <= tol.rel_max:
        why.append(f"relative error {m.relative_error:.3g} > {tol.rel_max:.3g}")
    if not m.cosine_similarity >= tol.cos_min:
        why.append(f"cosine {cos_str(m.cosine_similarity)} < {cos_str(tol.cos_min)}")
    if tol.mse_max is not None and not m.mse <= tol.mse_max:
        why.append(f"MSE {m.mse:.3g} > {tol.mse_max:.3g}")
    return why


def cos_str(c: float) -> str:
    """A cosine with enough digits to see how far below 1 it is: 0.806619, 0.99999874, 1 - 3.1e-13."""
    if c != c or c < 0.999:
        return f"{c:.6f}".rstrip("0").rstrip(".") if c == c else "nan"
    if c > 1 - 1e-7:
        return "1" if c >= 1 else f"1 - {1 - c:.2g}"
    return f"{c:.9f}".rstrip("0")
