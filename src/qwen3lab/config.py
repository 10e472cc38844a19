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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import limits
from .config_fields import (
    DTYPES,
    HIDDEN_ACTS,
    MODEL_TYPES,
    ROPE_TYPES,
    SCALED_ROPE_TYPES,
    Reader,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_rope,
    kind_of,
    layer_list,
    model_type_of,
    read_rope,
    show,
    token_ids_field,
)
from .errors import ConfigError
from .jsonio import read_json

__all__ = ["DTYPES", "HIDDEN_ACTS", "MODEL_TYPES", "ROPE_TYPES", "SCALED_ROPE_TYPES", "Qwen3Config", "load_config",
           "show"]


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
            raise ConfigError(f"{source}: expected a JSON object, got {kind_of(d)}")
        mt = model_type_of(d, source)
        r = Reader(d, source, mt)
        moe = mt == "qwen3_moe"
        heads = r.int("num_attention_heads")
        hidden = r.int("hidden_size")
        layers = r.int("num_hidden_layers")
        rope_theta, rope_scaling = read_rope(d, source)
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
            mlp_only_layers=layer_list(source, "mlp_only_layers", d.get("mlp_only_layers"), layers) if moe else [],
            bos_token_id=token_ids_field(source, "bos_token_id", d.get("bos_token_id")),
            eos_token_id=token_ids_field(source, "eos_token_id", d.get("eos_token_id")),
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
            check_int(src, name, getattr(self, name))
        check_int(src, "intermediate_size", self.intermediate_size, low=0 if moe else 1)
        check_number(src, "rms_norm_eps", self.rms_norm_eps, above=0.0)
        check_number(src, "rope_theta", self.rope_theta, above=1.0)
        for name in ("tie_word_embeddings", "attention_bias", "norm_topk_prob"):
            check_bool(src, name, getattr(self, name))
        check_choice(src, "hidden_act", self.hidden_act, HIDDEN_ACTS)
        if self.torch_dtype is not None:
            check_choice(src, "torch_dtype", self.torch_dtype, DTYPES)
        token_ids_field(src, "bos_token_id", self.bos_token_id)
        token_ids_field(src, "eos_token_id", self.eos_token_id)
        if self.rope_scaling is not None:
            check_rope(src, "rope_scaling", self.rope_scaling)
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
        layer_list(src, "mlp_only_layers", self.mlp_only_layers, self.num_hidden_layers)
        if not all(self.is_moe_layer(i) for i in range(self.num_hidden_layers)):
            check_int(src, "intermediate_size", self.intermediate_size)  # dense layers of a MoE model use it

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
