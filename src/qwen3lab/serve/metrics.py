"""Prometheus metrics for /metrics, on the server's own registry (two apps in one process do not collide).

Gauges read engine.stats() at scrape time (running / waiting sequences, KV blocks, prefix hit rate); counters
and histograms are fed by the request handlers as tokens arrive: tokens per second is `rate()` of the token
counters, as in vLLM's metrics. Names follow vLLM's with a `qwen3lab:` prefix.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# seconds; TTFT spans CPU prefill of long prompts, ITL one decode step
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    def __init__(self, model_name: str):
        r = self.registry = CollectorRegistry()
        lab = ["model_name"]
        self.running = Gauge("qwen3lab:num_requests_running", "sequences in the running batch", lab, registry=r)
        self.waiting = Gauge("qwen3lab:num_requests_waiting", "sequences waiting for the batch", lab, registry=r)
        self.kv_used = Gauge("qwen3lab:kv_blocks_used", "KV cache blocks in use", lab, registry=r)
        self.kv_total = Gauge("qwen3lab:kv_blocks_total", "KV cache blocks in all", lab, registry=r)
        self.hit_rate = Gauge("qwen3lab:prefix_cache_hit_rate", "prefix cache hits / queries (0 when none)",
                              lab, registry=r)
        self.prompt_tokens = Counter("qwen3lab:prompt_tokens", "prompt tokens received", lab, registry=r)
        self.gen_tokens = Counter("qwen3lab:generation_tokens", "tokens generated", lab, registry=r)
        self.finished = Counter("qwen3lab:request_success", "requests finished", lab + ["finished_reason"],
                                registry=r)
        self.ttft = Histogram("qwen3lab:time_to_first_token_seconds", "arrival to first token", lab,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("qwen3lab:inter_token_latency_seconds", "time between two tokens of a sequence",
                             lab, buckets=ITL_BUCKETS, registry=r)
        self.name = model_name

    def render(self, stats: dict) -> bytes:
        n = self.name
        self.running.labels(n).set(stats.get("running", 0))
        self.waiting.labels(n).set(stats.get("waiting", 0))
        self.kv_used.labels(n).set(stats.get("kv_blocks_used", 0))
        self.kv_total.labels(n).set(stats.get("kv_blocks_total", 0))
        q = stats.get("prefix_queries", 0)
        self.hit_rate.labels(n).set(stats.get("prefix_hits", 0) / q if q else 0.0)
        return generate_latest(self.registry)
