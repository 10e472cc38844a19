"""Qwen3Config: the keys of a HuggingFace Qwen3 / Qwen3-MoE config.json, validated.

Reads both the transformers-4 layout (`rope_theta`, `rope_scaling`, `num_experts`) and the
transformers-5 layout (`rope_parameters: {rope_theta, rope_type, ...}`, `num_local_experts`).
Qwen3's head_dim is explicit (128 for every released model) and is NOT hidden_size / heads.

One strict schema: each key is checked as it is read -- booleans only true/false, integers only JSON
integers within the bounds of limits.py, floats finite, rope objects with the keys their type needs --
and a ConfigError names the key, its value (shortened when huge) and what is allowed. Keys qwen3lab does
not read are ignored, as transformers ignores them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import limits
from .errors import ConfigError
from .jsonio import read_json

MODEL_TYPES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
ROPE_TYPES = ("default", "yarn", "linear", "dynamic")
SCALED_ROPE_TYPES = ("yarn", "linear", "dynamic")  # the ones transformers requires a `factor` for
HIDDEN_ACTS = ("silu",)  # the only activation the backends implement (every Qwen3 uses it)
# torch's floating dtype names: transformers turns the string into getattr(torch, name)
DTYPES = ("float32", "bfloat16", "float16", "float64", "float", "half", "double",
          "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")


@dataclass
class Qwen3Config:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "yarn", "factor": 4.0, ...} or None
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    # MoE (model_type "qwen3_moe"); num_experts == 0 means dense
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str | None = None
    source: str = "<dict>"  # where it was read from, for error messages

    # ---- derived -------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.model_type == "qwen3_moe" and self.num_experts > 0

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (GQA group size)."""
        return self.num_attention_heads // self.num_key_value_heads

    def is_moe_layer(self, i: int) -> bool:
        # Same rule as transformers' Qwen3MoeDecoderLayer.
        return (
            self.is_moe
            and i not in self.mlp_only_layers
            and (i + 1) % self.decoder_sparse_step == 0
        )

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        if e is None:
            return []
        return [e] if isinstance(e, int) else list(e)

    @property
    def architecture(self) -> str:
        return MODEL_TYPES[self.model_type]

    # ---- parsing -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> Qwen3Config:
        """Typed fields from a parsed config.json: every value is checked against its type and bounds
        (limits.py) as it is read, so a ConfigError names the key as the file spells it. Keys qwen3lab
        does not use are ignored, as transformers ignores them."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {_kind(d)}")
        mt = _model_type(d, source)
        r = _Reader(d, source, mt)
        moe = mt == "qwen3_moe"
        heads = r.int("num_attention_heads")
        hidden = r.int("hidden_size")
        layers = r.int("num_hidden_layers")
        rope_theta, rope_scaling = _rope(d, source)
        cfg = cls(
            model_type=mt,
            hidden_size=hidden,
            # a MoE model whose every layer is MoE needs no dense MLP width
            intermediate_size=r.int("intermediate_size", default=0, low=0) if moe else r.int("intermediate_size"),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=r.int("num_key_value_heads", default=heads),
            # transformers falls back to hidden/heads when head_dim is absent; Qwen3 configs set it.
            head_dim=r.int("head_dim", default=hidden // heads),
            vocab_size=r.int("vocab_size"),
            rms_norm_eps=r.number("rms_norm_eps", 1e-6, above=0.0),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=r.int("max_position_embeddings", default=40960, nullable=False),
            tie_word_embeddings=r.bool("tie_word_embeddings", False),
            attention_bias=r.bool("attention_bias", False),
            hidden_act=r.choice("hidden_act", "silu", HIDDEN_ACTS),
            num_experts=r.int("num_experts", "num_local_experts") if moe else 0,
            num_experts_per_tok=r.int("num_experts_per_tok") if moe else 0,
            moe_intermediate_size=r.int("moe_intermediate_size") if moe else 0,
            # transformers' Qwen3MoeConfig default
            norm_topk_prob=r.bool("norm_topk_prob", False) if moe else True,
            decoder_sparse_step=r.int("decoder_sparse_step", default=1, nullable=False) if moe else 1,
            mlp_only_layers=_layer_list(source, "mlp_only_layers", d.get("mlp_only_layers"), layers) if moe else [],
            bos_token_id=_token_ids(source, "bos_token_id", d.get("bos_token_id")),
            eos_token_id=_token_ids(source, "eos_token_id", d.get("eos_token_id")),
            torch_dtype=r.dtype(),
            source=source,
        )
        if r.bool("use_sliding_window", False):
            raise ConfigError(f"{source}: field 'use_sliding_window' is true: sliding-window attention is not "
                              f"supported (no released Qwen3 uses it); set it to false")
        prf = d.get("partial_rotary_factor", 1.0)
        if isinstance(prf, bool) or not isinstance(prf, (int, float)) or prf != 1.0:
            raise ConfigError(f"{source}: field 'partial_rotary_factor' must be 1.0 (Qwen3 rotates the whole "
                              f"head; partial RoPE is not supported), got {show(prf)}")
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> Qwen3Config:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{path}: config.json not found")
        return cls.from_dict(read_json(path, ConfigError, "config.json"), source=str(path))

    def validate(self) -> None:
        """Each field's type and bounds (again, for configs made by replace() or by hand), then the
        relations between fields."""
        src = self.source
        if not isinstance(self.model_type, str) or self.model_type not in MODEL_TYPES:
            raise ConfigError(f"{src}: field 'model_type' must be one of {sorted(MODEL_TYPES)}, "
                              f"got {show(self.model_type)}")
        moe = self.model_type == "qwen3_moe"
        ints = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "vocab_size", "max_position_embeddings"]
        if moe:
            ints += ["num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step"]
        for name in ints:
            _check_int(src, name, getattr(self, name))
        _check_int(src, "intermediate_size", self.intermediate_size, low=0 if moe else 1)
        _check_number(src, "rms_norm_eps", self.rms_norm_eps, above=0.0)
        _check_number(src, "rope_theta", self.rope_theta, above=1.0)
        for name in ("tie_word_embeddings", "attention_bias", "norm_topk_prob"):
            _check_bool(src, name, getattr(self, name))
        _check_choice(src, "hidden_act", self.hidden_act, HIDDEN_ACTS)
        if self.torch_dtype is not None:
            _check_choice(src, "torch_dtype", self.torch_dtype, DTYPES)
        _token_ids(src, "bos_token_id", self.bos_token_id)
        _token_ids(src, "eos_token_id", self.eos_token_id)
        if self.rope_scaling is not None:
            _check_rope(src, "rope_scaling", self.rope_scaling)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"{src}: num_attention_heads ({self.num_attention_heads}) is not divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"{src}: head_dim must be even for RoPE, got {self.head_dim}")
        if moe:
            self._validate_moe()

    def _validate_moe(self) -> None:
        src = self.source
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(
                f"{src}: num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts "
                f"({self.num_experts})"
            )
        mlps = self.num_hidden_layers * self.num_experts
        if mlps > limits.MAX_EXPERT_MLPS:
            raise ConfigError(
                f"{src}: num_hidden_layers x num_experts = {self.num_hidden_layers} x {self.num_experts} = "
                f"{mlps:,} expert MLPs, more than the {limits.MAX_EXPERT_MLPS:,} qwen3lab allows "
                f"(Qwen3-235B-A22B has 94 x 128)"
            )
        _layer_list(src, "mlp_only_layers", self.mlp_only_layers, self.num_hidden_layers)
        if not all(self.is_moe_layer(i) for i in range(self.num_hidden_layers)):
            _check_int(src, "intermediate_size", self.intermediate_size)  # dense layers of a MoE model use it

    # ---- writing -------------------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json transformers writes for this model (transformers-4 key names)."""
        d: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "max_window_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": self.rope_scaling,
            "rope_theta": self.rope_theta,
            "sliding_window": None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.torch_dtype or "bfloat16",
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": self.vocab_size,
        }
        if self.model_type == "qwen3_moe":
            d.update(
                decoder_sparse_step=self.decoder_sparse_step,
                mlp_only_layers=list(self.mlp_only_layers),
                moe_intermediate_size=self.moe_intermediate_size,
                norm_topk_prob=self.norm_topk_prob,
                num_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                output_router_logits=False,
                router_aux_loss_coef=0.001,
            )
        return d

    def replace(self, **changes: Any) -> Qwen3Config:
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    def sha256(self) -> str:
        """Hash of the canonical JSON of this config (what a dump's config_sha256 is checked against
        when the dump was made from a dict rather than a file)."""
        return hashlib.sha256(json.dumps(self.to_hf_dict(), sort_keys=True).encode()).hexdigest()


