"""The tiny Qwen3 config built from command-line sizes, and the token list it runs on.

Defaults: 2 layers, hidden 8, 2 query heads, 2 kv heads, head_dim 4, MLP 16, context 4, vocab 10,
tokens 1,3,7,2 -- small enough that every matrix fits in an 80-column terminal. `moe=True` makes every
layer a Qwen3-MoE block (4 experts, top-2, each expert's MLP as wide as `di`). rope_theta and
rms_norm_eps are Qwen3's real values; the lm_head is untied so it is its own matrix to read and edit.

`check_model_size` is what keeps `--model DIR` to checkpoints whose matrices a person can read.
"""

from __future__ import annotations

from ..config import Qwen3Config
from ..errors import ConfigError, InputError
from ..shapes import expected_shapes

DEFAULTS = dict(nlayer=2, d=8, nh=2, nkvh=2, dh=4, di=16, dctx=4, dvoc=10, experts=4, topk=2)
DEFAULT_TOKENS = (1, 3, 7, 2)

# Printing every matrix in full stops being readable long before these; past them tiny mode refuses.
MAX_PARAMS = 2_000_000
MAX_DIM = 512  # hidden, intermediate, vocab, heads * head_dim


def tiny_config(nlayer: int = 2, d: int = 8, nh: int = 2, nkvh: int = 2, dh: int = 4, di: int = 16,
                dctx: int = 4, dvoc: int = 10, moe: bool = False, experts: int = 4, topk: int = 2,
                rope_theta: float = 1_000_000.0, eps: float = 1e-6) -> Qwen3Config:
    """A validated Qwen3Config with the tiny sizes (names as the `qwen3lab tiny` flags)."""
    sizes = dict(nlayer=nlayer, d=d, nh=nh, nkvh=nkvh, dh=dh, di=di, dctx=dctx, dvoc=dvoc)
    if moe:
        sizes.update(experts=experts, topk=topk)
    for flag, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"tiny: --{flag} must be a positive integer, got {v!r}")
    _check_flag_sizes(sizes)
    d_cfg = {
        "model_type": "qwen3_moe" if moe else "qwen3",
        "hidden_size": d, "intermediate_size": di, "num_hidden_layers": nlayer,
        "num_attention_heads": nh, "num_key_value_heads": nkvh, "head_dim": dh, "vocab_size": dvoc,
        "max_position_embeddings": dctx, "rms_norm_eps": eps, "rope_theta": rope_theta,
        "tie_word_embeddings": False, "torch_dtype": "float32",
    }
    if moe:
        d_cfg.update(num_experts=experts, num_experts_per_tok=topk, moe_intermediate_size=di,
                     norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    return Qwen3Config.from_dict(d_cfg, source="qwen3lab tiny flags")


def _check_flag_sizes(sizes: dict[str, int]) -> None:
    """check_model_size's limits applied to the flags themselves, before a config or any weight is built (a
    config of a million layers is slow to even validate)."""
    dims = {"--d": sizes["d"], "--dvoc": sizes["dvoc"], "--di": sizes["di"], "--nh * --dh": sizes["nh"] * sizes["dh"]}
    for flag, v in dims.items():
        if v > MAX_DIM:
            raise ConfigError(f"tiny: {flag} is {v}; tiny mode prints every matrix in full and accepts at most "
                              f"{MAX_DIM} per dimension. Use `qwen3lab verify` for full-size models.")
    n = _flag_parameter_count(**sizes)
    if n > MAX_PARAMS:
        given = " ".join(f"--{k} {v}" for k, v in sizes.items())
        raise ConfigError(f"tiny: {given} gives {n:,} parameters; tiny mode accepts at most {MAX_PARAMS:,}. "
                          f"Use `qwen3lab verify` for full-size models.")


def _flag_parameter_count(nlayer, d, nh, nkvh, dh, di, dctx, dvoc, experts=None, topk=None) -> int:
    """parameter_count of the config tiny_config would build, from the flags (exact Python ints, any size)."""
    attn = d * nh * dh * 2 + d * nkvh * dh * 2 + 2 * dh  # q, o, k, v, q_norm, k_norm
    mlp = 3 * d * di if experts is None else experts * 3 * d * di + experts * d  # experts + router
    return 2 * dvoc * d + d + nlayer * (attn + mlp + 2 * d)  # embed + lm_head (untied), norms


def parse_tokens(tokens, cfg: Qwen3Config) -> list[int]:
    """'1,3,7,2' or [1, 3, 7, 2] -> [1, 3, 7, 2], each a valid id, no more than the context length."""
    if tokens is None:
        tokens = list(DEFAULT_TOKENS)
    if isinstance(tokens, str):
        parts = [p.strip() for p in tokens.replace(" ", ",").split(",") if p.strip()]
        try:
            ids = [int(p) for p in parts]
        except ValueError:
            raise InputError(f"--tokens must be comma-separated integers, got {tokens!r}") from None
    else:
        ids = [int(t) for t in tokens]
    if not ids:
        raise InputError("--tokens is empty: give at least one token id")
    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise InputError(f"--tokens: invalid token id {bad[0]}: ids must be in 0..{cfg.vocab_size - 1} "
                         f"(vocab size {cfg.vocab_size}, flag --dvoc)")
    if len(ids) > cfg.max_position_embeddings:
        raise InputError(f"--tokens: {len(ids)} tokens exceed the context length {cfg.max_position_embeddings} "
                         f"(flag --dctx / max_position_embeddings)")
    return ids


def parameter_count(cfg: Qwen3Config) -> int:
    n = 0
    for shape in expected_shapes(cfg).values():
        k = 1
        for s in shape:
            k *= s
        n += k
    return n


def check_model_size(cfg: Qwen3Config, where: str) -> None:
    """Refuse checkpoints too large to print in full, naming the field that is too large."""
    dims = {
        "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
        "num_attention_heads * head_dim": cfg.num_attention_heads * cfg.head_dim,
        "intermediate_size": cfg.intermediate_size if not cfg.is_moe else cfg.moe_intermediate_size,
    }
    for name, v in dims.items():
        if v > MAX_DIM:
            raise ConfigError(
                f"{where}: {name} is {v}; tiny mode prints every matrix in full and accepts at most {MAX_DIM} "
                f"per dimension. Use `qwen3lab verify` for full-size models."
            )
    n = parameter_count(cfg)
    if n > MAX_PARAMS:
        raise ConfigError(
            f"{where}: {n:,} parameters; tiny mode accepts at most {MAX_PARAMS:,}. "
            f"Use `qwen3lab verify` for full-size models."
        )
