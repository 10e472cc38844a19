"""Every path runs on the paged KV cache and gives the greedy tokens it gave on the contiguous one (float32).

Independent reference: greedy decoding by a whole-sequence forward without any cache at every step (argmax of
the last row). Checked, on the compiled kernels and on the PyTorch fallback (`mode`):
- `generate` (model.new_cache -> a standalone PagedSeqCache, the C++ paged decode kernel) and the old contiguous
  KVCache driven through batch_infer_one_round give the reference's tokens;
- one batch_infer_one_round over tasks of different lengths (one private pool each: the kernel's per-sequence
  pools) gives each task's tokens alone;
- LLMEngine (one shared pool) gives each request's tokens alone, with a decode batch of several sequences.
"""

from __future__ import annotations

import pytest
import torch

from qwen3lab.engine.llm_engine import LLMEngine
from qwen3lab.engine.sampler import SamplingParams
from qwen3lab.models.batch import ForwardBatch
from qwen3lab.models.kv_cache import KVCache
from qwen3lab.models.paged_cache import PagedSeqCache
from qwen3lab.qwen3 import Qwen3ForCausalLM
from qwen3lab.random_init import random_weights
from small_configs import small_cfg

NEW = 8
PROMPTS = [[5, 9, 2, 7], [11] * 21, [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3]]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    pass


def _llm(fast: bool) -> Qwen3ForCausalLM:
    cfg = small_cfg(num_attention_heads=4, num_key_value_heads=2)
    return Qwen3ForCausalLM.from_weights(cfg, random_weights(cfg, seed=5), dtype="float32", fast=fast)


def _reference(llm, prompt: list[int], new: int = NEW) -> list[int]:
    """Greedy tokens from a cache-free whole-sequence forward at every step."""
    ids = list(prompt)
    for _ in range(new):
        logits = llm.model(ForwardBatch.single(torch.tensor(ids)))  # [T, V]
        ids.append(int(torch.argmax(logits[-1])))
    return ids[len(prompt):]


def _rounds(llm, tasks) -> None:
    while not all(t.finished for t in tasks):
        llm.batch_infer_one_round([t for t in tasks if not t.finished])


def test_generate_and_contiguous_cache_give_the_reference_tokens(mode):
    llm = _llm(fast=True)
    for p in PROMPTS:
        want = _reference(llm, p)
        got = llm.generate(p, max_steps=NEW).token_ids
        old = llm.new_task(p, max_new_tokens=NEW, stop=[])
        old.cache = KVCache.for_model(llm.config, len(p) + NEW, torch.float32, "cpu")  # the former cache kind
        _rounds(llm, [old])
        assert got == want, (mode, p, got, want)
        assert old.generated == want, (mode, p, old.generated, want)


def test_new_cache_is_paged_and_one_round_of_many_tasks_equals_each_alone(mode):
    llm = _llm(fast=True)
    assert isinstance(llm.model.new_cache(8), PagedSeqCache)
    tasks = [llm.new_task(p, max_new_tokens=NEW, stop=[]) for p in PROMPTS]
    _rounds(llm, tasks)
    for t, p in zip(tasks, PROMPTS, strict=True):
        assert isinstance(t.cache, PagedSeqCache)
        want = llm.generate(p, max_steps=NEW).token_ids
        assert t.generated == want, (mode, p, t.generated, want)


def test_engine_decode_batches_equal_each_request_alone(mode):
    llm = _llm(fast=True)
    engine = LLMEngine(llm, max_num_seqs=8, kv_memory_gib=0.01, block_size=4)
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, SamplingParams(), NEW)
    got: dict[str, list[int]] = {str(i): [] for i in range(len(PROMPTS))}
    while engine.has_unfinished():
        for o in engine.step():
            got[o.request_id].append(o.token_id)
    for i, p in enumerate(PROMPTS):
        want = _reference(llm, p)
        assert got[str(i)] == want, (mode, p, got[str(i)], want)
