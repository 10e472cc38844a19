"""`qwen3lab serve` as users run it (a subprocess): SIGTERM mid-stream lets the running request finish with all
its tokens and `data: [DONE]`, then the process ends (by the SIGTERM, re-raised by uvicorn once drained);
`bench serve --url` against it reports every request."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from serve_util import sigterm_mid_stream

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.slow  # a subprocess that imports torch and loads a checkpoint


@pytest.fixture(scope="module")
def server_proc(tmp_path_factory):
    from qwen3lab.bench.serve import free_port
    from qwen3lab.make_model import make_model

    path = make_model(tmp_path_factory.mktemp("serve_cli") / "tiny", preset="tiny", dtype="float32")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", "from qwen3lab.cli import main; main()", "serve", "--model",
                             str(path), "--dtype", "float32", "--no-fast", "--threads", "1", "--port", str(port),
                             "--kv-memory", "0.1"], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "server did not answer /health in 60 s"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_bench_serve_against_url(server_proc, capsys):
    from qwen3lab.bench.serve import bench_serve

    _, url = server_proc
    rep = bench_serve(url, None, "float32", None, num_requests=4, concurrency="1,2", request_rate=None,
                      max_tokens=5, served_model_name=None, json_path=None)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["bench"] == "serve"
    for r in rep["results"]:
        assert r["failed"] == 0 and r["requests"] == 4, r
        assert r["output_tokens"] == 4 * 5, r  # every request made exactly max_tokens (ignore_eos)


def test_sigterm_drains_running_request(server_proc):
    proc, url = server_proc
    usage = sigterm_mid_stream(proc, url, 300)["usage"]
    assert usage["completion_tokens"] == 300, usage
    # after the drain uvicorn re-raises the SIGTERM it caught, so the exit status says "terminated by SIGTERM"
    assert proc.wait(timeout=60) == -signal.SIGTERM
