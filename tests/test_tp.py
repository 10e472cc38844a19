"""Tensor parallel (models/tp.py, models/tp_run.py, dist/): 2 gloo ranks on this CPU against one rank.

References: the single-rank model (same checkpoint, float32, eager) for tokens and logits, the float64 NumPy
oracle through verify for the taps gathered from both ranks. One TP world per test (a process holds one
default process group); each spawns one follower process (~2 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from qwen3lab import Qwen3ForCausalLM
from qwen3lab.dist.group import DistError, free_port
from qwen3lab.make_model import make_model
from qwen3lab.models.batch import ForwardBatch
from qwen3lab.models.tp_backend import TPBackend
from qwen3lab.verify import verify

pytestmark = pytest.mark.slow
IDS = [9707, 11, 1879, 0, 42, 7, 151643, 5]


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    os.environ.setdefault("QWEN3LAB_DIST_TIMEOUT", "30")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp")
    out = {k: make_model(d / k, preset=k, dtype="float32", layers=2) for k in ("tiny", "tiny-moe")}
    # one KV head for 2 ranks: each rank keeps a replica of it
    out["tiny-kv1"] = make_model(d / "kv1", preset="tiny", dtype="float32", layers=2, num_key_value_heads=1)
    return out


def _load(path, ndev):
    return Qwen3ForCausalLM.from_pretrained(path, dtype="float32", fast=False, ndev=ndev)


@pytest.mark.parametrize("kind", ["tiny", "tiny-moe", "tiny-kv1"])
def test_tokens_logits_and_verify_match_one_rank(ckpts, kind):
    one, tp = _load(ckpts[kind], 1), _load(ckpts[kind], 2)
    try:
        want, got = one.generate(IDS, max_steps=8).token_ids, tp.generate(IDS, max_steps=8).token_ids
        assert got == want, f"ndev=2 {got} vs ndev=1 {want}"
        ids = torch.tensor(IDS)
        l1 = one.model(ForwardBatch.single(ids)).numpy()  # [T, V]
        l2 = tp.model(ForwardBatch.single(ids)).numpy()
        diff = float(np.abs(l1 - l2).max())
        assert diff <= 1e-4 * max(1.0, float(np.abs(l1).max())), f"max |logits diff| {diff}"
        rep = verify("numpy", TPBackend(tp.model), IDS, model_path=ckpts[kind], decode_steps=2)
        assert rep.overall_success, rep.sentence()
        names = {r.name for r in rep.compared}
        assert "layers.1.q" in names and "step1.layers.0.k" in names, sorted(names)[:20]
        if kind == "tiny":  # a planted sharding bug is named at its tap: o_proj's output is attn_out
            tp.model.plant_skip_reduce("model.layers.0.self_attn.o_proj")
            bad = verify("numpy", TPBackend(tp.model), IDS, model_path=ckpts[kind])
            assert not bad.overall_success and bad.first_divergence.name == "layers.0.attn_out", bad.sentence()
    finally:
        tp.model.close()


def test_killed_rank_ends_the_run_with_an_error(ckpts):
    tp = _load(ckpts["tiny"], 2)
    try:
        tp.model.procs[0].kill()
        tp.model.procs[0].join()
        t0 = time.perf_counter()
        with pytest.raises(DistError, match="lost a rank"):
            tp.generate(IDS, max_steps=4)
        assert time.perf_counter() - t0 < float(os.environ["QWEN3LAB_DIST_TIMEOUT"]) + 5
    finally:
        tp.model.close()


def test_ndev_not_dividing_heads_is_one_clear_error(ckpts):
    from qwen3lab.config import Qwen3Config
    from qwen3lab.errors import InputError
    from qwen3lab.models.tp import check_tp

    with pytest.raises(InputError, match="ndev=3 must divide num_attention_heads=4"):
        check_tp(Qwen3Config.from_file(ckpts["tiny"]), 3)
    if (os.cpu_count() or 1) >= 3:  # else ndev=3 is refused sooner: more cpu ranks than cores
        with pytest.raises(InputError, match="num_attention_heads=4"):
            _load(ckpts["tiny"], 3)


_MEM = textwrap.dedent("""
    import json, sys
    from qwen3lab import Qwen3ForCausalLM
    from qwen3lab.config import Qwen3Config
    from qwen3lab.models.torch_model import Qwen3LMHeadModel
    from qwen3lab.models.tp_run import peak_rss, rss_now
    from qwen3lab.weights import load_weights
    if __name__ == "__main__":
        if int(sys.argv[2]) == 1:  # the single-rank load: every weight, the same checks
            cfg, before = Qwen3Config.from_file(sys.argv[1]), rss_now()
            m = Qwen3LMHeadModel.from_weights(cfg, load_weights(sys.argv[1], cfg))
            print(json.dumps([{"peak_after_load": peak_rss(), "rss_before_load": before}]))
        else:
            m = Qwen3ForCausalLM.from_pretrained(sys.argv[1], dtype="float32", fast=False, ndev=2)
            print(json.dumps(m.model.rank_stats()))
            m.model.close()
