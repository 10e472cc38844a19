"""`qwen3lab serve --ndev 2` as users run it (a subprocess on loopback, 2 gloo ranks), and the LLMEngine over a
tensor-parallel model (LLM(..., ndev=2)).

References: the same checkpoint on one rank in this process (float32, greedy: tokens and text must be
identical), each request's output alone. The server's process tree is read from /proc. Three servers: the
one most tests share (SIGTERM'd last), one under torchrun, one whose follower is killed. The unit tier:
EngineLoop over a stand-in engine whose rank is lost (500 to those in flight, 503 after, on_fatal once).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from serve_util import concurrent_completions, sigterm_mid_stream

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

slow = pytest.mark.slow  # subprocess servers, 2 ranks each; the EngineLoop tests at the end are unit-tier

PROMPTS = ["Hello there", "The capital of France is", "1 2 3 4", "def f(x):", "Once upon a time", "zzz"]
ENV = {**os.environ, "QWEN3LAB_DIST_TIMEOUT": "30", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, one_torch_thread):
    from qwen3lab.make_model import make_model

    d = tmp_path_factory.mktemp("tp_serve")
    return {k: make_model(d / k, preset=k, dtype="float32", layers=2) for k in ("tiny", "tiny-moe")}


@pytest.fixture(scope="module")
def one(ckpts):
    """The reference: one rank, this process."""
    from qwen3lab import Qwen3ForCausalLM

    return Qwen3ForCausalLM.from_pretrained(ckpts["tiny"], dtype="float32", fast=False)


def _serve(cmd: list[str], port: int) -> subprocess.Popen:
    """Start a server (cmd) and wait for /health; stderr is kept for the assertion messages."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=ENV)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("server did not answer /health in 120 s")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)


def _serve_args(path, port: int) -> list[str]:
    return ["serve", "--model", str(path), "--dtype", "float32", "--no-fast", "--port", str(port),
            "--kv-memory", "0.02", "--ndev", "2", "--served-model-name", "tiny"]


