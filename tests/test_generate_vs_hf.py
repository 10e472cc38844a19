"""Greedy generation with our KV cache, token for token against HF transformers' generate(do_sample=False).

fp32, 32 new tokens, several prompts of different lengths, dense and MoE (tiny configs, random weights).
Checked three ways: Qwen3ForCausalLM.generate (one sequence), and batch_infer_one_round with all prompts in
one packed batch (each must still equal HF run alone).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import hf_utils
from qwen3lab.config import Qwen3Config
from qwen3lab.qwen3 import Qwen3ForCausalLM
from qwen3lab.random_init import random_weights

pytestmark = [pytest.mark.hf,
              pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                 reason="HF transformers (the [test] extra) is the reference here")]

STEPS = 32


def make_cfg(moe: bool) -> Qwen3Config:
    d = {"model_type": "qwen3_moe" if moe else "qwen3", "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
         "vocab_size": 2048, "rope_theta": 1e6, "max_position_embeddings": 512, "tie_word_embeddings": not moe}
    if moe:
        d.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)
    return Qwen3Config.from_dict(d, source="test config")  # no eos: every run makes all 32 tokens


def prompts(cfg) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, cfg.vocab_size, size=n).tolist() for n in (1, 4, 11, 23)]


def hf_greedy(hf, ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=STEPS, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def first_difference(a: list[int], b: list[int]) -> str:
    k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return f"first difference at step {k}:\n  ours {a}\n  HF   {b}"


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def pair(request):
    cfg = make_cfg(request.param)
    w = random_weights(cfg, seed=11)
    hf = hf_utils.hf_model(cfg, w, torch.float32, "sdpa")
    refs = [hf_greedy(hf, ids) for ids in prompts(cfg)]  # HF's tokens, computed once for both tests
    return cfg, Qwen3ForCausalLM.from_weights(cfg, w, dtype="float32"), refs


def test_greedy_generate_equals_hf(pair):
    cfg, ours, refs = pair
    for ids, ref in zip(prompts(cfg), refs, strict=True):
        r = ours.generate(ids, max_steps=STEPS)
        assert r.token_ids == ref, first_difference(r.token_ids, ref)
        assert r.finish_reason == "length" and len(r.token_ids) == STEPS
    print(f"{cfg.model_type}: {len(prompts(cfg))} prompts x {STEPS} tokens identical to HF generate")


def test_batched_rounds_equal_hf_run_alone(pair):
    """All prompts decoded together (one packed forward per round) still give HF's tokens for each."""
    cfg, ours, refs = pair
    ps = prompts(cfg)
    tasks = [ours.new_task(ids, max_new_tokens=STEPS) for ids in ps]
    while not all(t.finished for t in tasks):
        ours.batch_infer_one_round([t for t in tasks if not t.finished])
    for t, ref in zip(tasks, refs, strict=True):
        assert t.generated == ref, first_difference(t.generated, ref)
        assert t.finish_reason == "length"
