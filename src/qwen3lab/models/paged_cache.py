"""Paged KV cache: one pool of fixed-size blocks for every sequence, and a per-sequence view over its blocks.

KVPool holds `k`, `v` as [L, num_blocks, Hkv, block_size, Dh] (one allocation each, sized once at engine
start); a sequence owns a list of block ids (its block table, kept by the engine's block manager), so memory
is taken a block at a time as it grows and blocks can be shared between sequences with one prefix (prefix
caching). Position p of a sequence lives in block `table[p // block_size]`, slot `p % block_size`.

PagedSeqCache is what a ForwardBatch span carries instead of a contiguous KVCache: it speaks the same
protocol the attention leaf uses (`length`, `capacity`, `write(layer, start, k, v)` -> the sequence's keys and
values over 0..start+T-1, `advance(T)`), so the model needs no second code path. `write` scatters the new
keys/values into their slots and gathers the sequence's blocks back into [Hkv, S, Dh] tensors (a copy: the
pure-PyTorch path; the fused C++ decode kernel reads contiguous caches only, so paged spans run SDPA, see
AttnPlan.decode). It lives in models/ because attention reads it; the bookkeeping of who owns which block
is the engine's (engine/block_manager.py).
"""

from __future__ import annotations

import torch

from .sdpa import sdpa


class KVPool:
    """Every layer's keys and values for `num_blocks` blocks of `block_size` positions."""

    def __init__(self, num_layers: int, num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        assert num_blocks > 0 and block_size > 0, (num_blocks, block_size)
        self.block_size = block_size
        shape = (num_layers, num_blocks, num_kv_heads, block_size, head_dim)  # [L, NB, Hkv, bs, Dh]
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def block_bytes(cfg, block_size: int, dtype: torch.dtype) -> int:
        """Bytes one block takes (keys and values of every layer)."""
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * block_size * cfg.head_dim * elem

    @classmethod
    def for_model(cls, cfg, num_blocks: int, block_size: int, dtype: torch.dtype,
                  device: str | torch.device) -> KVPool:
        return cls(cfg.num_hidden_layers, num_blocks, cfg.num_key_value_heads, block_size, cfg.head_dim,
                   dtype, device)

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class PagedSeqCache:
    """One sequence's view of the pool: its block table and how many positions hold valid keys/values."""

    def __init__(self, pool: KVPool, block_table: list[int], length: int):
        self.pool = pool
        self.block_table = block_table  # block ids, in position order (shared list: the engine appends to it)
        self.length = length

    @property
    def capacity(self) -> int:
        return len(self.block_table) * self.pool.block_size

    def advance(self, n: int) -> None:
        assert self.length + n <= self.capacity, (self.length, n, self.capacity)
        self.length += n

    def _slots(self, start: int, end: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Block id and in-block offset of positions start..end-1, each [T] long."""
        bs = self.pool.block_size
        pos = torch.arange(start, end, device=device)
        table = torch.tensor(self.block_table, dtype=torch.long, device=device)
        return table[pos // bs], pos % bs

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [Hkv, T, Dh] at positions start..start+T-1 of `layer`; return the sequence's keys and
        values over 0..start+T-1 as [Hkv, start+T, Dh] (gathered from its blocks)."""
        T = k.shape[1]
        end = start + T
        assert start == self.length and end <= self.capacity, (start, self.length, T, self.capacity)
        pk, pv = self.pool.k[layer], self.pool.v[layer]  # [NB, Hkv, bs, Dh]
        blk, off = self._slots(start, end, pk.device)
        pk[blk, :, off] = k.transpose(0, 1)  # [T, Hkv, Dh] into T slots
        pv[blk, :, off] = v.transpose(0, 1)
        nb = -(-end // self.pool.block_size)
        table = torch.tensor(self.block_table[:nb], dtype=torch.long, device=pk.device)
        Hkv, Dh = pk.shape[1], pk.shape[3]
        keys = pk[table].transpose(0, 1).reshape(Hkv, -1, Dh)[:, :end]  # [Hkv, S, Dh]
        vals = pv[table].transpose(0, 1).reshape(Hkv, -1, Dh)[:, :end]
        return keys, vals

    def __repr__(self) -> str:
        return f"PagedSeqCache(length={self.length}, blocks={self.block_table})"


def attend_paged_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, caches: list[PagedSeqCache], layer: int,
                        scaling: float, sdpa_dtype: torch.dtype | None = None) -> torch.Tensor:
    """A decode step of B sequences (one new token each) over their paged caches in ONE gather and ONE SDPA:
    q [1, B, Hq, Dh], new k / v [1, B, Hkv, Dh] -> [1, B, Hq, Dh]. Each new key/value goes to its slot; every
    sequence's blocks are gathered into [B, Hkv, S_max, Dh] (short tables padded with block 0) and a [B, 1, 1,
    S_max] mask hides the padding. sdpa_dtype: run SDPA in it (float32 for a bf16 fast-path model)."""
    _, B, Hq, Dh = q.shape
    pool, dev = caches[0].pool, q.device
    bs = pool.block_size
    pk, pv = pool.k[layer], pool.v[layer]  # [NB, Hkv, bs, Dh]
    Hkv = pk.shape[1]
    blk = torch.tensor([c.block_table[c.length // bs] for c in caches], dtype=torch.long, device=dev)
    off = torch.tensor([c.length % bs for c in caches], dtype=torch.long, device=dev)
    pk[blk, :, off] = k[0]  # [B, Hkv, Dh] into B slots
    pv[blk, :, off] = v[0]
    nbs = [c.length // bs + 1 for c in caches]
    nb = max(nbs)
    table = torch.tensor([c.block_table[:n] + [0] * (nb - n) for c, n in zip(caches, nbs, strict=True)],
                         dtype=torch.long, device=dev)  # [B, nb]
    keys = pk[table].transpose(1, 2).reshape(B, Hkv, nb * bs, Dh)  # [B, Hkv, S_max, Dh]
    vals = pv[table].transpose(1, 2).reshape(B, Hkv, nb * bs, Dh)
    lengths = torch.tensor([c.length + 1 for c in caches], device=dev)
    mask = (torch.arange(nb * bs, device=dev) < lengths[:, None]).view(B, 1, 1, nb * bs)  # True = attend
    o = sdpa(q[0].unsqueeze(2), keys, vals, scaling, mask, dtype=sdpa_dtype)  # q [B, Hq, 1, Dh]
    return o.transpose(1, 2).reshape(1, B, Hq, Dh)  # [B, Hq, 1, Dh] -> [1, B, Hq, Dh]
