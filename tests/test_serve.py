"""The real server (uvicorn in a thread, one per module) on a tiny float32 checkpoint, through the official
`openai` client and raw HTTP. References: the same model's single-sequence `generate` (greedy float32, so
the text must be identical), hand-built expectations for errors, prometheus_client's own parser."""

from __future__ import annotations

import json
import threading
import time

import pytest

from serve_util import concurrent_completions

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.slow  # loads a checkpoint and runs a server

KEY = "test-key"
PROMPTS = ["Hello there", "The capital of France is", "1 2 3 4", "Write a poem", "def f(x):", "Once upon a time",
           "Q: why? A:", "zzz"]


@pytest.fixture(scope="module")
def served(tmp_path_factory, one_torch_thread):
    import uvicorn

    from qwen3lab.bench.serve import free_port
    from qwen3lab.make_model import make_model
    from qwen3lab.qwen3 import Qwen3ForCausalLM
    from qwen3lab.serve.app import make_app

    path = make_model(tmp_path_factory.mktemp("serve") / "tiny", preset="tiny", dtype="float32")
    lm = Qwen3ForCausalLM.from_pretrained(path, dtype="float32", fast=False)
    app = make_app(lm, "tiny", max_num_seqs=16, kv_memory_gib=0.1, api_key=KEY, max_queue=64)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield lm, app.state.server, f"http://127.0.0.1:{port}"
    server.should_exit = True
    th.join(timeout=30)


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


def alone(lm, prompt_ids, n):
    """The reference: the same model, one sequence, greedy, eos stops."""
    return lm.generate(prompt_ids, max_steps=n)


def test_completion_matches_generate(served):
    lm, _, url = served
    r = client(url).completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=0)
    ref = alone(lm, lm.tokenizer.encode(PROMPTS[1]), 12)
    assert r.choices[0].text == ref.text, (r.choices[0].text, ref.text)
    assert r.usage.completion_tokens == len(ref.token_ids) and r.usage.prompt_tokens == len(lm.encode(PROMPTS[1]))
    assert r.choices[0].finish_reason == {"length": "length", "stop": "stop"}[ref.finish_reason]


def test_chat_stream_equals_non_stream_and_ends_done(served):
    lm, _, url = served
    msgs = [{"role": "user", "content": "Hi!"}]
    kw = dict(model="tiny", messages=msgs, max_tokens=10, temperature=0,
              extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    full = client(url).chat.completions.create(**kw)
    ids = lm.tokenizer.encode_chat(msgs, enable_thinking=False)
    assert full.choices[0].message.content == alone(lm, ids, 10).text
    chunks = list(client(url).chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    raw = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                     json={**{k: v for k, v in kw.items() if k != "extra_body"}, "stream": True}).text
    assert raw.rstrip().endswith("data: [DONE]"), raw[-200:]


def test_stop_string_cuts_text(served):
    lm, _, url = served
    ref = alone(lm, lm.tokenizer.encode(PROMPTS[0]), 16).text
    stop = ref[len(ref) // 2:len(ref) // 2 + 2]
    if not stop.strip():
        pytest.skip(f"reference text {ref!r} has no usable stop string")
    r = client(url).completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == ref[:ref.find(stop)], (r.choices[0].text, ref, stop)
    assert r.choices[0].finish_reason == "stop"


def test_32_concurrent_streams_each_equal_alone(served):
    lm, _, url = served
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(32)]
    n = [4 + i % 5 for i in range(32)]  # different lengths: sequences join and leave the batch at different steps
    refs = [alone(lm, lm.tokenizer.encode(p), k).text for p, k in zip(prompts, n, strict=True)]
    got = concurrent_completions(url, KEY, prompts, n)
    bad = [(i, g, r) for i, (g, r) in enumerate(zip(got, refs, strict=True)) if g != r]
    assert not bad, f"{len(bad)} of 32 differ from the request alone: {bad[:3]}"


def _wait_idle(server, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = server.loop.stats()
        if s["kv_blocks_used"] == 0 and s["running"] == 0 and s["waiting"] == 0:
            return s
        time.sleep(0.05)
    return server.loop.stats()


def _long_stream(url):
    body = {"model": "tiny", "prompt": "a", "max_tokens": 30000, "temperature": 0, "stream": True, "ignore_eos": True}
    return httpx.stream("POST", f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                        timeout=30)


def test_disconnect_frees_blocks(served):
    _, server, url = served
    with _long_stream(url) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert server.loop.stats()["kv_blocks_used"] > 0
    s = _wait_idle(server)
    assert s["kv_blocks_used"] == 0 and s["running"] == 0, s
    assert server.loop.in_flight == 0


def test_queue_full_is_429_with_retry_after(served):
    _, server, url = served
    old, server.loop.max_queue = server.loop.max_queue, 1
    try:
        with _long_stream(url) as r:
            lines = r.iter_lines()  # kept: a dropped iterator closes the response (a disconnect)
            next(lines)
            with pytest.raises(openai.RateLimitError) as e:
                client(url).completions.create(model="tiny", prompt="x", max_tokens=2)
            assert e.value.response.headers["retry-after"] == "1"
            assert e.value.body["code"] == "queue_full", e.value.body
    finally:
        server.loop.max_queue = old
    assert _wait_idle(server)["kv_blocks_used"] == 0


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "n": 99}, "n"),
    ({"prompt": "x", "stop": [1]}, "stop"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [1] * 41000}, "prompt"),
    ({"prompt": "x", "max_tokens": 10**6}, "max_tokens"),
    ({"prompt": [10**9]}, "prompt"),
])
def test_bad_field_is_400_naming_it(served, body, param):
    _, _, url = served
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", **body}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"] and err["type"] == "invalid_request_error", err


