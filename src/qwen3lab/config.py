"""Qwen3Config: the keys of a HuggingFace Qwen3 / Qwen3-MoE config.json, validated.

Reads both the transformers-4 layout (`rope_theta`, `rope_scaling`, `num_experts`) and the
transformers-5 layout (`rope_parameters: {rope_theta, rope_type, ...}`, `num_local_experts`).
Qwen3's head_dim is explicit (128 for every released model) and is NOT hidden_size / heads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .jsonio import read_json

MODEL_TYPES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
ROPE_TYPES = ("default", "yarn", "linear", "dynamic")


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
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        mt = d.get("model_type")
        if mt is None:
            raise ConfigError(f"{source}: missing field 'model_type' (expected one of {sorted(MODEL_TYPES)})")
        if mt not in MODEL_TYPES:
            raise ConfigError(
                f"{source}: unknown model_type {mt!r}; qwen3lab reads {sorted(MODEL_TYPES)} "
                f"(Qwen3ForCausalLM, Qwen3MoeForCausalLM)"
            )

        def need(key: str, *alts: str) -> Any:
            for k in (key, *alts):
                if k in d and d[k] is not None:
                    return d[k]
            raise ConfigError(f"{source}: missing field {key!r} (required for model_type {mt!r})")

        def get(key: str, default: Any, *alts: str) -> Any:
            for k in (key, *alts):
                if k in d and d[k] is not None:
                    return d[k]
            return default

        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        # transformers-5 writes rope_parameters; transformers-4 writes rope_theta + rope_scaling.
        rope_params = d.get("rope_parameters")
        rope_scaling = d.get("rope_scaling")
        rope_theta = d.get("rope_theta")
        if isinstance(rope_params, dict):
            rope_theta = rope_params.get("rope_theta", rope_theta)
            rtype = rope_params.get("rope_type", rope_params.get("type", "default"))
            if rtype != "default":
                rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if rope_theta is None:
            if isinstance(rope_params, dict):
                raise ConfigError(f"{source}: missing field 'rope_parameters.rope_theta'")
            rope_theta = 10000.0  # transformers' Qwen3Config default
        if isinstance(rope_scaling, dict):
            rope_scaling = dict(rope_scaling)
            rtype = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if rtype in (None, "default"):
                rope_scaling = None
            else:
                rope_scaling["rope_type"] = rtype
                rope_scaling.pop("type", None)

        moe = mt == "qwen3_moe"
        cfg = cls(
            model_type=mt,
            hidden_size=hidden,
            intermediate_size=get("intermediate_size", 0) if moe else need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=get("num_key_value_heads", heads),
            # transformers falls back to hidden/heads when head_dim is absent; Qwen3 configs set it.
            head_dim=get("head_dim", hidden // heads if isinstance(hidden, int) and isinstance(heads, int)
                         and heads > 0 else None),
            vocab_size=need("vocab_size"),
            rms_norm_eps=get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=get("max_position_embeddings", 40960),
            tie_word_embeddings=get("tie_word_embeddings", False),
            attention_bias=get("attention_bias", False),
            hidden_act=get("hidden_act", "silu"),
            num_experts=need("num_experts", "num_local_experts") if moe else 0,
            num_experts_per_tok=need("num_experts_per_tok") if moe else 0,
            moe_intermediate_size=need("moe_intermediate_size") if moe else 0,
            norm_topk_prob=get("norm_topk_prob", False) if moe else True,
            decoder_sparse_step=get("decoder_sparse_step", 1) if moe else 1,
            mlp_only_layers=list(get("mlp_only_layers", [])) if moe else [],
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            torch_dtype=d.get("torch_dtype", d.get("dtype")),
            source=source,
        )
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
        src = self.source

        def positive_int(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"{src}: field {name!r} must be an integer, got {v!r}")
            if v < 0 or (v == 0 and not allow_zero):
                raise ConfigError(f"{src}: field {name!r} must be {'>= 0' if allow_zero else '> 0'}, got {v}")

        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "vocab_size", "max_position_embeddings"):
            positive_int(name)
        positive_int("intermediate_size", allow_zero=self.model_type == "qwen3_moe")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"{src}: num_attention_heads ({self.num_attention_heads}) is not divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"{src}: head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{src}: field {name!r} must be a positive number, got {v!r}")
        if self.hidden_act != "silu":
            raise ConfigError(f"{src}: hidden_act {self.hidden_act!r} is not supported (Qwen3 uses 'silu')")
        if self.rope_scaling is not None:
            rt = self.rope_scaling.get("rope_type")
            if rt not in ROPE_TYPES:
                raise ConfigError(f"{src}: rope_scaling.rope_type {rt!r} is not supported (one of {ROPE_TYPES})")
            f = self.rope_scaling.get("factor")
            if f is not None and (not isinstance(f, (int, float)) or f <= 0):
                raise ConfigError(f"{src}: rope_scaling.factor must be a positive number, got {f!r}")
        if self.model_type == "qwen3_moe":
            for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step"):
                positive_int(name)
            if self.num_experts_per_tok > self.num_experts:
                raise ConfigError(
                    f"{src}: num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts "
                    f"({self.num_experts})"
                )
            bad = [i for i in self.mlp_only_layers if not isinstance(i, int) or not 0 <= i < self.num_hidden_layers]
            if bad:
                raise ConfigError(f"{src}: mlp_only_layers has indices outside 0..{self.num_hidden_layers - 1}: {bad}")
            dense_layers = [i for i in range(self.num_hidden_layers) if not self.is_moe_layer(i)]
            if dense_layers:
                positive_int("intermediate_size")  # dense layers of a MoE model use intermediate_size

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


def load_config(path: str | Path) -> Qwen3Config:
    return Qwen3Config.from_file(path)
