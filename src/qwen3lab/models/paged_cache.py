"""Paged KV cache: the one cache kind the attention leaf reads. A pool of fixed-size blocks, and a per-sequence
view over its blocks.

KVPool holds `k`, `v` as [L, num_blocks, Hkv, block_size, Dh] (one allocation each); a sequence owns a list of
block ids (its block table), so memory is taken a block at a time as it grows and blocks can be shared between
sequences with one prefix (prefix caching). Position p of a sequence lives in block `table[p // block_size]`,
slot `p % block_size`. Two owners:
- the engine (LLMEngine): one pool for every request, sized once at start; its block manager
  (engine/block_manager.py) says who holds which block;
- one sequence alone (`PagedSeqCache.standalone`, what `model.new_cache` gives `generate`,
  `batch_infer_one_round`, the verify backends): a private pool sized for the sequence whose table is
  0, 1, 2, ...; `reserve` grows it (doubling, copying its blocks) like a contiguous cache.

PagedSeqCache speaks the protocol the attention leaf uses (`length`, `capacity`, `write(layer, start, k, v)` ->
the sequence's keys and values over 0..start+T-1, `advance(T)`). `write` scatters the new keys/values into their
slots and gathers the sequence's blocks back into [Hkv, S, Dh] (a copy: prefill and the pure-PyTorch path);
its index tensors are made once per forward (`prepare`, from ForwardBatch.plans), not once per layer.

A decode step (one new token per sequence) does not gather: PagedDecode holds the batch's block tables [B, MB]
and positions [B], built once per forward, and every layer hands them to the C++ kernel `attend_paged_decode`
(keys/values read in place through the tables) or, without the kernels, to `attend_paged_decode` below (one
gather + one SDPA for the batch; the reference the kernel is tested against).
"""

from __future__ import annotations

from functools import cached_property

import torch

from .sdpa import sdpa
from .seq_cache import SeqCache

DEFAULT_BLOCK_SIZE = 16  # positions per block: the engine's default, and a standalone cache's


