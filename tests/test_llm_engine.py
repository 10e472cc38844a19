"""LLMEngine (engine/llm_engine.py) and LLM (llm.py) over the paged KV cache, tiny float32 models.

Reference for every token check: the same request alone through Qwen3ForCausalLM.generate (contiguous KV
cache, one sequence per forward). Work counters are checked against hand-counted tokens.
"""

from __future__ import annotations

import random

import pytest
import torch

from qwen3lab import LLM, SamplingParams
from qwen3lab.config import Qwen3Config
from qwen3lab.engine.llm_engine import LLMEngine
from qwen3lab.errors import InputError
from qwen3lab.qwen3 import Qwen3ForCausalLM
from qwen3lab.random_init import random_weights

NEW = 10


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    pass


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def llm(request):
    d = {"model_type": "qwen3_moe" if request.param else "qwen3", "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
         "vocab_size": 300, "rope_theta": 1e4, "max_position_embeddings": 128, "tie_word_embeddings": True}
    if request.param:
        d.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    cfg = Qwen3Config.from_dict(d, source="test config")
    return Qwen3ForCausalLM.from_weights(cfg, random_weights(cfg, seed=3), dtype="float32", fast=False)


def prompts(n: int, seed: int = 0, lo: int = 1, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(300) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def alone(llm, p: list[int], new: int = NEW) -> list[int]:
    return llm.generate(p, max_steps=new).token_ids


def drain(engine: LLMEngine, arrivals: dict[int, list[tuple[str, list[int]]]] | None = None,
          new: int = NEW) -> dict[str, list[int]]:
    """Step until done; requests in arrivals[k] are added before step k. Returns each request's tokens."""
    arrivals = arrivals or {}
    got: dict[str, list[int]] = {}
    k = 0
    while engine.has_unfinished() or any(j >= k for j in arrivals):
        for rid, p in arrivals.get(k, []):
            engine.add_request(rid, p, SamplingParams(), new)
            got[rid] = []
        for o in engine.step():
            got[o.request_id].append(o.token_id)
        k += 1
    return got


def check_same(got: dict[str, list[int]], want: dict[str, list[int]]) -> None:
    bad = {r: (got[r], want[r]) for r in want if got.get(r) != want[r]}
    assert not bad, f"engine vs alone (got, want): {bad}"


def test_continuous_batching_gives_each_request_its_lone_greedy_tokens(llm):
    ps = prompts(6, seed=1)
    want = {f"r{i}": alone(llm, p) for i, p in enumerate(ps)}
    eng = LLMEngine(llm, kv_memory_gib=0.01, block_size=4, max_num_batched_tokens=24)
    arrivals = {0: [("r0", ps[0]), ("r1", ps[1])], 2: [("r2", ps[2])], 3: [("r3", ps[3]), ("r4", ps[4])],
                9: [("r5", ps[5])]}
    check_same(drain(eng, arrivals), want)
    assert eng.stats()["kv_blocks_used"] == 0 and eng.stats()["generated_tokens"] == 6 * NEW


def test_chunked_prefill_equals_unchunked(llm):
    p = prompts(1, seed=2, lo=35, hi=36)[0]
    outs = []
    for budget in (7, 512):  # 35 tokens in 5 chunks, or at once
        eng = LLMEngine(llm, kv_memory_gib=0.01, block_size=4, max_num_batched_tokens=budget)
        outs.append(drain(eng, {0: [("a", p)]})["a"])
    assert outs[0] == outs[1] == alone(llm, p), outs


def test_preempted_request_finishes_with_its_lone_tokens(llm):
    ps = prompts(3, seed=3, lo=8, hi=9)
    want = {f"r{i}": alone(llm, p) for i, p in enumerate(ps)}
    per_block = 2 * 2 * 2 * 4 * 16 * 4  # k+v, layers, Hkv, block_size, Dh, float32 bytes
    eng = LLMEngine(llm, kv_memory_gib=6 * per_block / 2**30, block_size=4)  # 6 blocks: one request needs 5
    check_same(drain(eng, {0: [(r, p) for r, p in zip(want, ps, strict=True)]}), want)
    st = eng.stats()
    assert st["preemptions"] > 0 and st["kv_blocks_used"] == 0, st


def test_shared_prefix_is_fed_once_and_counted(llm):
    bs, prefix = 4, prompts(1, seed=4, lo=16, hi=17)[0]  # 4 full blocks
    ps = [prefix + [5, 6], prefix + [7]]
    want = {"a": alone(llm, ps[0]), "b": alone(llm, ps[1])}
    eng = LLMEngine(llm, kv_memory_gib=0.01, block_size=bs)
    got = drain(eng, {0: [("a", ps[0])], 1: [("b", ps[1])]})
    check_same(got, want)
    st = eng.stats()
    # a: 18 prompt tokens fed; b: its 16-token prefix is cached, 1 token fed; then NEW - 1 decodes each
    assert st["fed_tokens"] == 18 + 1 + 2 * (NEW - 1), st
    assert (st["prefix_hits"], st["cached_prompt_tokens"], st["prompt_tokens"]) == (4, 16, 35), st
    assert st["prefix_queries"] == 4 + 4  # (18 - 1) // 4 and (17 - 1) // 4 full blocks looked up


def test_abort_frees_every_block_at_once(llm):
    eng = LLMEngine(llm, kv_memory_gib=0.01, block_size=4)
    for i, p in enumerate(prompts(3, seed=5)):
        eng.add_request(f"r{i}", p, SamplingParams(), 50)
    eng.step()
    eng.step()
    assert eng.stats()["kv_blocks_used"] > 0
    for i in range(3):
        eng.abort(f"r{i}")
    st = eng.stats()
    assert (st["kv_blocks_used"], st["running"], st["waiting"]) == (0, 0, 0) and not eng.has_unfinished(), st
    eng.abort("r0")  # again: ignored


def test_add_request_refuses_bad_input_before_queuing(llm):
    per_block = 2 * 2 * 2 * 4 * 16 * 4  # k+v, layers, Hkv, block_size, Dh, float32 bytes
    eng = LLMEngine(llm, kv_memory_gib=8 * per_block / 2**30, block_size=4)  # 32 positions
    for bad, word in (([], "empty"), ([300], "invalid token id 300"), ([1] * 128, "context length"),
                      ([1] * 30, "KV blocks")):
        with pytest.raises(InputError, match=word):
            eng.add_request("x", bad, SamplingParams(), 4)  # 30 + 4 > 32
    assert not eng.has_unfinished()


def test_stop_ids_logprobs_and_finish_reasons(llm):
    p = prompts(1, seed=6)[0]
    ref = alone(llm, p)
    eng = LLMEngine(llm, kv_memory_gib=0.01)
    eng.add_request("s", p, SamplingParams(), NEW, stop_ids=frozenset([ref[2]]), logprobs=3)
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    stop_at = ref.index(ref[2])  # the first time that id comes
    assert [o.token_id for o in outs] == ref[:stop_at + 1] and outs[-1].finish_reason == "stop"
    with torch.inference_mode():  # logprobs of the first token against a lone forward's log_softmax
        lp = torch.log_softmax(llm.model(__import__("qwen3lab").models.batch.ForwardBatch.single(p))[-1], -1)
    top = torch.topk(lp, 3)
    assert abs(outs[0].logprob - float(lp[ref[0]])) < 1e-5
    assert [i for i, _ in outs[0].top_logprobs] == top.indices.tolist()


def test_llm_generate_matches_generate_in_order(llm):
    ps = prompts(3, seed=7)
    out = LLM(llm, kv_memory_gib=0.01).generate(ps, SamplingParams(max_tokens=NEW))
    assert [o.token_ids for o in out] == [alone(llm, p) for p in ps]
    assert all(o.finish_reason == "length" for o in out)


def test_fast_model_paged_spans_match_its_contiguous_generate(mode):
    """The fast path (fused projections, C++ leaves in `kernels` mode) over paged spans: SDPA on the gathered
    blocks gives the tokens its own generate gives with the contiguous cache (and the fused decode kernel)."""
    d = {"model_type": "qwen3", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300,
         "rope_theta": 1e4, "max_position_embeddings": 128, "tie_word_embeddings": True}
    cfg = Qwen3Config.from_dict(d, source="test config")
    fast = Qwen3ForCausalLM.from_weights(cfg, random_weights(cfg, seed=5), dtype="float32", fast=True)
    ps = prompts(4, seed=8)
    want = {f"r{i}": alone(fast, p) for i, p in enumerate(ps)}
    eng = LLMEngine(fast, kv_memory_gib=0.01, block_size=4, max_num_batched_tokens=16)
    check_same(drain(eng, {0: [(r, p) for r, p in zip(want, ps, strict=True)]}), want)