def _cli(path, port: int) -> list[str]:
    return [sys.executable, "-c", "from qwen3lab.cli import main; main()", *_serve_args(path, port)]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _descendants(pid: int) -> set[int]:
    """Every live process below pid (Linux /proc)."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = set(), [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _alive(pids: set[int]) -> set[int]:
    return {p for p in pids if os.path.exists(f"/proc/{p}") and "zombie" not in _state(p)}


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((ln for ln in f if ln.startswith("State:")), "").lower()
    except OSError:
        return "zombie"  # gone


@pytest.fixture(scope="module")
def server(ckpts):
    from qwen3lab.bench.serve import free_port

    port = free_port()
    proc = _serve(_cli(ckpts["tiny"], port), port)
    yield proc, f"http://127.0.0.1:{port}"
    _stop(proc)


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


@slow
def test_completion_and_chat_match_one_rank(server, one):
    proc, url = server
    r = client(url).completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=0)
    ref = one.generate(one.encode(PROMPTS[1]), max_steps=12)
    assert r.choices[0].text == ref.text, (r.choices[0].text, ref.text)
    assert r.usage.completion_tokens == len(ref.token_ids)
    msgs = [{"role": "user", "content": "Hi!"}]
    kw = dict(model="tiny", messages=msgs, max_tokens=10, temperature=0,
              extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    want = one.generate(one.tokenizer.encode_chat(msgs, enable_thinking=False), max_steps=10).text
    full = client(url).chat.completions.create(**kw)
    assert full.choices[0].message.content == want, (full.choices[0].message.content, want)
    chunks = list(client(url).chat.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want


@slow
def test_concurrent_streams_each_equal_alone(server, one):
    _, url = server
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(8)]
    n = [3 + i % 4 for i in range(8)]  # different lengths: sequences join and leave the batch at different steps
    refs = [one.generate(one.encode(p), max_steps=k).text for p, k in zip(prompts, n, strict=True)]

    got = concurrent_completions(url, "none", prompts, n)
    bad = [(i, g, r) for i, (g, r) in enumerate(zip(got, refs, strict=True)) if g != r]
    assert not bad, f"{len(bad)} of 8 differ from the request alone on one rank: {bad[:3]}"


@slow
def test_sigterm_drains_then_every_rank_exits(server):
    """Last test on this server: SIGTERM mid-stream; the stream ends whole, then the process tree is gone."""
    proc, url = server
    ranks = _alive(_descendants(proc.pid))
    assert ranks, "no follower process below the server"
    assert sigterm_mid_stream(proc, url, 40, model="tiny")["usage"]["completion_tokens"] == 40
    assert proc.wait(timeout=30) == -signal.SIGTERM, proc.stderr.read()[-2000:]
    deadline = time.monotonic() + 15
    while _alive(ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(ranks), f"ranks left running after the server exited: {_alive(ranks)}"


@slow
def test_killed_follower_ends_requests_and_server(ckpts):
    """A follower killed mid-stream: the stream ends with an OpenAI-shaped error event, the server exits 2."""
    from qwen3lab.bench.serve import free_port

    port = free_port()
    proc = _serve(_cli(ckpts["tiny"], port), port)
    try:
        follower = [p for p in _alive(_descendants(proc.pid)) if b"spawn_main" in _cmdline(p)]  # not the tracker
        assert len(follower) == 1, follower
        follower = follower[0]
        body = {"model": "tiny", "prompt": "a", "max_tokens": 4000, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as r:
            it = r.iter_lines()
            assert next(it).startswith("data: ")
            os.kill(follower, signal.SIGKILL)
            data = [x for x in it if x.startswith("data: ")]
        err = json.loads(data[-2][6:])
        assert data[-1] == "data: [DONE]" and "lost a rank" in err["error"]["message"], data[-2:]
        assert set(err["error"]) == {"message", "type", "param", "code"}, err
        assert proc.wait(timeout=30) == 2
        assert "lost a rank" in proc.stderr.read()
    finally:
        _stop(proc)


@slow
def test_torchrun_world_serves_from_rank_0(ckpts, one):
    from qwen3lab.bench.serve import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "qwen3lab.cli", *_serve_args(ckpts["tiny"], port)]
    proc = _serve(cmd, port)
    try:
        r = client(f"http://127.0.0.1:{port}").completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8,
                                                                   temperature=0)
        assert r.choices[0].text == one.generate(one.encode(PROMPTS[0]), max_steps=8).text
        ranks = _alive(_descendants(proc.pid))
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 15
        while _alive(ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(ranks), f"ranks left running after torchrun exited: {_alive(ranks)}"
    finally:
        _stop(proc)


@slow
def test_llm_offline_ndev_2_moe_matches_one_rank(ckpts):
    """LLMEngine over a TPModel (paged pools on both ranks, block tables broadcast) on the MoE checkpoint, with
    prefix sharing and a small block size so tables span several blocks."""
    from qwen3lab import LLM, SamplingParams

    sys_ids = [9707, 11, 1879, 0, 42, 7, 5, 9, 11]
    prompts = [sys_ids + [12, 13], sys_ids + [14], [151643, 5, 6]]
    sp = SamplingParams(max_tokens=10, temperature=0)
    kw = dict(dtype="float32", fast=False, kv_memory_gib=0.005, block_size=4)
    def run(llm):  # the first prompt alone first, so the others find its prefix blocks cached
        return [o.token_ids for o in llm.generate(prompts[:1], sp) + llm.generate(prompts[1:], sp)]

    want = run(LLM(ckpts["tiny-moe"], **kw))
    tp = LLM(ckpts["tiny-moe"], ndev=2, **kw)
    try:
        got = run(tp)
        assert tp.engine.stats()["prefix_hits"] > 0, tp.engine.stats()
    finally:
        tp.model.model.close()
    assert got == want, f"ndev=2 {got}\nndev=1 {want}"


@slow
def test_idle_ranks_outlive_the_collective_timeout(ckpts, one, monkeypatch):
    """A server waits for requests far longer than a collective may take: the followers wait for rank 0's next
    command on the command group (no timeout while idle), so an idle spell past QWEN3LAB_DIST_TIMEOUT is fine."""
    from qwen3lab import Qwen3ForCausalLM
    from qwen3lab.models import tp_run

    monkeypatch.setenv("QWEN3LAB_DIST_TIMEOUT", "6")
    tp = Qwen3ForCausalLM.from_pretrained(ckpts["tiny"], dtype="float32", fast=False, ndev=2)
    try:
        time.sleep(7)
        got = tp.generate(PROMPTS[0], max_steps=4).token_ids
        # a server's idle loop (check_alive) pings the ranks once PING_S passed without a command; the command
        # stream stays in step: the next run is still right
        monkeypatch.setattr(tp_run, "PING_S", 0.0)
        before = tp.model._last
        tp.model.check_alive()
        assert tp.model._last > before, "check_alive sent no ping"
        again = tp.generate(PROMPTS[0], max_steps=4).token_ids
    finally:
        tp.model.close()
    want = one.generate(PROMPTS[0], max_steps=4).token_ids
    assert got == want and again == want, (got, again, want)


class _LostRank:
    """A stand-in LLMEngine whose model lost a rank: step() raises DistError (idle: check_alive does)."""

    def __init__(self, idle: bool):
        self.reqs: set[str] = set()
        self.idle = idle
        self.model = type("M", (), {"check_alive": staticmethod(self._lost)})() if idle else None

    @staticmethod
    def _lost():
        from qwen3lab.errors import DistError

        raise DistError("tensor-parallel run lost a rank (pids [1] gone)")

    def add_request(self, rid, *_a, **_k):
        self.reqs.add(rid)

    def abort(self, rid):
        self.reqs.discard(rid)

    def has_unfinished(self):
        return bool(self.reqs) and not self.idle  # idle: never stepped, only checked

    def step(self):
        self._lost()


@pytest.mark.parametrize("idle", [False, True])
def test_engine_loop_lost_rank_fails_requests_then_refuses(idle):
    from qwen3lab.engine.sampler import SamplingParams
    from qwen3lab.serve.engine_loop import EngineError, EngineLoop
    from qwen3lab.serve.protocol import APIError

    fatal: list[str] = []
    loop_ = EngineLoop(_LostRank(idle), 8, on_fatal=fatal.append)

    async def go():
        q: asyncio.Queue = asyncio.Queue()
        loop_.add(["a"], q, [1, 2], [SamplingParams()], 4, frozenset(), None)
        loop_.start()
        i, out = await asyncio.wait_for(q.get(), timeout=10)
        assert i == 0 and isinstance(out, EngineError) and "lost a rank" in out.message, out
        loop_.thread.join(timeout=10)
        with pytest.raises(APIError) as e:
            loop_.add(["b"], asyncio.Queue(), [1], [SamplingParams()], 4, frozenset(), None)
        return e.value

    err = asyncio.run(go())
    assert not loop_.thread.is_alive()
    assert fatal == [loop_.dead] and "lost a rank" in loop_.dead, (fatal, loop_.dead)
    assert err.status == 503 and set(err.body()["error"]) == {"message", "type", "param", "code"}, err.body()