class KVPool:
    """Every layer's keys and values for `num_blocks` blocks of `block_size` positions."""

    def __init__(self, num_layers: int, num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        assert num_blocks > 0 and block_size > 0, (num_blocks, block_size)
        self.block_size = block_size
        shape = (num_layers, num_blocks, num_kv_heads, block_size, head_dim)  # [L, NB, Hkv, bs, Dh]
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @cached_property
    def layer_views(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's keys and values, [NB, Hkv, bs, Dh] views made once (not two per layer a decode step)."""
        return list(zip(self.k.unbind(0), self.v.unbind(0), strict=True))

    @staticmethod
    def block_bytes(cfg, block_size: int, dtype: torch.dtype, num_kv_heads: int | None = None) -> int:
        """Bytes one block takes (keys and values of every layer; num_kv_heads: a tensor-parallel rank's share)."""
        elem = torch.empty((), dtype=dtype).element_size()
        hkv = cfg.num_key_value_heads if num_kv_heads is None else num_kv_heads
        return 2 * cfg.num_hidden_layers * hkv * block_size * cfg.head_dim * elem

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

    def grown(self, num_blocks: int) -> KVPool:
        """A larger pool holding this one's blocks under the same ids (a standalone cache's growth)."""
        L, NB, H, bs, Dh = self.k.shape
        new = KVPool(L, num_blocks, H, bs, Dh, self.k.dtype, self.k.device)
        new.k[:, :NB].copy_(self.k)
        new.v[:, :NB].copy_(self.v)
        return new


class PagedSeqCache(SeqCache):
    """One sequence's view of a pool: its block table and how many positions hold valid keys/values."""

    def __init__(self, pool: KVPool, block_table: list[int], length: int, max_len: int | None = None,
                 owns_pool: bool = False):
        self.pool = pool
        self.block_table = block_table  # block ids, in position order (shared list: the engine appends to it)
        self.length = length
        self.max_len = max_len  # the context length: reserve() refuses to go past it
        self.owns_pool = owns_pool  # a private pool (standalone): reserve() may grow it
        self._index: tuple | None = None  # (start, end, device, blk, off, table): prepare()'s, for write()

    @classmethod
    def standalone(cls, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                   dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   max_len: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE) -> PagedSeqCache:
        """One sequence with a private pool of room for `capacity` positions (block table 0, 1, 2, ...)."""
        assert capacity > 0, capacity
        nb = -(-capacity // block_size)
        pool = KVPool(num_layers, nb, num_kv_heads, block_size, head_dim, dtype, device)
        return cls(pool, list(range(nb)), 0, max_len=max_len, owns_pool=True)

    @classmethod
    def for_model(cls, cfg, capacity: int, dtype: torch.dtype, device: str | torch.device,
                  num_kv_heads: int | None = None) -> PagedSeqCache:
        """A standalone cache for one sequence of `cfg` (num_kv_heads: a tensor-parallel rank's share)."""
        capacity = max(1, min(capacity, cfg.max_position_embeddings))
        hkv = cfg.num_key_value_heads if num_kv_heads is None else num_kv_heads
        return cls.standalone(cfg.num_hidden_layers, hkv, cfg.head_dim, capacity, dtype, device,
                              max_len=cfg.max_position_embeddings)

    # ---- bookkeeping -------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return len(self.block_table) * self.pool.block_size

    @property
    def dtype(self) -> torch.dtype:
        return self.pool.k.dtype

    @property
    def device(self) -> torch.device:
        return self.pool.k.device

    def nbytes(self) -> int:
        """Bytes of this sequence's blocks."""
        return self.pool.nbytes() // self.pool.num_blocks * len(self.block_table)

    def _grow(self, new_capacity: int) -> None:
        """A standalone cache's pool, grown (reserve() in seq_cache.py decides to what); an engine's sequence has
        its blocks from the block manager already."""
        assert self.owns_pool, "an engine's sequence gets its blocks from the block manager"
        nb, old = -(-new_capacity // self.pool.block_size), self.pool.num_blocks
        self.pool = self.pool.grown(nb)
        self.block_table.extend(range(old, nb))

    # ---- used by the model -------------------------------------------------------------------------
    def slots(self, start: int, end: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Block id and in-block offset of positions start..end-1, each [T] long."""
        bs = self.pool.block_size
        pos = torch.arange(start, end, device=device)
        table = torch.tensor(self.block_table[:-(-end // bs)], dtype=torch.long, device=device)
        return table[pos // bs], pos % bs

    def prepare(self, start: int, T: int, device: torch.device) -> None:
        """Make write()'s index tensors for positions start..start+T-1 once, before the forward's layers."""
        end = start + T
        blk, off = self.slots(start, end, device)
        table = torch.tensor(self.block_table[:-(-end // self.pool.block_size)], dtype=torch.long, device=device)
        self._index = (start, end, device, blk, off, table)

    def _index_for(self, start: int, end: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        ix = self._index
        if ix is None or ix[:3] != (start, end, device):
            self.prepare(start, end - start, device)
            ix = self._index
        return ix[3:]

    def gather(self, layer: int, end: int, table: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of positions 0..end-1 of `layer`, [Hkv, end, Dh] each (copies)."""
        pk, pv = self.pool.k[layer], self.pool.v[layer]  # [NB, Hkv, bs, Dh]
        if table is None:
            table = torch.tensor(self.block_table[:-(-end // self.pool.block_size)], dtype=torch.long,
                                 device=pk.device)
        Hkv, Dh = pk.shape[1], pk.shape[3]
        # one copy: index the blocks of a [Hkv, NB, bs, Dh] view, giving [Hkv, nb, bs, Dh] contiguous
        keys = pk.transpose(0, 1)[:, table].view(Hkv, -1, Dh)[:, :end]  # [Hkv, S, Dh]
        vals = pv.transpose(0, 1)[:, table].view(Hkv, -1, Dh)[:, :end]
        return keys, vals

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [Hkv, T, Dh] at positions start..start+T-1 of `layer`; return the sequence's keys and
        values over 0..start+T-1 as [Hkv, start+T, Dh] (gathered from its blocks)."""
        T = k.shape[1]
        end = start + T
        assert start == self.length and end <= self.capacity, (start, self.length, T, self.capacity)
        pk, pv = self.pool.k[layer], self.pool.v[layer]  # [NB, Hkv, bs, Dh]
        blk, off, table = self._index_for(start, end, pk.device)
        pk[blk, :, off] = k.transpose(0, 1)  # [T, Hkv, Dh] into T slots
        pv[blk, :, off] = v.transpose(0, 1)
        if start == 0:  # nothing cached before: the keys and values are the new ones, no gather needed
            return k, v
        return self.gather(layer, end, table)

    def __repr__(self) -> str:
        return f"PagedSeqCache(length={self.length}, blocks={self.block_table})"


class PagedDecode:
    """A decode step's facts over paged caches (one new token per sequence), built once per forward and read by
    every layer: block tables [B, MB] int32 (short ones padded with block 0), positions [B] int64 (each new
    token's, = its cache's length), and the pool layer(s) to read: one shared by all (the engine) or one per
    sequence (standalone caches)."""

    def __init__(self, caches: list[PagedSeqCache], device: torch.device):
        self.caches = caches
        pools = [c.pool for c in caches]
        self.shared = all(p is pools[0] for p in pools)
        self.pools = pools[:1] if self.shared else pools
        bs = self.block_size = pools[0].block_size
        self.nbs = [c.length // bs + 1 for c in caches]  # blocks each sequence reads, its new slot's included
        MB = max(self.nbs)
        rows = [c.block_table[:n] + [0] * (MB - n) for c, n in zip(caches, self.nbs, strict=True)]
        self.device = device
        self.tables = torch.tensor(rows, dtype=torch.int32)  # [B, MB] on the CPU: the kernel reads it
        self.pos = torch.tensor([c.length for c in caches], dtype=torch.long)  # [B]

    @staticmethod
    def of(caches: list, device: torch.device) -> PagedDecode | None:
        """The batch's PagedDecode when every cache is paged and their pools agree on block size, else None."""
        if not caches or not all(isinstance(c, PagedSeqCache) for c in caches):
            return None
        p0 = caches[0].pool
        if any(c.pool.block_size != p0.block_size or c.pool.k.shape[2:] != p0.k.shape[2:] for c in caches):
            return None
        return PagedDecode(caches, device)

    def layer(self, i: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Layer i of the pool(s), [NB, Hkv, bs, Dh] each: what the kernel reads and writes."""
        views = [p.layer_views[i] for p in self.pools]
        return [k for k, _ in views], [v for _, v in views]

    @cached_property
    def gather_index(self) -> tuple[torch.Tensor, ...]:
        """The pure-PyTorch path's tensors (shared pool only): new slots blk, off [B], tables [B, MB] long,
        and the [B, 1, 1, MB * bs] mask of real positions (True = attend)."""
        dev, bs = self.device, self.block_size
        blk = self.tables[torch.arange(len(self.caches)), self.pos // bs].to(dev, torch.long)
        off = (self.pos % bs).to(dev)
        table = self.tables.to(dev, torch.long)
        S = table.shape[1] * bs
        mask = (torch.arange(S, device=dev) < (self.pos.to(dev) + 1)[:, None]).view(-1, 1, 1, S)
        return blk, off, table, mask


def attend_paged_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, paged: PagedDecode, layer: int,
                        scaling: float, sdpa_dtype: torch.dtype | None = None) -> torch.Tensor:
    """A decode step of B sequences (one new token each) over their paged caches in one shared pool, in ONE gather
    and ONE SDPA: q [1, B, Hq, Dh], new k / v [1, B, Hkv, Dh] -> [1, B, Hq, Dh]. Each new key/value goes to its
    slot; every sequence's blocks are gathered into [B, Hkv, S_max, Dh] and a mask hides the padding.
    sdpa_dtype: run SDPA in it (float32 for a bf16 fast-path model)."""
    assert paged.shared, "one gather needs one pool"
    _, B, Hq, Dh = q.shape
    pool = paged.pools[0]
    pk, pv = pool.k[layer], pool.v[layer]  # [NB, Hkv, bs, Dh]
    Hkv = pk.shape[1]
    blk, off, table, mask = paged.gather_index
    pk[blk, :, off] = k[0]  # [B, Hkv, Dh] into B slots
    pv[blk, :, off] = v[0]
    S = mask.shape[-1]
    keys = pk[table].transpose(1, 2).reshape(B, Hkv, S, Dh)  # [B, Hkv, S_max, Dh]
    vals = pv[table].transpose(1, 2).reshape(B, Hkv, S, Dh)
    o = sdpa(q[0].unsqueeze(2), keys, vals, scaling, mask, dtype=sdpa_dtype)  # q [B, Hq, 1, Dh]
    return o.transpose(1, 2).reshape(1, B, Hq, Dh)  # [B, Hq, 1, Dh] -> [1, B, Hq, Dh]
