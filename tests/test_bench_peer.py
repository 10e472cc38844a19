"""`bench generate --peer llama.cpp`: llama.cpp in the same run as ours.

- without a built llama.cpp (CI never builds it) the peer is skipped with one line naming `make peer`, and the
  rest of the bench runs as before;
- where `make peer` has built it, the peer runs for real on a tiny checkpoint: llama.cpp's own converter writes
  the GGUF, llama-bench times prefill and decode, and ours' records get `speedup_vs_llama_cpp` against them.
"""

from __future__ import annotations

import json

import pytest

from qwen3lab.bench import llama_cpp
from qwen3lab.bench.run import run_bench_command

pytestmark = pytest.mark.slow


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from qwen3lab.make_model import make_model

    return make_model(tmp_path_factory.mktemp("peer") / "tiny", preset="tiny", dtype="bfloat16")


def test_peer_not_built_is_skipped_with_one_clear_line(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QWEN3LAB_PEERS", str(tmp_path / "no-peers-here"))
    assert "make peer" in llama_cpp.missing()
    rc = run_bench_command("generate", model=str(tiny_model), dtype="bfloat16", prompt_lens="8", batch="1",
                           new_tokens=3, warmups=0, runs=1, quiet=True, no_hf=True, no_roofline=True,
                           peer="llama.cpp")
    assert rc == 0
    captured = capsys.readouterr()
    assert "note: peer skipped: llama.cpp is not built in" in captured.err and "make peer" in captured.err
    report = _last_json(captured.out)
    assert {r["impl"] for r in report["results"]} == {"qwen3lab"}
    assert any("make peer" in n for n in report["settings"]["notes"])


def test_llama_cpp_peer_runs_for_real(tiny_model, capsys):
    why = llama_cpp.missing()
    if why:
        pytest.skip(why)
    pytest.importorskip("sentencepiece", reason="llama.cpp's GGUF converter needs sentencepiece (make peer)")
    rc = run_bench_command("generate", model=str(tiny_model), dtype="bfloat16", prompt_lens="16", batch="1",
                           new_tokens=4, warmups=0, runs=1, quiet=True, no_hf=True, no_roofline=True,
                           peer="llama.cpp")
    assert rc == 0
    report = _last_json(capsys.readouterr().out)
    peer = {(r["phase"], r["case"]): r for r in report["results"] if r["impl"] == "llama.cpp"}
    assert set(peer) == {("prefill", "prompt=16 batch=1"), ("decode", "batch=1 prompt=16 new=4")}
    assert all(r["tok_per_s"] > 0 and r["dtype"] == "bfloat16" for r in peer.values())
    ours = {(r["phase"], r["case"]): r for r in report["results"] if r["impl"] == "qwen3lab"}
    for key, r in peer.items():  # the ratio is computed from the two records, not copied from anywhere
        assert ours[key]["speedup_vs_llama_cpp"]["tok_per_s"] == pytest.approx(
            ours[key]["tok_per_s"] / r["tok_per_s"], rel=1e-3)
    info = report["settings"]["peer"]["llama.cpp"]["bfloat16"]
    assert info["gguf"].endswith("-bf16.gguf") and info["kv_cache"] == "bf16"


def test_a_peer_tool_killed_by_a_signal_is_named(tmp_path):
    """A llama.cpp tool that dies of SIGILL prints nothing: the error names the signal and the way out."""
    import sys

    from qwen3lab.backends.gguf import run_tool
    from qwen3lab.errors import InputError

    cmd = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"]
    with pytest.raises(InputError) as e:
        run_tool(cmd, "llama-bench -p 128")
    msg = str(e.value)
    assert "llama-bench -p 128 failed (killed by SIGILL: an instruction this CPU refuses" in msg, msg
    assert "make peer" in msg, msg
    with pytest.raises(InputError, match=r"failed \(exit 3\): boom"):
        run_tool([sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"], "llama-quantize")