""")


def test_rank_memory_is_about_half(tmp_path):
    """Peak RSS growth from loading (peak after - resident before the load) of each of 2 ranks <= 0.6x one
    rank's,
    on a Qwen3-0.6B-shaped checkpoint cut to 4 layers (float32, ~0.9 GB)."""
    path = make_model(tmp_path / "m", preset="qwen3-0.6b", layers=4, dtype="float32")
    script = tmp_path / "mem.py"
    script.write_text(_MEM)

    def run(ndev):
        out = subprocess.run([sys.executable, str(script), str(path), str(ndev)], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    one = run(1)[0]
    grow1 = one["peak_after_load"] - one["rss_before_load"]
    for r in run(2):
        grow = r["peak_after_load"] - r["rss_before_load"]
        assert grow <= 0.6 * grow1, f"rank {r['rank']}: +{grow / 2**20:.0f} MiB vs one rank +{grow1 / 2**20:.0f} MiB"


_NODE = textwrap.dedent(f"""
    import json, sys
    from qwen3lab import Qwen3ForCausalLM
    m = Qwen3ForCausalLM.from_pretrained(sys.argv[1], dtype="float32", fast=False, ndev=2)
    print("TOKENS", json.dumps(m.generate({IDS!r}, max_steps=6).token_ids))
    m.model.close()
""")


def test_torchrun_two_nodes_on_loopback(ckpts, tmp_path):
    script = tmp_path / "node.py"
    script.write_text(_NODE)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
                               "1", "--node-rank", str(r), "--master-addr", "127.0.0.1", "--master-port", str(port),
                               str(script), str(ckpts["tiny"])], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for r in range(2)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, e) in zip(procs, outs, strict=True):
        assert p.returncode == 0, e[-2000:]
    lines = [ln for o, _ in outs for ln in o.splitlines() if ln.startswith("TOKENS")]
    assert len(lines) == 1, outs  # only rank 0 prints
    want = _load(ckpts["tiny"], 1).generate(IDS, max_steps=6).token_ids
    assert json.loads(lines[0][7:]) == want


@pytest.mark.cuda
def test_nccl_two_gpus_match_one(ckpts):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    one = Qwen3ForCausalLM.from_pretrained(ckpts["tiny"], dtype="float32", fast=False, device="cuda")
    tp = Qwen3ForCausalLM.from_pretrained(ckpts["tiny"], dtype="float32", fast=False, device="cuda", ndev=2)
    try:
        assert tp.generate(IDS, max_steps=8).token_ids == one.generate(IDS, max_steps=8).token_ids
    finally:
        tp.model.close()


def test_verify_command_ndev_2(ckpts):
    from rich.console import Console

    from qwen3lab.verify.command import run_verify_command

    assert run_verify_command(Console(quiet=True), model_path=str(ckpts["tiny-moe"]), candidate="torch", ndev=2) == 0
