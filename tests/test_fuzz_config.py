"""Fuzzing config.json's schema (issue 13): every mutation of a valid config either loads with exactly the
values written, or raises one ConfigError naming the mutated key; nothing else (no traceback, no hang,
no silently accepted invalid value). Plus a regression case for each config example in the issue."""

from __future__ import annotations

import json
import math
import time
from importlib import resources
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from fuzz_settings import deadline, fuzz
from qwen3lab import limits
from qwen3lab.config import Qwen3Config, show
from qwen3lab.errors import ConfigError
from qwen3lab.presets import PRESETS, preset_dict

pytestmark = pytest.mark.slow

SRC = "fuzz.json"

# ---- the valid configs that get mutated -----------------------------------------------------------------
# head_dim is deliberately not hidden/heads (64/4 = 16), as in every real Qwen3, so a null head_dim shows.
DENSE = {"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 1000,
         "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 4096,
         "tie_word_embeddings": True, "attention_bias": False, "hidden_act": "silu", "bos_token_id": 1,
         "eos_token_id": [2, 3], "torch_dtype": "bfloat16", "use_sliding_window": False,
         "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}}
MOE = {**DENSE, "model_type": "qwen3_moe", "num_experts": 8, "num_experts_per_tok": 2,
       "moe_intermediate_size": 32, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [0],
       "tie_word_embeddings": False, "rope_scaling": None}
# the transformers-5 layout: rope_parameters holds rope_theta, experts are num_local_experts, dtype not torch_dtype
T5 = {k: v for k, v in MOE.items() if k not in ("rope_theta", "rope_scaling", "num_experts", "torch_dtype")}
T5.update(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}, num_local_experts=8,
          dtype="float32")
BASES = {"dense": DENSE, "moe": MOE, "t5": T5}

MOE_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
            "decoder_sparse_step", "mlp_only_layers")
FIELD = {"num_local_experts": "num_experts", "dtype": "torch_dtype"}  # alias key -> field
ALSO_NAMED = {"num_local_experts": "num_experts", "dtype": "torch_dtype"}  # relation messages use field names
# keys each base gets mutated at: its own, plus keys it lacks that a config may hold
KEYS = {name: sorted({*d, *MOE_KEYS, "use_sliding_window", "partial_rotary_factor"} - {"model_type"})
        for name, d in BASES.items()}
DTYPE_NAMES = {"float32", "bfloat16", "float16", "float64", "float", "half", "double", "float8_e4m3fn",
               "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz"}


# ---- values ------------------------------------------------------------------------------------------------
ATOMS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.integers(-2**70, 2**70),
    st.sampled_from([2**31, 2**63 - 1, 2**64, 10**6, 10**8, 10**100]),
    st.integers(4000, 5000).map(lambda n: 10**n),  # past str()'s 4300-digit limit (not in a strategy's repr)
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 64.0, 2.0, 1e-6, 0.5, -0.0]),
    st.text(max_size=12),
    st.sampled_from(["true", "false", "True", "null", "0", "1", "64", "1e-6", "NaN", "silu", "qwen3", "bfloat16",
                     "yarn"]),
    st.integers(100, 6000).map(lambda n: "x" * n),
)
VALUES = st.recursive(ATOMS, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=5), kids,
                                                                                         max_size=3), max_leaves=8)


def near(key: str):
    """Values around what `key` allows: its bounds, valid values, and their look-alikes."""
    if key in limits.INT_BOUNDS or key == "num_local_experts":
        lo, hi = limits.INT_BOUNDS[FIELD.get(key, key)]
        return st.integers(lo - 2, lo + 6) | st.integers(hi - 1, hi + 1) | st.integers(lo, min(hi, 256))
    if key in ("rms_norm_eps", "rope_theta", "partial_rotary_factor"):
        return st.floats(-1.0, 1e7) | st.integers(-1, 10**7) | st.just(1.0)
    if key in ("bos_token_id", "eos_token_id"):
        return st.integers(-1, limits.MAX_VOCAB + 1) | st.lists(st.integers(-1, 200_000), max_size=3)
    if key == "mlp_only_layers":
        return st.lists(st.integers(-1, 5), max_size=5)
    if key in ("torch_dtype", "dtype"):
        return st.sampled_from(sorted(DTYPE_NAMES) + ["int3", "fp8", "torch.float32", "auto", "BF16"])
    if key == "hidden_act":
        return st.sampled_from(["silu", "gelu", "swish", "SiLU", "relu"])
    return st.booleans()


