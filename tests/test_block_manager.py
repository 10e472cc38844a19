"""BlockManager (engine/block_manager.py): allocation, reference counts, prefix sharing, LRU eviction.

References: hand-counted blocks (block_size 4, so a 10-token sequence needs ceil(10/4) = 3 blocks).
"""

from __future__ import annotations

import pytest

from qwen3lab.engine.block_manager import BlockManager, NoFreeBlocks


def test_grow_and_free_count_blocks_by_hand():
    bm = BlockManager(num_blocks=5, block_size=4)
    t: list[int] = []
    bm.grow(t, 10)  # ceil(10 / 4) = 3
    assert len(t) == 3 and bm.num_used == 3 and bm.num_free == 2
    bm.grow(t, 12)  # still 3
    assert len(t) == 3
    bm.grow(t, 13)  # a 4th
    assert len(t) == 4 and len(set(t)) == 4
    with pytest.raises(NoFreeBlocks):
        bm.grow(t, 4 * 6)  # needs 2 more, 1 free: nothing taken
    assert len(t) == 4 and bm.num_free == 1
    bm.free(t)
    assert t == [] and bm.num_used == 0 and bm.ref == [0] * 5


def test_two_requests_with_one_prefix_share_its_full_blocks():
    bm = BlockManager(num_blocks=10, block_size=4)
    prefix = list(range(100, 108))  # two full blocks
    a_tokens, b_tokens = prefix + [1, 2, 3], prefix + [7, 8]
    a: list[int] = []
    assert bm.match_prefix(a_tokens, a) == 0  # nothing cached yet
    assert (bm.prefix_queries, bm.prefix_hits) == (2, 0)  # (11 - 1) // 4 = 2 full blocks looked up
    bm.grow(a, len(a_tokens))
    bm.commit_full(a, a_tokens, len(a_tokens))  # blocks 0, 1 are full and computed
    b: list[int] = []
    assert bm.match_prefix(b_tokens, b) == 8
    assert b == a[:2] and (bm.prefix_queries, bm.prefix_hits) == (4, 2)
    assert [bm.ref[x] for x in a] == [2, 2, 1]
    bm.grow(b, len(b_tokens))
    assert len(b) == 3 and b[2] != a[2] and bm.num_used == 4  # 3 of a + 1 private of b
    bm.free(a)
    assert [bm.ref[x] for x in b] == [1, 1, 1]
    bm.free(b)
    assert bm.num_used == 0


def test_a_fully_cached_prompt_still_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=4, block_size=4)
    toks = list(range(8))  # exactly two blocks
    a: list[int] = []
    bm.grow(a, 8)
    bm.commit_full(a, toks, 8)
    b: list[int] = []
    assert bm.match_prefix(toks, b) == 4  # (8 - 1) // 4 = 1 block: the last token is fed again for its logits


def test_freed_prefix_blocks_stay_cached_and_are_evicted_least_recent_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    x, y = [1, 2, 3, 4], [5, 6, 7, 8]
    tx: list[int] = []
    bm.grow(tx, 4)
    bm.commit_full(tx, x, 4)
    bm.free(tx)  # frees x's 2 blocks: cached, still counted free
    ty: list[int] = []
    bm.grow(ty, 4)  # takes the 2 never-used blocks first, so x stays cached
    bm.commit_full(ty, y, 4)
    bm.free(ty)
    assert bm.num_used == 0 and len(bm.cached_free) == 4
    probe: list[int] = []
    assert bm.match_prefix(x + [0], probe) == 4  # x still hit
    bm.free(probe)  # x's blocks are now the most recently freed
    t: list[int] = []
    bm.grow(t, 4)  # needs 2 fresh: evicts y's (least recently freed)
    probe_y: list[int] = []
    assert bm.match_prefix(y + [0], probe_y) == 0
    probe_x: list[int] = []
    assert bm.match_prefix(x + [0], probe_x) == 4


def test_prefix_caching_off_never_shares():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    a: list[int] = []
    bm.grow(a, 4)
    bm.commit_full(a, [1, 2, 3, 4], 4)
    b: list[int] = []
    assert bm.match_prefix([1, 2, 3, 4, 5], b) == 0 and b == []
    bm.free(a)
    assert bm.num_used == 0 and not bm.cached_free
