"""The leaf checks of config.json's schema (config.py reads the file; this says what each value may be).

Each check names the key as the file spells it (e.g. 'rope_scaling.factor'), shows the value as JSON would
(true, null, NaN; shortened when huge) and says what is allowed; `Reader` reads keys one by one through them,
and `read_rope` reads both RoPE layouts (transformers-4 `rope_theta` + `rope_scaling`, transformers-5
`rope_parameters`).
"""

from __future__ import annotations

import math
from typing import Any

from . import limits
from .errors import ConfigError

MODEL_TYPES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
ROPE_TYPES = ("default", "yarn", "linear", "dynamic")
SCALED_ROPE_TYPES = ("yarn", "linear", "dynamic")  # the ones transformers requires a `factor` for
HIDDEN_ACTS = ("silu",)  # the only activation the backends implement (every Qwen3 uses it)
# torch's floating dtype names: transformers turns the string into getattr(torch, name)
DTYPES = ("float32", "bfloat16", "float16", "float64", "float", "half", "double",
          "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")


# ---- reading and checking single values ---------------------------------------------------------
# Each check names the key as the file spells it (e.g. 'rope_scaling.factor'), shows the value as JSON
# would (true, null, NaN; shortened when huge) and says what is allowed.

REQUIRED = object()


def show(v: Any, limit: int = 60) -> str:
    """`v` as a short JSON-like text for an error message: true/false/null, NaN, huge values cut."""
    text = _render(v, limit, depth=3)  # already bounded; the cut below is a safety net
    return text if len(text) <= 3 * limit else text[:3 * limit] + "..."


def _render(v: Any, budget: int, depth: int) -> str:
    if v is None or isinstance(v, bool):
        return {None: "null", True: "true", False: "false"}[v]
    if isinstance(v, int):
        if v.bit_length() > 200:  # str() of a 5000-digit int is slow, and refused past 4300 digits
            return f"{'-' if v < 0 else ''}an integer of about {int(v.bit_length() * 0.30103) + 1:,} digits"
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}[repr(v)]
    if isinstance(v, str):
        return repr(v) if len(v) <= budget else f"{v[:budget]!r}... ({len(v):,} characters)"
    if isinstance(v, (list, dict)):
        if depth == 0:
            return "[...]" if isinstance(v, list) else "{...}"
        items = v.items() if isinstance(v, dict) else ((None, x) for x in v)
        parts: list[str] = []
        used = 0
        for k, x in items:
            if used > budget:
                parts.append(f"... {len(v):,} items")
                break
            part = _render(x, budget, depth - 1)
            if isinstance(v, dict):
                part = f"{_render(k, budget, 0)}: {part}"
            parts.append(part)
            used += len(part) + 2
        inner = ", ".join(parts)
        return f"[{inner}]" if isinstance(v, list) else f"{{{inner}}}"
    return repr(v)[:budget]