# ---- the oracle: what the schema allows, restated independently of config.py -------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _int_in(key: str, v, low: int | None = None) -> bool:
    lo, hi = limits.INT_BOUNDS[FIELD.get(key, key)]
    return _is_int(v) and (lo if low is None else low) <= v <= hi


def _ids_ok(v) -> bool:
    ids = v if isinstance(v, list) else [v]
    return all(_is_int(t) and 0 <= t < limits.MAX_VOCAB for t in ids)


def expect(base: str, key: str, v):
    """("set", value the field must hold) | ("same",) config unchanged | ("bad",) a ConfigError."""
    d = BASES[base]
    moe = d["model_type"] == "qwen3_moe"
    bad = ("bad",)
    if key in MOE_KEYS + ("num_local_experts",) and not moe:
        return ("same",)  # a dense Qwen3 ignores MoE keys, as transformers' Qwen3Config does
    if key == "rope_theta" and "rope_parameters" in d:
        return ("same",)  # rope_parameters.rope_theta wins (transformers 5)
    if key == "num_experts" and v is None and "num_local_experts" in d:
        return ("same",)  # null means absent: its transformers-5 name still gives the count
    if key in ("num_key_value_heads", "head_dim") and v is None:  # null means absent, as in transformers
        return ("set", d["num_attention_heads"] if key == "num_key_value_heads"
                else d["hidden_size"] // d["num_attention_heads"])
    if key == "intermediate_size" and moe:
        return ("set", 0) if v is None else ("set", v) if _int_in(key, v, low=0) else bad
    if key in limits.INT_BOUNDS or key == "num_local_experts":
        return ("set", v) if _int_in(key, v) else bad
    if key in ("tie_word_embeddings", "attention_bias", "norm_topk_prob"):
        return ("set", v) if isinstance(v, bool) else bad
    if key == "use_sliding_window":
        return ("same",) if v is False else bad  # sliding-window attention is not implemented
    if key == "partial_rotary_factor":
        return ("same",) if _finite(v) and v == 1 else bad
    if key == "rms_norm_eps":
        return ("set", v) if _finite(v) and v > 0 else bad
    if key == "rope_theta":
        return ("set", 10000.0) if v is None else ("set", v) if _finite(v) and v > 1 else bad
    if key == "hidden_act":
        return ("set", v) if v == "silu" and isinstance(v, str) else bad
    if key in ("torch_dtype", "dtype"):
        return ("set", v) if v is None or (isinstance(v, str) and v in DTYPE_NAMES) else bad
    if key in ("bos_token_id", "eos_token_id"):
        return ("set", v) if v is None or _ids_ok(v) else bad
    if key == "mlp_only_layers":
        if v is None:
            return ("set", [])
        ok = isinstance(v, list) and all(_is_int(i) and 0 <= i < d["num_hidden_layers"] for i in v)
        return ("set", v) if ok and len(set(v)) == len(v) else bad
    if key in ("rope_scaling", "rope_parameters"):
        return rope_expect(d, key, v)
    raise AssertionError(f"no oracle for {key}")


def relations_ok(d: dict) -> bool:
    """The cross-field rules, for a config whose every value is fine on its own."""
    heads = d["num_attention_heads"]
    kv = d.get("num_key_value_heads") or heads
    hd = d["head_dim"] if d.get("head_dim") is not None else d["hidden_size"] // heads
    if hd < 1 or hd % 2 or heads % kv:
        return False
    if d["model_type"] != "qwen3_moe":
        return True
    experts, layers = d.get("num_experts") or d.get("num_local_experts"), d["num_hidden_layers"]
    mlp_only = d.get("mlp_only_layers") or []
    if d["num_experts_per_tok"] > experts or layers * experts > limits.MAX_EXPERT_MLPS:
        return False
    if any(i >= layers for i in mlp_only):
        return False
    step = d.get("decoder_sparse_step", 1)
    has_dense = any(i in mlp_only or (i + 1) % step for i in range(layers))
    return not has_dense or (d.get("intermediate_size") or 0) > 0


ROPE_TYPES = ("yarn", "linear", "dynamic")


def rope_expect(d: dict, key: str, rs):
    """Expected rope_scaling field for a mutated rope_scaling / rope_parameters object (transformers' rules)."""
    bad = ("bad",)
    if rs is None:  # plain RoPE (T5 then has no rope_theta anywhere: transformers' default 10000)
        return ("set", None)
    if not isinstance(rs, dict):
        return bad
    rtype = rs.get("rope_type", rs.get("type"))
    if key == "rope_parameters" and not (_finite(rs.get("rope_theta")) and rs["rope_theta"] > 1):
        return bad
    if rtype is None:
        return bad if set(rs) - {"rope_theta", "rope_type", "type"} else ("set", None)
    if not isinstance(rtype, str) or rtype not in ROPE_TYPES + ("default",):
        return bad
    if rtype == "default":
        return ("set", None)
    out = {k: v for k, v in rs.items() if k not in ("type", "rope_theta")}
    out["rope_type"] = rtype
    if not (_finite(rs.get("factor")) and rs["factor"] >= 1):
        return bad
    if rtype == "yarn":
        omp = rs.get("original_max_position_embeddings")
        if omp is not None and not _int_in("original_max_position_embeddings", omp):
            return bad
        for name in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            if rs.get(name) is not None and not (_finite(rs[name]) and rs[name] > 0):
                return bad
        if rs.get("truncate") is not None and not isinstance(rs["truncate"], bool):
            return bad
        if (rs.get("beta_fast") or 32) < (rs.get("beta_slow") or 1):
            return bad
    return ("set", out)


# ---- checking one outcome -------------------------------------------------------------------------------
def error_of(d) -> str | None:
    """The ConfigError message for config dict `d`, or None when it loads. Any other exception fails."""
    try:
        Qwen3Config.from_dict(d, source=SRC)
    except ConfigError as e:
        msg = str(e)
        assert msg.startswith(f"{SRC}: ") and "\n" not in msg and len(msg) < 800, msg
        return msg
    return None


def check(base: str, key: str, value, d: dict) -> None:
    outcome = expect(base, key, value)
    msg = error_of(d)
    names = (key, ALSO_NAMED.get(key, key))
    if outcome[0] == "bad" or not relations_ok(d):
        assert msg is not None, f"{base}: accepted {key} = {show(value)}"
        assert any(n in msg for n in names), f"{key} = {show(value)}: message does not name the key: {msg}"
        return
    assert msg is None, f"{base}: refused valid {key} = {show(value)}: {msg}"
    cfg = Qwen3Config.from_dict(d, source=SRC)
    if outcome[0] == "same":
        assert cfg == Qwen3Config.from_dict(BASES[base], source=SRC)
    elif key in ("rope_scaling", "rope_parameters"):
        assert cfg.rope_scaling == outcome[1]
    else:
        got = getattr(cfg, FIELD.get(key, key))
        assert got == outcome[1] and type(got) is type(outcome[1]), f"{key}: wrote {show(value)}, read {show(got)}"


# ---- fuzzing -------------------------------------------------------------------------------------------
@fuzz(150)
@given(data=st.data())
def test_mutated_value(data):
    """One key replaced by anything: a wrong type, out of range, NaN/Inf, a huge int, a string of a bool,
    nested lists and objects, or a value near its bounds."""
    base = data.draw(st.sampled_from(sorted(BASES)), label="base")
    key = data.draw(st.sampled_from(KEYS[base]), label="key")
    value = data.draw(VALUES | near(key), label="value")
    check(base, key, value, {**BASES[base], key: value})


@pytest.mark.parametrize("base,key", [(b, k) for b in sorted(BASES) for k in sorted(BASES[b])])
def test_removed_key(base, key):
    """Required keys missing -> 'missing field'; optional ones fall back to transformers' defaults."""
    d = {k: v for k, v in BASES[base].items() if k != key}
    required = {"model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size"}
    if BASES[base]["model_type"] == "qwen3":
        required.add("intermediate_size")
    msg = error_of(d)
    if key in required:
        assert msg is not None and "missing field '" in msg and f"'{key}'" in msg, msg
    elif key == "intermediate_size":  # MoE: 0, but layer 0 (mlp_only_layers) is a dense MLP and needs it
        assert msg is not None and "field 'intermediate_size' must be > 0, got 0" in msg, msg
    else:
        assert msg is None, msg


@fuzz(30)
@given(base=st.sampled_from(sorted(BASES)), extra=st.dictionaries(st.text(min_size=1, max_size=20), VALUES,
                                                                  min_size=1, max_size=4))
def test_unknown_keys_are_ignored(base, extra):
    """Keys qwen3lab does not read are kept in the file and ignored, as transformers ignores them."""
    known = {*KEYS[base], "model_type", "rope_theta", "rope_scaling", "rope_parameters", "num_local_experts",
             "dtype", "torch_dtype", "type"}
    extra = {k: v for k, v in extra.items() if k not in known}
    d = {**BASES[base], **extra}
    assert Qwen3Config.from_dict(d, source=SRC) == Qwen3Config.from_dict(BASES[base], source=SRC)


ROPE_NUMBERS = st.floats(0.5, 64.0) | st.integers(-1, 70_000) | st.floats(allow_nan=True, allow_infinity=True) | VALUES


@fuzz(90)
@given(data=st.data())
def test_mutated_rope(data):
    """rope_scaling / rope_parameters objects of every shape: type names (and the old `type` key), factors,
    yarn's optional keys, wrong types, missing keys."""
    base = data.draw(st.sampled_from(["dense", "t5"]), label="base")
    key = "rope_parameters" if base == "t5" else "rope_scaling"
    names = st.sampled_from(["yarn", "linear", "dynamic", "default"])
    rtype = names | st.sampled_from(["longrope", "YARN", ""]) | VALUES
    optional = {"type": rtype, "factor": ROPE_NUMBERS, "original_max_position_embeddings": ROPE_NUMBERS,
                "attention_factor": ROPE_NUMBERS, "beta_fast": ROPE_NUMBERS, "beta_slow": ROPE_NUMBERS,
                "truncate": st.booleans() | VALUES, "rope_theta": ROPE_NUMBERS}
    rs = data.draw(st.fixed_dictionaries({}, optional={"rope_type": rtype, **optional}) | VALUES, label=key)
    if base == "t5" and isinstance(rs, dict) and data.draw(st.booleans(), label="theta"):
        rs["rope_theta"] = 500000.0  # mostly a valid base, so the rest of the object gets tested
    if base == "dense" and isinstance(rs, dict):
        rs.pop("rope_theta", None)  # tested below: inside rope_scaling it replaces the top-level base
    check(base, key, rs, {**BASES[base], key: rs})


@fuzz(20)
@given(mt=(VALUES | st.sampled_from(["Qwen3", "qwen2", "qwen3-moe", "llama", " qwen3"])).filter(
    lambda v: v not in ("qwen3", "qwen3_moe")))
def test_model_type(mt):
    """Anything but the two model types (a list, a number, a near-miss string) is one clear error."""
    msg = error_of({**DENSE, "model_type": mt})
    assert msg is not None and "model_type" in msg and "qwen3_moe" in msg, msg


# ---- the issue's examples -------------------------------------------------------------------------------
YARN_NO_FACTOR = {"rope_type": "yarn", "original_max_position_embeddings": 32768}
ISSUE = [  # (base, key, value, words the message must hold)
    ("dense", "rope_scaling", ["yarn", 4.0], "field 'rope_scaling' must be an object"),
    ("dense", "rope_scaling", "yarn", "field 'rope_scaling' must be an object"),
    ("t5", "rope_parameters", 4.0, "field 'rope_parameters' must be an object"),
    ("dense", "rope_scaling", YARN_NO_FACTOR, "missing field 'rope_scaling.factor'"),
    ("dense", "rope_scaling", {"type": "linear"}, "missing field 'rope_scaling.factor'"),
    ("dense", "rope_scaling", {"factor": 4.0}, "'rope_scaling.rope_type' is missing (one of default, yarn, "
     "linear, dynamic) but rope_scaling sets ['factor']"),
    ("dense", "rope_scaling", {"\n": 1}, "but rope_scaling sets ['\\n']"),
    ("dense", "rope_scaling", {"rope_type": "linear", "factor": "4.0"}, "'rope_scaling.factor' must be a finite"),
    ("dense", "rope_scaling", {"rope_type": "linear", "factor": -2.0}, "'rope_scaling.factor' must be a finite"),
    ("dense", "rope_scaling", {"rope_type": "dynamic", "factor": 0.5}, "'rope_scaling.factor' must be a finite"),
    ("dense", "rope_scaling", {"rope_type": "yarn", "factor": math.nan}, "got NaN"),
    ("dense", "rope_scaling", {"rope_type": "yarn", "factor": math.inf}, "got Infinity"),
    ("t5", "rope_parameters", {"rope_type": "linear", "factor": -math.inf, "rope_theta": 1e6}, "got -Infinity"),
    ("dense", "rope_scaling", {**YARN_NO_FACTOR, "factor": 4.0, "original_max_position_embeddings": 0},
     "'rope_scaling.original_max_position_embeddings' must be > 0, got 0"),
    ("dense", "rope_scaling", {**YARN_NO_FACTOR, "factor": 4.0, "original_max_position_embeddings": "32768"},
     "'rope_scaling.original_max_position_embeddings' must be an integer"),
    ("dense", "rope_scaling", {**YARN_NO_FACTOR, "factor": 4.0, "original_max_position_embeddings": -1},
     "must be > 0, got -1"),
    ("dense", "rope_scaling", {"rope_type": ["yarn"], "factor": 4.0}, "'rope_scaling.rope_type' ['yarn']"),
    ("dense", "rope_scaling", {"rope_type": "yarn", "factor": 4.0, "beta_fast": 1, "beta_slow": 32},
     "'rope_scaling.beta_fast' (1) must be >= 'rope_scaling.beta_slow' (32)"),
    ("dense", "model_type", ["qwen3"], "field 'model_type' must be a string, got ['qwen3'] (a list)"),
    ("moe", "mlp_only_layers", 3, "field 'mlp_only_layers' must be a list"),
    ("moe", "mlp_only_layers", [True], "field 'mlp_only_layers[0]' must be a layer index"),
    ("moe", "mlp_only_layers", [4], "'mlp_only_layers[0]' must be a layer index, an integer in 0..3"),
    ("moe", "mlp_only_layers", [1, 1], "lists layer 1 twice"),
    ("dense", "eos_token_id", "151645", "field 'eos_token_id' must be a token id"),
    ("dense", "eos_token_id", 2.0, "field 'eos_token_id' must be a token id"),
    ("dense", "eos_token_id", [2, "3"], "field 'eos_token_id[1]' must be a token id"),
    ("dense", "eos_token_id", True, "got true (a boolean)"),
    ("dense", "bos_token_id", -1, "field 'bos_token_id' must be a token id"),
    ("dense", "tie_word_embeddings", "false", "field 'tie_word_embeddings' must be true or false, got 'false'"),
    ("dense", "attention_bias", "false", "field 'attention_bias' must be true or false"),
    ("moe", "norm_topk_prob", "false", "field 'norm_topk_prob' must be true or false"),
    ("moe", "norm_topk_prob", 5, "field 'norm_topk_prob' must be true or false, got 5 (an integer)"),
    ("dense", "tie_word_embeddings", 0, "got 0 (an integer)"),
    ("dense", "tie_word_embeddings", None, "got null"),
    ("dense", "num_hidden_layers", 10**6, "field 'num_hidden_layers' must be at most 1,024"),
    ("dense", "num_hidden_layers", 2**64, "got 18446744073709551616"),
    ("dense", "num_hidden_layers", 10**5000, "got an integer of about 5,001 digits"),
    ("moe", "num_experts", 10**8, "field 'num_experts' must be at most 4,096"),
    ("t5", "num_local_experts", 10**8, "field 'num_local_experts' must be at most 4,096"),
    ("dense", "hidden_size", 64.0, "field 'hidden_size' must be an integer, got 64.0 (a number)"),
    ("dense", "vocab_size", "1000", "field 'vocab_size' must be an integer, got '1000' (a string)"),
    ("dense", "rms_norm_eps", math.nan, "field 'rms_norm_eps' must be a finite number > 0, got NaN"),
    ("dense", "rope_theta", math.inf, "field 'rope_theta' must be a finite number > 1"),
    ("dense", "hidden_act", "gelu", "field 'hidden_act' must be one of 'silu'"),
    ("dense", "torch_dtype", ["bfloat16"], "field 'torch_dtype' must be one of"),
    ("dense", "use_sliding_window", True, "sliding-window attention is not supported"),
    ("dense", "partial_rotary_factor", 0.5, "field 'partial_rotary_factor' must be 1.0"),
    ("dense", "max_position_embeddings", None, "field 'max_position_embeddings' must be an integer, got null"),
]


@pytest.mark.parametrize("base,key,value,words", ISSUE, ids=[f"{k}={show(v, 20)}" for _, k, v, _ in ISSUE])
def test_issue_examples(base, key, value, words):
    msg = error_of({**BASES[base], key: value})
    assert msg is not None, f"accepted {key} = {show(value)}"
    assert words in msg, msg


def test_expert_mlps_are_bounded():
    """layers x experts is bounded too: each allowed alone, together they would list 4 million expert MLPs."""
    msg = error_of({**MOE, "num_hidden_layers": 1024, "num_experts": 4096})
    assert "num_hidden_layers x num_experts = 1024 x 4096 = 4,194,304 expert MLPs" in msg, msg
    assert error_of({**MOE, "num_hidden_layers": 512, "num_experts": 128}) is None  # 65,536: the bound


def test_deep_nesting_and_huge_strings_are_shortened():
    """A value nested 100,000 deep or a 10 MB string is named in a short message, not a RecursionError."""
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    for key, value in (("vocab_size", deep), ("eos_token_id", deep), ("rope_scaling", deep),
                       ("mlp_only_layers", [deep]), ("hidden_act", "x" * 10_000_000)):
        msg = error_of({**MOE, key: value})
        assert msg is not None and key in msg and len(msg) < 400, msg


def test_rope_theta_inside_rope_scaling_wins():
    """transformers reads rope_scaling as its rope_parameters: a rope_theta inside it is the base."""
    cfg = Qwen3Config.from_dict({**DENSE, "rope_scaling": {"type": "linear", "factor": 2.0, "rope_theta": 5e5}})
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    msg = error_of({**DENSE, "rope_scaling": {"type": "linear", "factor": 2.0, "rope_theta": "5e5"}})
    assert "field 'rope_scaling.rope_theta' must be a finite number > 1" in msg, msg


def test_replace_is_checked_too():
    """Configs changed in code (presets' overrides, replace()) meet the same schema."""
    cfg = Qwen3Config.from_dict(MOE)
    for change, words in (({"num_hidden_layers": 10**6}, "must be at most 1,024"),
                          ({"tie_word_embeddings": "false"}, "true or false"),
                          ({"rope_scaling": {"rope_type": "yarn"}}, "missing field 'rope_scaling.factor'"),
                          ({"mlp_only_layers": [9]}, "mlp_only_layers[0]"),
                          ({"eos_token_id": [1.5]}, "eos_token_id[0]")):
        with pytest.raises(ConfigError, match=next(iter(change))) as e:
            cfg.replace(**change)
        assert words in str(e.value)


# ---- every real config still loads, with exactly its values ----------------------------------------------
CONFIG_DIR = resources.files("qwen3lab").joinpath("data", "configs")
FIXTURES = Path("/work/shared/fixtures/configs")
OFFICIAL = sorted(p.name for p in CONFIG_DIR.iterdir() if p.name.endswith(".json"))


def _same_values(raw: dict, cfg: Qwen3Config) -> None:
    for key, v in raw.items():
        field = FIELD.get(key, key)
        if key in ("rope_scaling", "rope_parameters") or not hasattr(cfg, field):
            continue
        got = getattr(cfg, field)
        assert got == v and type(got) is type(v), f"{key}: file has {v!r}, parsed {got!r}"


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_configs_load_unchanged(name):
    raw = json.loads(CONFIG_DIR.joinpath(name).read_text())
    cfg = Qwen3Config.from_file(str(CONFIG_DIR.joinpath(name)))
    _same_values(raw, cfg)
    assert cfg.rope_scaling is None and cfg.torch_dtype == "bfloat16"
    if FIXTURES.is_dir():  # the bundled copies are the published files
        assert json.loads((FIXTURES / name).read_text()) == raw
    # the limits leave at least five times headroom over every released size
    for key, (_, hi) in limits.INT_BOUNDS.items():
        if _is_int(raw.get(key)):
            assert raw[key] * 5 <= hi, f"{key} {raw[key]} is within 5x of the limit {hi}"
    if cfg.is_moe:
        assert cfg.num_hidden_layers * cfg.num_experts * 5 <= limits.MAX_EXPERT_MLPS


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load_unchanged(preset):
    raw = preset_dict(preset)
    _same_values(raw, Qwen3Config.from_dict(raw, source=preset))


# ---- the CLI and loading refuse at once ------------------------------------------------------------------


CLI_CASES = [
    ("dense", "num_hidden_layers", 10**6),
    ("dense", "num_hidden_layers", 2**64),
    ("moe", "num_experts", 10**8),
    ("dense", "rope_scaling", ["yarn"]),
    ("dense", "model_type", ["qwen3"]),
    ("moe", "mlp_only_layers", 1),
    ("moe", "norm_topk_prob", "false"),
]


@pytest.mark.parametrize("base,key,value", CLI_CASES, ids=[f"{k}={show(v, 20)}" for _, k, v in CLI_CASES])
def test_cli_params_refuses(tmp_path, base, key, value):
    from qwen3lab.cli import main

    path = tmp_path / "config.json"
    path.write_text(json.dumps({**BASES[base], key: value}))
    before = path.read_bytes()
    t0 = time.monotonic()
    with deadline(20):
        result = CliRunner().invoke(main, ["params", "--config", str(path)])
    assert time.monotonic() - t0 < 5
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith(f"error: {path}: ") and key in errors[0], result.stderr
    assert "Traceback" not in result.output and path.read_bytes() == before


def test_load_refuses_huge_layers_at_once(tmp_path):
    """`qwen3lab.load` (what generate and chat call) stops at config.json, before any weights or shapes."""
    import qwen3lab

    (tmp_path / "config.json").write_text(json.dumps({**MOE, "num_hidden_layers": 10**9}))
    with deadline(60), pytest.raises(ConfigError, match="field 'num_hidden_layers' must be at most 1,024"):
        qwen3lab.load(str(tmp_path))
