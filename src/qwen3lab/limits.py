"""Upper limits on the sizes a config.json may declare: the one place they are stated.

Why limits at all: a config is the first thing every command reads, and every shape, loop and
allocation follows from it. `num_hidden_layers: 10**9` or `num_experts: 10**8` used to send `params`
and `generate` into shape loops that never ended; a bound checked at parse time turns that into one
clear error naming the key.

How they were chosen: from the largest released Qwen3 models (Qwen3-235B-A22B: 94 layers, hidden 4096,
64 query / 4 kv heads, head_dim 128, 128 experts of width 1536, 8 active, vocab 151,936; Qwen3-32B:
MLP width 25,600; Qwen3-Coder-480B-A35B: hidden 6144, 96 heads, 160 experts, 262,144 positions) with
ten times headroom or more, rounded to a power of two, so that a future or experimental Qwen3 still
loads while a typo of a few extra digits (or a hostile file) does not.
"""

from __future__ import annotations

MAX_LAYERS = 1024  # deepest Qwen3: 94 layers
MAX_HIDDEN = 65536  # widest Qwen3: 6144
MAX_INTERMEDIATE = 262144  # widest MLP: 25,600 (dense), 2560 (one expert)
MAX_HEADS = 1024  # most query heads: 96 (kv heads: 8)
MAX_HEAD_DIM = 1024  # every Qwen3: 128
MAX_EXPERTS = 4096  # most experts: 160
MAX_VOCAB = 2**22  # 4,194,304; Qwen3: 151,936
MAX_POSITIONS = 2**24  # 16,777,216; Qwen3: 262,144 native, ~1M with YaRN
# layers x experts is the number of expert MLPs the shape tables (and `params`, `make-model`) list
# one by one: 235B-A22B has 94 x 128 = 12,032, Coder-480B 62 x 160 = 9,920. At 2**16 (five times
# the most) `params` takes about two seconds on a slow CPU; past it, time grows without bound.
MAX_EXPERT_MLPS = 2**16

# integer field -> (smallest, largest) allowed value
INT_BOUNDS: dict[str, tuple[int, int]] = {
    "num_hidden_layers": (1, MAX_LAYERS),
    "hidden_size": (1, MAX_HIDDEN),
    "intermediate_size": (1, MAX_INTERMEDIATE),
    "num_attention_heads": (1, MAX_HEADS),
    "num_key_value_heads": (1, MAX_HEADS),
    "head_dim": (1, MAX_HEAD_DIM),
    "vocab_size": (1, MAX_VOCAB),
    "max_position_embeddings": (1, MAX_POSITIONS),
    "num_experts": (1, MAX_EXPERTS),
    "num_experts_per_tok": (1, MAX_EXPERTS),
    "moe_intermediate_size": (1, MAX_INTERMEDIATE),
    "decoder_sparse_step": (1, MAX_LAYERS),
    "original_max_position_embeddings": (1, MAX_POSITIONS),
}
