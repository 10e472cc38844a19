"""Batch invariance in bfloat16: does a request's greedy output depend on what else is in the batch?

    python benchmarks/bench_batch_invariance.py /tmp/m/q06 [--dtype bfloat16] [--requests 16] [--new 32]

Each of --requests prompts (random token ids, 8 to 40 long, fixed seed) runs alone through LLMEngine, then all
of them at once in one engine (their prefills packed into one forward, then decode batches of all of them). The
reference for each request is its own run alone. Reported: the fraction of requests whose --new greedy tokens
are identical both ways, and the fraction of tokens that agree before a request's first difference (a
difference changes everything after it). float32 gives 1.0 (tests/test_llm_engine.py); bfloat16 rounds each
GEMM's output, and a packed prefill of several sequences runs other GEMM shapes than one alone, so a near-tie
between two logits can flip. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from qwen3lab.bench.machine import machine_info
from qwen3lab.engine.llm_engine import LLMEngine
from qwen3lab.engine.sampler import SamplingParams
from qwen3lab.qwen3 import Qwen3ForCausalLM


def drain(engine: LLMEngine, prompts: list[list[int]], new: int) -> list[list[int]]:
    """Queue every prompt at once, step until done; each request's tokens in prompt order."""
    got: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(), new)
        got[f"r{i}"] = []
    while engine.has_unfinished():
        for o in engine.step():
            got[o.request_id].append(o.token_id)
    return [got[f"r{i}"] for i in range(len(prompts))]


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    llm = Qwen3ForCausalLM.from_pretrained(a.model, dtype=a.dtype)
    V = llm.config.vocab_size
    rng = random.Random(a.seed)
    prompts = [[rng.randrange(V) for _ in range(rng.randrange(8, 41))] for _ in range(a.requests)]
    engine = LLMEngine(llm, max_num_seqs=a.requests, kv_memory_gib=0.5, enable_prefix_caching=False)
    t0 = time.perf_counter()
    alone = [drain(engine, [p], a.new)[0] for p in prompts]
    t1 = time.perf_counter()
    batch = drain(engine, prompts, a.new)
    t2 = time.perf_counter()
    same = sum(x == y for x, y in zip(alone, batch, strict=True))
    agree = sum(agreeing_prefix(x, y) for x, y in zip(alone, batch, strict=True))
    total = a.requests * a.new
    m = machine_info()
    print(f"{a.model}, {a.dtype}, {torch.get_num_threads()} threads, {m.get('cpu', '')}")
    print(f"{'requests':>8} {'new':>4} {'identical':>10} {'tokens agreeing':>16} {'alone s':>8} {'batch s':>8}")
    print(f"{a.requests:>8} {a.new:>4} {same / a.requests:>10.3f} {agree / total:>16.3f} {t1 - t0:>8.1f} "
          f"{t2 - t1:>8.1f}")
    for i, (x, y) in enumerate(zip(alone, batch, strict=True)):
        if x != y:
            print(f"  request {i} ({len(prompts[i])} prompt tokens) differs from token {agreeing_prefix(x, y)}")
    print(json.dumps({"bench": "batch_invariance", "model": a.model, "dtype": a.dtype, "requests": a.requests,
                      "new": a.new, "identical_rate": same / a.requests, "token_agreement": agree / total,
                      "machine": m}))


if __name__ == "__main__":
    main()
