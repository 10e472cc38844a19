"""BlockManager: which KV pool block (models/paged_cache.py) belongs to whom. Plain Python, no tensors.

Fixed-size blocks of `block_size` positions; a sequence holds a block table (list of block ids). Each block
has a reference count: a block is shared by every sequence whose prefix it holds (prefix caching), and is
free when the count drops to 0.

Prefix caching: a FULL block is identified by a hash of (its parent block's hash, its token ids), so one
hash names the whole prefix up to the block's end. When a block fills (`commit_full`), its hash is recorded.
A new sequence's leading full blocks are looked up by hash (`match_prefix`): a hit takes a reference on the
cached block and the model skips those tokens. A block whose count drops to 0 keeps its hash and contents
("cached free"): it is reused on a later hit, or evicted (least recently freed first) when a fresh block is
needed and no never-used block is left. Counters: prefix_queries (full blocks looked up), prefix_hits.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


def block_hash(parent: int | None, tokens: Sequence[int]) -> int:
    """The hash of a full block: its parent's hash and its token ids (so equal hashes mean equal prefixes,
    up to Python's 64-bit hash collisions)."""
    return hash((parent, tuple(tokens)))


class NoFreeBlocks(Exception):
    """The pool has no block to give: the scheduler preempts a sequence and tries again."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0, (num_blocks, block_size)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks  # a full, committed block's prefix hash
        self.by_hash: dict[int, int] = {}  # prefix hash -> block id (in use or cached free)
        self.never_used = list(range(num_blocks - 1, -1, -1))  # a stack: block 0 is handed out first
        self.cached_free: OrderedDict[int, None] = OrderedDict()  # ref 0 but hashed: LRU order, oldest first
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ---- counts --------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (never used + cached free, which are evicted on demand)."""
        return len(self.never_used) + len(self.cached_free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    # ---- allocation ----------------------------------------------------------------------------------
    def _take_fresh(self) -> int:
        if self.never_used:
            b = self.never_used.pop()
        elif self.cached_free:
            b, _ = self.cached_free.popitem(last=False)  # evict the least recently freed cached block
            h = self.hash_of[b]
            if h is not None and self.by_hash.get(h) == b:
                del self.by_hash[h]
            self.hash_of[b] = None
        else:
            raise NoFreeBlocks
        assert self.ref[b] == 0, (b, self.ref[b])
        self.ref[b] = 1
        return b

    def _take_cached(self, b: int) -> None:
        if self.ref[b] == 0:
            del self.cached_free[b]
        self.ref[b] += 1

    def match_prefix(self, tokens: Sequence[int], table: list[int]) -> int:
        """Append to the empty `table` the cached blocks holding `tokens`' leading full blocks (leaving at least
        one token to compute: the model must produce the last position's logits); return the number of tokens
        they cover. Counts each full block looked up as a query and each found one as a hit."""
        assert not table
        if not self.enable_prefix_caching:
            return 0
        bs, parent = self.block_size, None
        for i in range((len(tokens) - 1) // bs):
            h = block_hash(parent, tokens[i * bs:(i + 1) * bs])
            self.prefix_queries += 1
            b = self.by_hash.get(h)
            if b is None:
                self.prefix_queries += (len(tokens) - 1) // bs - i - 1  # the rest are misses too
                break
            self.prefix_hits += 1
            self._take_cached(b)
            table.append(b)
            parent = h
        return len(table) * bs

    def can_grow(self, table: Sequence[int], n_tokens: int) -> bool:
        return self.blocks_for(n_tokens) - len(table) <= self.num_free

    def grow(self, table: list[int], n_tokens: int) -> None:
        """Give `table` enough blocks for n_tokens positions (NoFreeBlocks, with nothing taken, if short)."""
        need = self.blocks_for(n_tokens) - len(table)
        if need > self.num_free:
            raise NoFreeBlocks
        for _ in range(need):
            table.append(self._take_fresh())

    def commit_full(self, table: Sequence[int], tokens: Sequence[int], n_computed: int) -> None:
        """Record the hash of every block of `table` whose positions are all computed (first n_computed of
        `tokens`); a block whose prefix is already cached elsewhere stays private (no double entry)."""
        if not self.enable_prefix_caching:
            return
        bs, parent = self.block_size, None
        for i in range(min(n_computed // bs, len(table))):
            b = table[i]
            if self.hash_of[b] is None:
                h = block_hash(parent, tokens[i * bs:(i + 1) * bs])
                self.hash_of[b] = h
                self.by_hash.setdefault(h, b)
            parent = self.hash_of[b]

    def free(self, table: list[int]) -> None:
        """Drop this sequence's reference on each of its blocks (in reverse, so a prefix's tail blocks are
        evicted before its head) and empty the table."""
        for b in reversed(table):
            assert self.ref[b] > 0, (b, self.ref[b])
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if self.hash_of[b] is not None and self.by_hash.get(self.hash_of[b]) == b:
                    self.cached_free[b] = None  # keep contents for a later hit; most recent last
                else:
                    self.hash_of[b] = None
                    self.never_used.append(b)
        table.clear()
