"""SeqCache: the bookkeeping every per-sequence KV cache shares (the paged one, paged_cache.py, and the
contiguous reference, kv_cache.py): how many positions hold keys/values, the context limit, and growth.

A subclass gives `capacity` and `_grow(new_capacity)`; `reserve(n)` makes room for n more positions (doubling,
up to max_len, so a long generation reallocates O(log n) times) after refusing to pass the context length.
"""

from __future__ import annotations

from ..errors import InputError


class SeqCache:
    length: int  # positions 0..length-1 hold valid keys/values
    max_len: int | None  # the context length: reserve() refuses to go past it

    @property
    def capacity(self) -> int:
        raise NotImplementedError

    def _grow(self, new_capacity: int) -> None:
        raise NotImplementedError

    @property
    def free(self) -> int:
        return self.capacity - self.length

    def reserve(self, n: int) -> int:
        """Make room for n more positions; returns the position the first of them will get."""
        need = self.length + n
        if self.max_len is not None and need > self.max_len:
            raise InputError(f"{need} positions exceed the context length {self.max_len} (max_position_embeddings)")
        if need > self.capacity:
            cap = max(need, 2 * self.capacity)
            self._grow(min(cap, self.max_len) if self.max_len is not None else cap)
        return self.length

    def advance(self, n: int) -> None:
        assert self.length + n <= self.capacity, (self.length, n, self.capacity)
        self.length += n

    def truncate(self, length: int) -> None:
        """Forget positions >= length (e.g. to re-run a suffix); the memory stays."""
        assert 0 <= length <= self.length, (length, self.length)
        self.length = length

    def reset(self) -> None:
        self.length = 0