# ---- reading and checking single values ---------------------------------------------------------
# Each check names the key as the file spells it (e.g. 'rope_scaling.factor'), shows the value as JSON
# would (true, null, NaN; shortened when huge) and says what is allowed.

_REQUIRED = object()


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


def _kind(v: Any) -> str:
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


def _check_int(src: str, key: str, v: Any, low: int | None = None, field: str | None = None) -> int:
    """An integer (JSON integers only: not true/false, not 64.0, not "64") within limits.INT_BOUNDS."""
    lo, hi = limits.INT_BOUNDS[field or key]
    lo = lo if low is None else low
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{src}: field {key!r} must be an integer, got {show(v)} ({_kind(v)}); "
                          f"allowed: a JSON integer in {lo}..{hi:,}, without quotes or a decimal point")
    if v < lo:
        raise ConfigError(f"{src}: field {key!r} must be {'> 0' if lo == 1 else f'>= {lo}'}, got {show(v)}")
    if v > hi:
        raise ConfigError(f"{src}: field {key!r} must be at most {hi:,}, got {show(v)} (qwen3lab's limit, "
                          f"about ten times what any released Qwen3 uses; see qwen3lab/limits.py)")
    return v


def _check_number(src: str, key: str, v: Any, above: float | None = None, at_least: float | None = None,
                  why: str = "") -> int | float:
    """A finite JSON number (NaN and Infinity, which Python's JSON parser accepts, are refused)."""
    bound = f" > {above:g}" if above is not None else f" >= {at_least:g}" if at_least is not None else ""
    allowed = f"a finite number{bound}{why}"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{src}: field {key!r} must be {allowed}, got {show(v)} ({_kind(v)})")
    try:
        finite = math.isfinite(v)
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite or (above is not None and not v > above) or (at_least is not None and not v >= at_least):
        raise ConfigError(f"{src}: field {key!r} must be {allowed}, got {show(v)}")
    return v


