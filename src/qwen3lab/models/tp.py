"""Tensor parallel applied to Qwen3LMHeadModel from outside: which slice of each weight a rank holds, the
sharded module tree built from those slices, and the taps of all ranks gathered to canonical full shapes.

Split (Megatron style, as vLLM / nano-vllm): q/k/v and gate/up column-parallel (the rank's heads / the
rank's intermediate rows), o_proj and down_proj row-parallel (one all_reduce each), embedding and lm_head
split by vocabulary rows (embedding: one all_reduce; lm_head: logits all-gathered). KV heads are split when
there are at least as many as ranks, else each rank keeps the one KV head its query heads use (replicated).
MoE: the router is replicated, experts are split in contiguous blocks (rank r holds E/w of them); each rank
runs its local experts over the tokens routed to them and the partial [N, D] outputs are summed by ONE
all_reduce per layer (no all-to-all: every rank sees every token; cost = one [N, D] all_reduce a layer,
the same as a dense MLP's, and idle ranks when routing is unbalanced).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..config import Qwen3Config
from ..dist.layers import AllReduceSum, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from ..errors import InputError
from .paged_cache import KVPool, PagedSeqCache
from .torch_model import Qwen3LMHeadModel, _torch_dtype

HEAD_SITES = ("q", "k", "v", "q_norm", "k_norm", "q_rot", "k_rot", "attn")  # [N, H, Dh]: split on dim 1
KV_SITES = ("k", "v", "k_norm", "k_rot")
MLP_SITES = ("gate", "up", "act")  # dense layers [N, I]: split on the last dim (probs [Hq, T, S]: dim 0)


def check_tp(cfg: Qwen3Config, world: int) -> None:
    """InputError naming the config field that `world` ranks cannot split."""
    Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    if Hq % world:
        raise InputError(f"ndev={world} must divide num_attention_heads={Hq} (config.json)")
    if (Hkv % world if Hkv >= world else world % Hkv):
        raise InputError(f"ndev={world} and num_key_value_heads={Hkv} (config.json): one must divide the other")
    if cfg.vocab_size % world:
        raise InputError(f"ndev={world} must divide vocab_size={cfg.vocab_size} (config.json)")
    dense = [i for i in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(i)]
    if dense and cfg.intermediate_size % world:
        raise InputError(f"ndev={world} must divide intermediate_size={cfg.intermediate_size} (config.json)")
    if len(dense) < cfg.num_hidden_layers and cfg.num_experts % world:
        raise InputError(f"ndev={world} must divide num_experts={cfg.num_experts} (config.json)")


def kv_range(cfg: Qwen3Config, rank: int, world: int) -> tuple[int, int]:
    """The KV heads [lo, hi) rank holds (one replicated head when there are fewer KV heads than ranks)."""
    Hkv = cfg.num_key_value_heads
    if Hkv >= world:
        n = Hkv // world
        return rank * n, (rank + 1) * n
    j = rank * Hkv // world
    return j, j + 1


def shard_rule(cfg: Qwen3Config, rank: int, world: int):
    """name -> None (whole), "skip" (another rank's expert) or (dim, lo, hi): for weights.load_weights."""
    Dh, hq = cfg.head_dim, cfg.num_attention_heads // world
    k0, k1 = kv_range(cfg, rank, world)
    V = cfg.vocab_size // world
    E = cfg.num_experts // world if cfg.num_experts else 0
    I_ = cfg.intermediate_size // world

    def rule(name: str):
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return (0, rank * V, (rank + 1) * V)
        parts = name.split(".")
        if ".self_attn." in name:
            leaf = parts[-2]
            if leaf == "q_proj":
                return (0, rank * hq * Dh, (rank + 1) * hq * Dh)
            if leaf in ("k_proj", "v_proj"):
                return (0, k0 * Dh, k1 * Dh)
            if leaf == "o_proj" and parts[-1] == "weight":
                return (1, rank * hq * Dh, (rank + 1) * hq * Dh)
            return None
        if ".mlp.experts." in name:
            e = int(parts[parts.index("experts") + 1])
            return None if e // E == rank else "skip"
        if ".mlp." in name and parts[-2] in ("gate_proj", "up_proj"):
            return (0, rank * I_, (rank + 1) * I_)
        if ".mlp." in name and parts[-2] == "down_proj":
            return (1, rank * I_, (rank + 1) * I_)
        return None  # norms, router: replicated

    return rule


class Qwen3LMHeadModelShard(Qwen3LMHeadModel):
    """One rank's slice of the model: the same forward, with parallel leaves swapped in (see module doc)."""

    rank = 0
    world = 1

    def new_cache(self, capacity: int) -> PagedSeqCache:
        hkv = self.model.layers[0].self_attn.Hkv  # the rank's KV heads
        return PagedSeqCache.for_model(self.cfg, capacity, self.dtype, self.device, num_kv_heads=hkv)

    def new_kv_pool(self, num_blocks: int, block_size: int) -> KVPool:
        """The rank's paged KV pool [L, num_blocks, Hkv_rank, block_size, Dh]: its own KV heads only."""
        c = self.cfg
        return KVPool(c.num_hidden_layers, num_blocks, self.model.layers[0].self_attn.Hkv, block_size, c.head_dim,
                      self.dtype, self.device)

    def kv_block_bytes(self, block_size: int) -> int:
        """Bytes one block of new_kv_pool takes on this rank (every rank holds as many KV heads)."""
        return KVPool.block_bytes(self.cfg, block_size, self.dtype, self.model.layers[0].self_attn.Hkv)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device


def build_shard(cfg: Qwen3Config, weights: Mapping[str, torch.Tensor], rank: int, world: int,
                device: str | torch.device = "cpu", dtype: str | torch.dtype = torch.float32
                ) -> Qwen3LMHeadModelShard:
    """The rank's model from its slices ({hf_name: slice} as load_weights(shard=shard_rule(...)) gives)."""
    check_tp(cfg, world)
    dt, device = _torch_dtype(dtype), torch.device(device)
    with torch.device("meta"):
        model = Qwen3LMHeadModelShard(cfg)
    model.rank, model.world = rank, world

    def p(name: str) -> nn.Parameter:
        return nn.Parameter(weights[name].to(device=device, dtype=dt), requires_grad=False)

    rule = shard_rule(cfg, rank, world)
    for name in weights:
        if name == "lm_head.weight" or rule(name) == "skip":
            continue
        mod_path, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(mod_path), attr, p(name))
    V = cfg.vocab_size // world
    m = model.model
    m.embed_tokens = VocabParallelEmbedding(m.embed_tokens.weight, rank * V)
    model.lm_head = ParallelLMHead(m.embed_tokens.weight if cfg.tie_word_embeddings else p("lm_head.weight"))
    k0, k1 = kv_range(cfg, rank, world)
    for i, layer in enumerate(m.layers):
        a = layer.self_attn
        a.Hq, a.Hkv = cfg.num_attention_heads // world, k1 - k0
        a.n_rep = a.Hq // a.Hkv
        a.o_proj = RowParallelLinear(a.o_proj.weight, a.o_proj.bias, rank)
        if layer.is_moe:
            for e in range(cfg.num_experts):
                if rule(f"model.layers.{i}.mlp.experts.{e}.down_proj.weight") == "skip":
                    layer.mlp.experts[e] = None
            layer.mlp = AllReduceSum(layer.mlp)
        else:
            layer.mlp.down_proj = RowParallelLinear(layer.mlp.down_proj.weight, None, rank)
    bad = [n for n, t in model.named_parameters() if t.is_meta]
    if bad:
        raise InputError(f"rank {rank}: no weight loaded for {bad[0]!r}")
    model.eval()
    return model


def _site(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _split_dim(name: str, arr: np.ndarray) -> int | None:
    """The dim a rank's tap (canonical shape, no batch dim) is a slice of, or None: replicated."""
    s = _site(name)
    if s in HEAD_SITES:
        return 1
    if s == "probs":
        return 0
    if s in MLP_SITES:
        return arr.ndim - 1
    return None


def gather_taps(taps: Mapping[str, np.ndarray], cfg: Qwen3Config, rank: int, world: int) -> dict | None:
    """Every rank's recorded taps -> rank 0 (None elsewhere), sliced taps joined into canonical full shapes:
    heads concatenated (replicated KV heads taken once), dense MLP intermediates concatenated."""
    parts: list = [None] * world if rank == 0 else None
    dist.gather_object(dict(taps), parts, dst=0)
    if rank != 0:
        return None
    keep_kv = sorted({kv_range(cfg, r, world)[0]: r for r in reversed(range(world))}.values())
    out = {}
    for name, arr in parts[0].items():
        d = _split_dim(name, arr)
        if d is None:
            out[name] = arr
            continue
        ranks = keep_kv if _site(name) in KV_SITES else range(world)
        out[name] = np.concatenate([parts[r][name] for r in ranks], axis=d)
    return out
