"""KVCache: one sequence's keys and values, contiguous, preallocated for every layer.

Nothing in qwen3lab makes one any more: every path uses the paged cache (models/paged_cache.py; model.new_cache
gives a PagedSeqCache). It is kept as the contiguous reference: ForwardBatch still accepts it (the attention
leaf runs the C++ contiguous decode kernel, `attend_decode`, over it), and tests run it beside the paged cache
to show both give the same tokens (tests/test_paged_paths.py). Drop it when that comparison is no longer wanted.

Layout: `k`, `v` are [L, Hkv, capacity, Dh] (one allocation each for the whole model), so a layer's cache
is a strided view and a decode step writes one column per layer in place: no per-step allocation. The
bookkeeping (`length`, `capacity`, growth) is plain Python and is tested without a GPU.

Protocol the model uses: `write(layer, start, k, v)` stores the new keys/values at positions
start..start+T-1 and returns views over 0..start+T-1; `advance(T)` is called once per forward, after
every layer has written. `reserve(T)` makes room before a forward (growth doubles the capacity, up to
`max_len`, so a long generation reallocates O(log n) times; `generate` sizes it exactly up front).
"""

from __future__ import annotations

import torch

from .seq_cache import SeqCache


class KVCache(SeqCache):
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 max_len: int | None = None):
        assert capacity > 0, capacity
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.max_len = max_len  # the context length: reserve() refuses to go past it
        self.length = 0  # positions 0..length-1 hold valid keys/values
        shape = (num_layers, num_kv_heads, capacity, head_dim)  # [L, Hkv, cap, Dh]
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def for_model(cls, cfg, capacity: int, dtype: torch.dtype, device: str | torch.device) -> KVCache:
        capacity = max(1, min(capacity, cfg.max_position_embeddings))
        return cls(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, capacity, dtype, device,
                   max_len=cfg.max_position_embeddings)

    # ---- bookkeeping -------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def _grow(self, new_cap: int) -> None:
        L, H, cap, Dh = self.k.shape
        for attr in ("k", "v"):
            old = getattr(self, attr)
            new = torch.zeros((L, H, new_cap, Dh), dtype=old.dtype, device=old.device)  # [L, Hkv, new_cap, Dh]
            new[:, :, : self.length].copy_(old[:, :, : self.length])
            setattr(self, attr, new)

    # ---- used by the model -------------------------------------------------------------------------
    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [Hkv, T, Dh] at positions start..start+T-1 of `layer`; return the layer's keys and
        values over 0..start+T-1 as views [Hkv, start+T, Dh]."""
        T = k.shape[1]
        end = start + T
        assert start == self.length and end <= self.capacity, (start, self.length, T, self.capacity)
        self.k[layer, :, start:end].copy_(k)
        self.v[layer, :, start:end].copy_(v)
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def __repr__(self) -> str:
        L, H, cap, Dh = self.k.shape
        return (f"KVCache(length={self.length}, capacity={cap}, layers={L}, kv_heads={H}, head_dim={Dh}, "
                f"dtype={self.dtype}, device={self.device})")
