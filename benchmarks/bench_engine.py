"""LLMEngine throughput and prefix caching: a table, then one JSON line.

    python benchmarks/bench_engine.py /tmp/m/q06 [--dtype bfloat16] [--streams 16] [--new 64] [--system 1024]

1. Concurrency: one greedy request of --new tokens, then --streams of them at once (different short
   prompts); total output tok/s each way (wall time from the first add_request to the last token).
2. Prefix caching: --streams requests sharing a --system-token system prompt (each with its own short
   suffix, one output token), all queued at once, with prefix caching off and on: prompt tokens the model
   computed, the hit rate, TTFT (mean and max over the requests) and the wall time.
Greedy, eos ignored (every request makes exactly its max_tokens). Random-weight checkpoints do fine: the
work does not depend on the weights' values.
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


def run(engine: LLMEngine, reqs: list[list[int]], new: int) -> dict:
    t0 = time.perf_counter()
    for i, p in enumerate(reqs):
        engine.add_request(f"r{i}", p, SamplingParams(), new)
    first: dict[str, float] = {}
    n = 0
    while engine.has_unfinished():
        for o in engine.step():
            first.setdefault(o.request_id, time.perf_counter() - t0)
            n += 1
    wall = time.perf_counter() - t0
    ttft = list(first.values())
    return {"wall_s": wall, "tokens": n, "tok_s": n / wall, "ttft_mean_s": sum(ttft) / len(ttft),
            "ttft_max_s": max(ttft)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--system", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-memory", type=float, default=2.0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    llm = Qwen3ForCausalLM.from_pretrained(a.model, dtype=a.dtype)
    V = llm.config.vocab_size
    rng = random.Random(0)
    short = [[rng.randrange(V) for _ in range(16)] for _ in range(a.streams)]

    def engine(prefix: bool = True) -> LLMEngine:
        return LLMEngine(llm, kv_memory_gib=a.kv_memory, enable_prefix_caching=prefix)

    run(engine(), short[:2], 4)  # warm-up: kernels, allocator
    res = {"one": run(engine(), short[:1], a.new)}
    print("one:", res["one"], flush=True)
    res["many"] = run(engine(), short, a.new)
    print("many:", res["many"], flush=True)
    system = [rng.randrange(V) for _ in range(a.system)]
    shared = [system + s for s in short]
    for prefix in (True, False):
        e = engine(prefix)
        r = run(e, shared, 1)
        st = e.stats()
        r.update(computed=st["prompt_tokens"] - st["cached_prompt_tokens"], prompt_tokens=st["prompt_tokens"],
                 hit_rate=st["prefix_hits"] / max(1, st["prefix_queries"]), fed=st["fed_tokens"])
        res[f"prefix_{'on' if prefix else 'off'}"] = r
        print(f"prefix {prefix}:", r, flush=True)
    print(f"machine: {machine_info()}")
    print(f"{'run':<28}{'tok/s':>9}{'wall s':>9}{'TTFT mean':>11}{'TTFT max':>10}")
    for k in ("one", "many"):
        r = res[k]
        print(f"{k + ' (' + str(1 if k == 'one' else a.streams) + ' x ' + str(a.new) + ')':<28}{r['tok_s']:>9.1f}"
              f"{r['wall_s']:>9.2f}{r['ttft_mean_s']:>11.3f}{r['ttft_max_s']:>10.3f}")
    print(f"speed-up {a.streams} streams vs 1: {res['many']['tok_s'] / res['one']['tok_s']:.2f}x")
    print(f"{'prefix caching':<16}{'computed':>10}{'of':>8}{'hit rate':>10}{'TTFT mean':>11}{'TTFT max':>10}"
          f"{'wall s':>9}")
    for k in ("prefix_off", "prefix_on"):
        r = res[k]
        print(f"{k:<16}{r['computed']:>10}{r['prompt_tokens']:>8}{r['hit_rate']:>10.1%}{r['ttft_mean_s']:>11.3f}"
              f"{r['ttft_max_s']:>10.3f}{r['wall_s']:>9.2f}")
    print(json.dumps({"bench": "engine", "dtype": a.dtype, "streams": a.streams, "new": a.new,
                      "system": a.system, **res}))


if __name__ == "__main__":
    main()