def kind_of(v: Any) -> str:
    """The JSON type of a value, as a user reading config.json would name it."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, (list, tuple)):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def check_int(src: str, key: str, v: Any, low: int | None = None, field: str | None = None) -> int:
    """An integer (JSON integers only: not true/false, not 64.0, not "64") within limits.INT_BOUNDS."""
    lo, hi = limits.INT_BOUNDS[field or key]
    lo = lo if low is None else low
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{src}: field {key!r} must be an integer, got {show(v)} ({kind_of(v)}); "
                          f"allowed: a JSON integer in {lo}..{hi:,}, without quotes or a decimal point")
    if v < lo:
        raise ConfigError(f"{src}: field {key!r} must be {'> 0' if lo == 1 else f'>= {lo}'}, got {show(v)}")
    if v > hi:
        raise ConfigError(f"{src}: field {key!r} must be at most {hi:,}, got {show(v)} (qwen3lab's limit, "
                          f"about ten times what any released Qwen3 uses; see qwen3lab/limits.py)")
    return v


def check_number(src: str, key: str, v: Any, above: float | None = None, at_least: float | None = None,
                  why: str = "") -> int | float:
    """A finite JSON number (NaN and Infinity, which Python's JSON parser accepts, are refused)."""
    bound = f" > {above:g}" if above is not None else f" >= {at_least:g}" if at_least is not None else ""
    allowed = f"a finite number{bound}{why}"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{src}: field {key!r} must be {allowed}, got {show(v)} ({kind_of(v)})")
    try:
        finite = math.isfinite(v)
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite or (above is not None and not v > above) or (at_least is not None and not v >= at_least):
        raise ConfigError(f"{src}: field {key!r} must be {allowed}, got {show(v)}")
    return v


def check_bool(src: str, key: str, v: Any) -> bool:
    """Only JSON true/false: the string "false" is truthy in Python, and 0/1/null are not booleans."""
    if not isinstance(v, bool):
        hint = "; write true or false without quotes" if isinstance(v, str) else ""
        raise ConfigError(f"{src}: field {key!r} must be true or false, got {show(v)} ({kind_of(v)}){hint}")
    return v


def check_choice(src: str, key: str, v: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(v, str) or v not in choices:
        raise ConfigError(f"{src}: field {key!r} must be one of {', '.join(map(repr, choices))}, "
                          f"got {show(v)}" + ("" if isinstance(v, str) else f" ({kind_of(v)})"))
    return v


def token_ids_field(src: str, key: str, v: Any) -> int | list[int] | None:
    """A token id or a list of them (eos may list several), each in 0..limits.MAX_VOCAB-1, or null.
    Not checked against vocab_size: a small-vocabulary test model keeps Qwen3's real special ids."""
    if v is None:
        return None
    ids = v if isinstance(v, list) else [v]
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < limits.MAX_VOCAB:
            where = f"{key}[{i}]" if isinstance(v, list) else key
            raise ConfigError(f"{src}: field {where!r} must be a token id (an integer in "
                              f"0..{limits.MAX_VOCAB - 1:,}) or a list of them, got {show(t)} ({kind_of(t)})")
    return v


def layer_list(src: str, key: str, v: Any, layers: int) -> list[int]:
    """mlp_only_layers: distinct layer indices in 0..layers-1 (null or absent: none)."""
    if v is None:
        return []
    if not isinstance(v, list):
        raise ConfigError(f"{src}: field {key!r} must be a list of layer indices (integers in "
                          f"0..{layers - 1}), got {show(v)} ({kind_of(v)})")
    seen: set[int] = set()
    for i, x in enumerate(v):
        if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < layers:
            raise ConfigError(f"{src}: field '{key}[{i}]' must be a layer index, an integer in 0..{layers - 1} "
                              f"(num_hidden_layers is {layers}), got {show(x)} ({kind_of(x)})")
        if x in seen:
            raise ConfigError(f"{src}: field {key!r} lists layer {x} twice")
        seen.add(x)
    return list(v)


def model_type_of(d: dict[str, Any], src: str) -> str:
    mt = d.get("model_type")
    if mt is None:
        raise ConfigError(f"{src}: missing field 'model_type' (expected one of {sorted(MODEL_TYPES)})")
    if not isinstance(mt, str) or mt not in MODEL_TYPES:
        what = f"unknown model_type {show(mt)}" if isinstance(mt, str) else \
            f"field 'model_type' must be a string, got {show(mt)} ({kind_of(mt)})"
        raise ConfigError(f"{src}: {what}; qwen3lab reads {sorted(MODEL_TYPES)} "
                          f"(Qwen3ForCausalLM, Qwen3MoeForCausalLM)")
    return mt


class Reader:
    """Reads config.json keys, each checked as it is read, so the error names the key actually used."""

    def __init__(self, d: dict[str, Any], src: str, model_type: str):
        self.d, self.src, self.model_type = d, src, model_type

    def int(self, key: str, *alts: str, default: Any = REQUIRED, low: int | None = None,
            nullable: bool = True) -> int:
        """The first of key/alts present and not null. nullable: null means absent, as transformers reads
        num_key_value_heads or head_dim; otherwise null is refused as not an integer."""
        for k in (key, *alts):
            if self.d.get(k) is not None:
                return check_int(self.src, k, self.d[k], low=low, field=key)
        if not nullable and key in self.d:
            check_int(self.src, key, None)
        if default is REQUIRED:
            alias = "".join(f" or {k!r}" for k in alts)
            raise ConfigError(f"{self.src}: missing field {key!r}{alias} (required for model_type {self.model_type!r})")
        return default

    def number(self, key: str, default: float, above: float) -> int | float:
        return check_number(self.src, key, self.d[key], above=above) if key in self.d else default

    def bool(self, key: str, default: bool) -> bool:
        return check_bool(self.src, key, self.d[key]) if key in self.d else default

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        return check_choice(self.src, key, self.d[key], choices) if key in self.d else default

    def dtype(self) -> str | None:
        # transformers keeps `dtype` (its 5.x name) over `torch_dtype` (4.x) when both are given
        for k in ("dtype", "torch_dtype"):
            if self.d.get(k) is not None:
                return check_choice(self.src, k, self.d[k], DTYPES)
        return None


# ---- RoPE ------------------------------------------------------------------------------------------

def read_rope(d: dict[str, Any], src: str) -> tuple[int | float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either layout: transformers-5 `rope_parameters: {rope_theta,
    rope_type, ...}` or transformers-4 `rope_theta` + `rope_scaling`. rope_scaling comes back with its
    type under `rope_type` (older files say `type`), or None for plain RoPE."""
    params, scaling, theta = d.get("rope_parameters"), d.get("rope_scaling"), d.get("rope_theta")
    for key, v in (("rope_parameters", params), ("rope_scaling", scaling)):
        if v is not None and not isinstance(v, dict):
            raise ConfigError(f"{src}: field {key!r} must be an object such as {{\"rope_type\": \"yarn\", "
                              f"\"factor\": 4.0, \"original_max_position_embeddings\": 32768}} or null, "
                              f"got {show(v)} ({kind_of(v)})")
    theta_key, scaling_key = "rope_theta", "rope_scaling"
    if params is not None:
        if "rope_theta" in params:
            theta, theta_key = params["rope_theta"], "rope_parameters.rope_theta"
        if rope_type_of(src, "rope_parameters", params) is not None:
            scaling, scaling_key = {k: v for k, v in params.items() if k != "rope_theta"}, "rope_parameters"
    elif scaling is not None and scaling.get("rope_theta") is not None:
        # transformers reads rope_scaling as its rope_parameters, whose own rope_theta wins over the top level
        theta, theta_key = scaling["rope_theta"], "rope_scaling.rope_theta"
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
    if theta is None:
        if params is not None:
            raise ConfigError(f"{src}: missing field 'rope_parameters.rope_theta'")
        theta = 10000.0  # transformers' Qwen3Config default
    check_number(src, theta_key, theta, above=1.0, why=" (the RoPE base; Qwen3 uses 1000000)")
    if scaling is None:
        return theta, None
    rtype = rope_type_of(src, scaling_key, scaling)
    if rtype is None:
        return theta, None
    scaling = {k: v for k, v in scaling.items() if k != "type"}
    scaling["rope_type"] = rtype
    check_rope(src, scaling_key, scaling)
    return theta, scaling


def rope_type_of(src: str, key: str, rs: dict[str, Any]) -> str | None:
    """The rope type a rope_scaling / rope_parameters object names (`rope_type`, or `type` in older
    files); None for plain RoPE: "default", or an object with nothing but rope_theta."""
    rtype = rs.get("rope_type", rs.get("type"))
    if rtype is None:
        extra = [k for k in rs if k not in ("rope_theta", "rope_type", "type")]
        if extra:  # transformers would read this as plain RoPE and silently drop e.g. a factor
            raise ConfigError(f"{src}: field '{key}.rope_type' is missing (one of {', '.join(ROPE_TYPES)}) "
                              f"but {key} sets {show(extra)}")
        return None
    if not isinstance(rtype, str) or rtype not in ROPE_TYPES:
        raise ConfigError(f"{src}: field '{key}.rope_type' {show(rtype)} is not supported "
                          f"(one of {', '.join(ROPE_TYPES)})")
    return None if rtype == "default" else rtype


def check_rope(src: str, key: str, rs: Any) -> None:
    """A normalised rope_scaling object: the keys its type requires, each of the right type and range
    (transformers' rules: factor >= 1 for linear, dynamic and yarn; yarn's optional keys numbers)."""
    if not isinstance(rs, dict):
        raise ConfigError(f"{src}: field {key!r} must be an object or null, got {show(rs)} ({kind_of(rs)})")
    rt = rs.get("rope_type")
    if not isinstance(rt, str) or rt not in ROPE_TYPES:
        raise ConfigError(f"{src}: field '{key}.rope_type' {show(rt)} is not supported "
                          f"(one of {', '.join(ROPE_TYPES)})")
    if rt in SCALED_ROPE_TYPES:
        if rs.get("factor") is None:
            raise ConfigError(f"{src}: missing field '{key}.factor': rope_type {rt!r} needs a scaling factor "
                              f"(a number >= 1, e.g. 4.0 to stretch 32768 positions to 131072)")
        check_number(src, f"{key}.factor", rs["factor"], at_least=1.0)
    if rt != "yarn":
        return
    if rs.get("original_max_position_embeddings") is not None:
        check_int(src, f"{key}.original_max_position_embeddings", rs["original_max_position_embeddings"],
                   field="original_max_position_embeddings")
    for name in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        if rs.get(name) is not None:
            check_number(src, f"{key}.{name}", rs[name], above=0.0)
    if rs.get("truncate") is not None:
        check_bool(src, f"{key}.truncate", rs["truncate"])
    fast, slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1  # transformers' defaults
    if fast < slow:
        raise ConfigError(f"{src}: field '{key}.beta_fast' ({show(fast)}) must be >= '{key}.beta_slow' ({show(slow)})")
