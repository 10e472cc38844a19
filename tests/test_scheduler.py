"""Scheduler (engine/scheduler.py) on its own, no model: token budget, chunked prefill, max_num_seqs, FIFO
admission, preemption of the latest arrival when blocks run out. References: hand-counted tokens and blocks.
"""

from __future__ import annotations

from qwen3lab.engine.block_manager import BlockManager
from qwen3lab.engine.sampler import SamplingParams
from qwen3lab.engine.scheduler import Scheduler, Sequence


def seq(rid: str, n: int, arrival: int) -> Sequence:
    return Sequence(rid, list(range(1000 * arrival, 1000 * arrival + n)), n, SamplingParams(), 100, arrival=arrival)


def run_step(s: Scheduler):
    """Schedule and pretend the forward ran: advance each sequence, and give a finished prompt one token."""
    b = s.schedule()
    for q, n in zip(b.seqs, b.num_tokens, strict=True):
        q.num_computed += n
        if q.num_computed == len(q.tokens):
            q.tokens.append(7)
    return [(q.request_id, n) for q, n in zip(b.seqs, b.num_tokens, strict=True)]


def test_chunked_prefill_under_a_token_budget_keeps_decodes_flowing():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    s.add(seq("a", 3, 0))
    assert run_step(s) == [("a", 3)]
    s.add(seq("long", 25, 1))
    # a decodes (1 token) and long gets the remaining 9 of the budget, then 9, then 7
    assert run_step(s) == [("a", 1), ("long", 9)]
    assert run_step(s) == [("a", 1), ("long", 9)]
    assert run_step(s) == [("a", 1), ("long", 7)]
    assert run_step(s) == [("a", 1), ("long", 1)]  # long now decodes


def test_max_num_seqs_and_fifo_admission():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for i, rid in enumerate("abc"):
        s.add(seq(rid, 2, i))
    assert run_step(s) == [("a", 2), ("b", 2)]
    assert [q.request_id for q in s.waiting] == ["c"]
    s.remove(s.running[0])  # a leaves: c joins at the next step
    assert run_step(s) == [("b", 1), ("c", 2)]


def test_out_of_blocks_preempts_the_latest_arrival_which_comes_back_first():
    bm = BlockManager(4, 2)  # 8 positions in all
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100)
    s.add(seq("a", 4, 0))  # 2 blocks
    s.add(seq("b", 4, 1))  # 2 blocks: the pool is full
    assert run_step(s) == [("a", 4), ("b", 4)]
    # each now holds 5 tokens (4 + the sampled one): a needs a 3rd block, none free -> b (latest) preempted
    assert run_step(s) == [("a", 1)]
    assert s.preemptions == 1 and [q.request_id for q in s.waiting] == ["b"]
    b = s.waiting[0]
    assert b.num_computed == 0 and b.block_table == [] and len(b.tokens) == 5  # recomputed later with its token
    s.remove(s.running[0])  # a finishes: b is readmitted, prompt + generated token recomputed
    assert run_step(s) == [("b", 5)]
    assert bm.num_used == 3


def test_a_lone_sequence_that_outgrows_the_pool_preempts_itself_without_looping():
    bm = BlockManager(2, 2)
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100)
    s.add(seq("a", 4, 0))
    assert run_step(s) == [("a", 4)]
    assert run_step(s) == []  # needs a 3rd block: it is the latest arrival, so it goes back to waiting
    assert s.preemptions == 1 and bm.num_used == 0