def test_chat_bad_messages_is_400(served):
    _, _, url = served
    with pytest.raises(openai.BadRequestError) as e:
        client(url).chat.completions.create(model="tiny", messages=[{"content": "no role"}])
    assert e.value.body["param"] == "messages[0]", e.value.body


def test_api_key(served):
    _, _, url = served
    assert httpx.get(f"{url}/health").status_code == 200
    for path in ("/v1/models", "/metrics"):
        r = httpx.get(f"{url}{path}")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", r.text
    r = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert [m.id for m in client(url).models.list().data] == ["tiny"]


def test_metrics_parse(served):
    from prometheus_client.parser import text_string_to_metric_families

    _, server, url = served
    shared = " ".join(["system prompt shared by both requests"] * 12)  # > 2 KV blocks of 16 tokens
    for _ in range(2):  # the second one finds the first one's full blocks in the prefix cache
        r = client(url).completions.create(model="tiny", prompt=shared, max_tokens=3, temperature=0)
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("qwen3lab:num_requests_running", "qwen3lab:num_requests_waiting", "qwen3lab:kv_blocks_used",
                 "qwen3lab:prefix_cache_hit_rate", "qwen3lab:generation_tokens", "qwen3lab:time_to_first_token_seconds",
                 "qwen3lab:inter_token_latency_seconds"):
        assert name in fams, sorted(fams)
    gen = sum(s.value for s in fams["qwen3lab:generation_tokens"].samples if s.name.endswith("_total"))
    assert gen >= r.usage.completion_tokens
    st = server.loop.stats()
    rate = [s.value for s in fams["qwen3lab:prefix_cache_hit_rate"].samples][0]
    assert st["prefix_hits"] > 0 and rate == pytest.approx(st["prefix_hits"] / st["prefix_queries"]), (rate, st)
    ttft_count = [s.value for s in fams["qwen3lab:time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert ttft_count and ttft_count[0] >= 1


def test_n_choices_and_seed(served):
    _, _, url = served
    kw = dict(model="tiny", prompt="Hello", max_tokens=6, temperature=1.0, seed=7, n=2)
    a = client(url).completions.create(**kw)
    b = client(url).completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # a seed makes sampling reproducible
    assert json.loads(a.model_dump_json())["object"] == "text_completion"


def test_logprobs_match_the_models_log_softmax(served):
    import torch

    from qwen3lab.models.batch import ForwardBatch

    lm, _, url = served
    r = client(url).completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=1, temperature=0, logprobs=3)
    ids = lm.tokenizer.encode(PROMPTS[2])
    cache = lm.model.new_cache(len(ids) + 1)
    with torch.no_grad():
        logits = lm.model(ForwardBatch.pack([(cache, cache.reserve(len(ids)), ids)], last_only=True,
                                            device=lm.device))[0]
    ref = torch.log_softmax(logits.double(), -1)
    top = torch.topk(ref, 3)
    lp = r.choices[0].logprobs
    want = {lm.tokenizer.decode([int(i)]): float(v) for i, v in zip(top.indices, top.values, strict=True)}
    got = lp.top_logprobs[0]
    assert set(got) == set(want), (got, want)
    diff = max(abs(got[k] - want[k]) for k in want)
    assert diff < 1e-4, (got, want, diff)
    assert lp.tokens[0] == max(want, key=want.get) and abs(lp.token_logprobs[0] - max(want.values())) < 1e-4