def _check_bool(src: str, key: str, v: Any) -> bool:
    """Only JSON true/false: the string "false" is truthy in Python, and 0/1/null are not booleans."""
    if not isinstance(v, bool):
        hint = "; write true or false without quotes" if isinstance(v, str) else ""
        raise ConfigError(f"{src}: field {key!r} must be true or false, got {show(v)} ({_kind(v)}){hint}")
    return v


def _check_choice(src: str, key: str, v: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(v, str) or v not in choices:
        raise ConfigError(f"{src}: field {key!r} must be one of {', '.join(map(repr, choices))}, "
                          f"got {show(v)}" + ("" if isinstance(v, str) else f" ({_kind(v)})"))
    return v


def _token_ids(src: str, key: str, v: Any) -> int | list[int] | None:
    """A token id or a list of them (eos may list several), each in 0..limits.MAX_VOCAB-1, or null.
    Not checked against vocab_size: a small-vocabulary test model keeps Qwen3's real special ids."""
    if v is None:
        return None
    ids = v if isinstance(v, list) else [v]
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < limits.MAX_VOCAB:
            where = f"{key}[{i}]" if isinstance(v, list) else key
            raise ConfigError(f"{src}: field {where!r} must be a token id (an integer in "
                              f"0..{limits.MAX_VOCAB - 1:,}) or a list of them, got {show(t)} ({_kind(t)})")
    return v


def _layer_list(src: str, key: str, v: Any, layers: int) -> list[int]:
    """mlp_only_layers: distinct layer indices in 0..layers-1 (null or absent: none)."""
    if v is None:
        return []
    if not isinstance(v, list):
        raise ConfigError(f"{src}: field {key!r} must be a list of layer indices (integers in "
                          f"0..{layers - 1}), got {show(v)} ({_kind(v)})")
    seen: set[int] = set()
    for i, x in enumerate(v):
        if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < layers:
            raise ConfigError(f"{src}: field '{key}[{i}]' must be a layer index, an integer in 0..{layers - 1} "
                              f"(num_hidden_layers is {layers}), got {show(x)} ({_kind(x)})")
        if x in seen:
            raise ConfigError(f"{src}: field {key!r} lists layer {x} twice")
        seen.add(x)
    return list(v)


def _model_type(d: dict[str, Any], src: str) -> str:
    mt = d.get("model_type")
    if mt is None:
        raise ConfigError(f"{src}: missing field 'model_type' (expected one of {sorted(MODEL_TYPES)})")
    if not isinstance(mt, str) or mt not in MODEL_TYPES:
        what = f"unknown model_type {show(mt)}" if isinstance(mt, str) else \
            f"field 'model_type' must be a string, got {show(mt)} ({_kind(mt)})"
        raise ConfigError(f"{src}: {what}; qwen3lab reads {sorted(MODEL_TYPES)} "
                          f"(Qwen3ForCausalLM, Qwen3MoeForCausalLM)")
    return mt


class _Reader:
    """Reads config.json keys, each checked as it is read, so the error names the key actually used."""

    def __init__(self, d: dict[str, Any], src: str, model_type: str):
        self.d, self.src, self.model_type = d, src, model_type

    def int(self, key: str, *alts: str, default: Any = _REQUIRED, low: int | None = None,
            nullable: bool = True) -> int:
        """The first of key/alts present and not null. nullable: null means absent, as transformers reads
        num_key_value_heads or head_dim; otherwise null is refused as not an integer."""
        for k in (key, *alts):
            if self.d.get(k) is not None:
                return _check_int(self.src, k, self.d[k], low=low, field=key)
        if not nullable and key in self.d:
            _check_int(self.src, key, None)
        if default is _REQUIRED:
            alias = "".join(f" or {k!r}" for k in alts)
            raise ConfigError(f"{self.src}: missing field {key!r}{alias} (required for model_type {self.model_type!r})")
        return default

    def number(self, key: str, default: float, above: float) -> int | float:
        return _check_number(self.src, key, self.d[key], above=above) if key in self.d else default

    def bool(self, key: str, default: bool) -> bool:
        return _check_bool(self.src, key, self.d[key]) if key in self.d else default

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        return _check_choice(self.src, key, self.d[key], choices) if key in self.d else default

    def dtype(self) -> str | None:
        # transformers keeps `dtype` (its 5.x name) over `torch_dtype` (4.x) when both are given
        for k in ("dtype", "torch_dtype"):
            if self.d.get(k) is not None:
                return _check_choice(self.src, k, self.d[k], DTYPES)
        return None


# ---- RoPE ------------------------------------------------------------------------------------------

def _rope(d: dict[str, Any], src: str) -> tuple[int | float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either layout: transformers-5 `rope_parameters: {rope_theta,
    rope_type, ...}` or transformers-4 `rope_theta` + `rope_scaling`. rope_scaling comes back with its
    type under `rope_type` (older files say `type`), or None for plain RoPE."""
    params, scaling, theta = d.get("rope_parameters"), d.get("rope_scaling"), d.get("rope_theta")
    for key, v in (("rope_parameters", params), ("rope_scaling", scaling)):
        if v is not None and not isinstance(v, dict):
            raise ConfigError(f"{src}: field {key!r} must be an object such as {{\"rope_type\": \"yarn\", "
                              f"\"factor\": 4.0, \"original_max_position_embeddings\": 32768}} or null, "
                              f"got {show(v)} ({_kind(v)})")
    theta_key, scaling_key = "rope_theta", "rope_scaling"
    if params is not None:
        if "rope_theta" in params:
            theta, theta_key = params["rope_theta"], "rope_parameters.rope_theta"
        if _rope_type(src, "rope_parameters", params) is not None:
            scaling, scaling_key = {k: v for k, v in params.items() if k != "rope_theta"}, "rope_parameters"
    elif scaling is not None and scaling.get("rope_theta") is not None:
        # transformers reads rope_scaling as its rope_parameters, whose own rope_theta wins over the top level
        theta, theta_key = scaling["rope_theta"], "rope_scaling.rope_theta"
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
    if theta is None:
        if params is not None:
            raise ConfigError(f"{src}: missing field 'rope_parameters.rope_theta'")
        theta = 10000.0  # transformers' Qwen3Config default
    _check_number(src, theta_key, theta, above=1.0, why=" (the RoPE base; Qwen3 uses 1000000)")
    if scaling is None:
        return theta, None
    rtype = _rope_type(src, scaling_key, scaling)
    if rtype is None:
        return theta, None
    scaling = {k: v for k, v in scaling.items() if k != "type"}
    scaling["rope_type"] = rtype
    _check_rope(src, scaling_key, scaling)
    return theta, scaling


def _rope_type(src: str, key: str, rs: dict[str, Any]) -> str | None:
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


def _check_rope(src: str, key: str, rs: Any) -> None:
    """A normalised rope_scaling object: the keys its type requires, each of the right type and range
    (transformers' rules: factor >= 1 for linear, dynamic and yarn; yarn's optional keys numbers)."""
    if not isinstance(rs, dict):
        raise ConfigError(f"{src}: field {key!r} must be an object or null, got {show(rs)} ({_kind(rs)})")
    rt = rs.get("rope_type")
    if not isinstance(rt, str) or rt not in ROPE_TYPES:
        raise ConfigError(f"{src}: field '{key}.rope_type' {show(rt)} is not supported "
                          f"(one of {', '.join(ROPE_TYPES)})")
    if rt in SCALED_ROPE_TYPES:
        if rs.get("factor") is None:
            raise ConfigError(f"{src}: missing field '{key}.factor': rope_type {rt!r} needs a scaling factor "
                              f"(a number >= 1, e.g. 4.0 to stretch 32768 positions to 131072)")
        _check_number(src, f"{key}.factor", rs["factor"], at_least=1.0)
    if rt != "yarn":
        return
    if rs.get("original_max_position_embeddings") is not None:
        _check_int(src, f"{key}.original_max_position_embeddings", rs["original_max_position_embeddings"],
                   field="original_max_position_embeddings")
    for name in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        if rs.get(name) is not None:
            _check_number(src, f"{key}.{name}", rs[name], above=0.0)
    if rs.get("truncate") is not None:
        _check_bool(src, f"{key}.truncate", rs["truncate"])
    fast, slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1  # transformers' defaults
    if fast < slow:
        raise ConfigError(f"{src}: field '{key}.beta_fast' ({show(fast)}) must be >= '{key}.beta_slow' ({show(slow)})")


def load_config(path: str | Path) -> Qwen3Config:
    return Qwen3Config.from_file(path)
