"""Benchmarks: each bench end to end on tiny shapes, the JSON contract, --compare, routing statistics against a
router with a known answer, ours-vs-HF parity of the attention bench, and the roofline arithmetic by hand."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from qwen3lab.bench import attention as A
from qwen3lab.bench import moe as M
from qwen3lab.bench.bandwidth import (
    PairedProbe,
    decode_bytes,
    expected_experts_hit,
    measure_bandwidth,
    paired_fraction,
    roofline_tok_per_s,
)
from qwen3lab.bench.compare import compare_reports, parse_tolerance, regressions
from qwen3lab.bench.machine import machine_info
from qwen3lab.bench.modules import layer_state, our_moe_block
from qwen3lab.bench.plot import plot_report
from qwen3lab.bench.report import load_report, make_record, make_report
from qwen3lab.bench.run import run_bench_command
from qwen3lab.bench.timing import busy_warning, percentile, run_timed
from qwen3lab.errors import ConfigError, InputError, NumericsError
from qwen3lab.presets import preset_config

pytestmark = pytest.mark.slow

RECORD_KEYS = {"bench", "impl", "phase", "case", "device", "dtype"}
TINY_ATTN = dict(preset="tiny", seqlens="8,4", past="4,0", decode_past="3,5", decode_repeat=2, warmups=0, runs=1,
                 quiet=True)


def last_json_line(text: str) -> dict:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return json.loads(lines[-1])


def check_report(report: dict, bench: str, figures: set[str]) -> None:
    assert report["bench"] == bench
    for key in ("cpu", "cores", "gpu", "torch"):
        assert key in report["machine"], key
    assert report["settings"]["device"] == "cpu"
    assert report["results"], "no records"
    impls = {r["impl"] for r in report["results"]}
    assert impls == {"qwen3lab", "hf"}, impls
    for r in report["results"]:
        assert RECORD_KEYS <= r.keys(), r
        assert r["bench"] == bench and r["device"] == "cpu"
    present = set().union(*(r.keys() for r in report["results"]))
    assert figures <= present, figures - present


# ---- the three benches end to end ------------------------------------------------------------------
def test_attention_bench_end_to_end(tmp_path, capsys):
    out = tmp_path / "a.json"
    rc = run_bench_command("attention", dtype="float32", json=str(out), **TINY_ATTN)
    assert rc == 0
    stdout = capsys.readouterr().out
    report = last_json_line(stdout)
    assert report == json.loads(out.read_text())
    check_report(report, "attention", {"ttft_ms", "tok_per_s", "latency_ms"})
    assert {(r["impl"], r["phase"]) for r in report["results"]} == {
        ("qwen3lab", "prefill"), ("qwen3lab", "decode"), ("hf", "prefill"), ("hf", "decode")}
    dec = next(r for r in report["results"] if r["impl"] == "qwen3lab" and r["phase"] == "decode")
    assert dec["requests"] == 4 and dec["tokens"] == 4
    assert "speedup_vs_hf" in dec
    assert report["settings"]["parity_rel_error"]["prefill"] <= A.PARITY_RTOL[torch.float32]
    assert "qwen3lab bench attention" in stdout  # the table came first


def test_moe_bench_end_to_end(tmp_path, capsys):
    out = tmp_path / "m.json"
    rc = run_bench_command("moe", preset="tiny-moe", dtype="float32", prefill_tokens="12", decode_tokens="1,3",
                           warmups=0, runs=1, json=str(out), quiet=True)
    assert rc == 0
    report = last_json_line(capsys.readouterr().out)
    check_report(report, "moe", {"tok_per_s", "latency_ms", "roofline_fraction"})
    assert [(r["phase"], r["tokens"]) for r in report["results"] if r["impl"] == "qwen3lab"] == [
        ("prefill", 12), ("decode", 1), ("decode", 3)]
    stats = report["settings"]["routing"]["tokens=12"]
    assert sum(stats["tokens_per_expert"]) == 12 * 2  # every token picks top-2 of 8
    assert stats["experts_hit"] + stats["experts_never_hit"] == 8
    assert report["settings"]["hidden_size"] == 64


def test_generate_bench_end_to_end(tmp_path, capsys):
    from qwen3lab.make_model import make_model

    model = make_model(tmp_path / "tiny", preset="tiny", dtype="float32")
    out = tmp_path / "g.json"
    rc = run_bench_command("generate", model=str(model), dtype="float32", prompt_lens="8,16", batch="1,2",
                           new_tokens=3, warmups=0, runs=1, json=str(out), quiet=True)
    assert rc == 0
    report = last_json_line(capsys.readouterr().out)
    check_report(report, "generate", {"ttft_ms", "tok_per_s", "latency_ms", "peak_mem_bytes", "roofline_fraction"})
    phases = [(r["impl"], r["phase"], r["case"]) for r in report["results"]]
    for impl in ("qwen3lab", "hf"):
        assert (impl, "load", "from_pretrained") in phases
        assert (impl, "prefill", "prompt=16 batch=1") in phases
        assert (impl, "decode", "batch=2 prompt=8 new=3") in phases
    for r in report["results"]:
        if r["phase"] != "load":
            assert r["peak_mem_bytes"] > 0
        if r["phase"] == "decode":
            assert 0 < r["roofline_fraction"] and r["roofline_tok_per_s"] > 0
            # the decode again with a probe read between steps: ours and HF alike
            assert 0 < r["roofline_fraction_paired"] and r["paired_read_gbs"] > 0, r
    bw = report["settings"]["bandwidth"]
    # probed at the start and after ours and after HF; the roofline is taken at the fastest probe
    assert len(bw["probes_read_gbs"]) == 3 and bw["read_gbs"] == max(bw["probes_read_gbs"]) > 0, bw
    wb = report["settings"]["weight_bytes"]["float32"]
    assert wb["qwen3lab"] == wb["hf"]
    assert report["settings"]["fast"] is True and report["settings"]["ours_path"].startswith("fast (")


def tiny_int8_weight_bytes() -> int:
    """What one decode step of the tiny config reads in weights under int8, by hand (D 64, I 128, 2 layers,
    Hq 4, Hkv 2, Dh 32, V 151936, tied): projections 1 byte per weight + a 4-byte scale per output row; the
    norms bfloat16; lm_head (its own int8 copy of the tied embedding) read in full; the embedding is a gather."""
    def q(rows, cols):
        return rows * cols + 4 * rows

    per_layer = q(128, 64) + q(64, 64) + q(64, 64) + q(64, 128)  # q, k, v, o
    per_layer += q(128, 64) + q(128, 64) + q(64, 128)  # gate, up, down
    per_layer += 2 * (32 + 32 + 64 + 64)  # q_norm, k_norm, input / post-attention norms, bf16
    return 2 * per_layer + 2 * 64 + q(151936, 64)  # + final norm + lm_head


def test_generate_bench_several_dtypes_in_one_run(tmp_path, capsys):
    from qwen3lab.make_model import make_model

    model = make_model(tmp_path / "tiny", preset="tiny", dtype="float32")
    rc = run_bench_command("generate", model=str(model), dtype="bfloat16,int8", prompt_lens="8", batch="1",
                           new_tokens=4, warmups=0, runs=1, quiet=True)
    assert rc == 0
    captured = capsys.readouterr()
    report = last_json_line(captured.out)
    assert report["settings"]["dtypes"] == ["bfloat16", "int8"] and report["settings"]["dtype"] == "bfloat16,int8"
    got = {(r["impl"], r["phase"], r["dtype"]) for r in report["results"]}
    for dt in ("bfloat16", "int8"):
        for phase in ("load", "prefill", "decode"):
            assert ("qwen3lab", phase, dt) in got, (phase, dt)
    # HF has no CPU int8 path: its rows are bfloat16 only, the int8 rows have no ratio, and a note says so
    assert {dt for impl, _, dt in got if impl == "hf"} == {"bfloat16"}
    assert "HF transformers has no CPU int8 path" in captured.err and report["settings"]["notes"]
    for r in report["results"]:
        if r["impl"] == "qwen3lab" and r["phase"] != "load":
            assert ("speedup_vs_hf" in r) == (r["dtype"] == "bfloat16"), r
    # the int8 roofline counts int8 weights + float32 row scales (bandwidth.py), by hand
    dec = {r["dtype"]: r for r in report["results"] if r["phase"] == "decode" and r["impl"] == "qwen3lab"}
    kv, embed = 2 * 2 * 2 * 32 * (8 + 4 // 2) * 2, 64 * 2  # (k, v) * layers * Hkv * Dh * context * bf16; one row
    per_layer = 128 * 64 + 64 * 64 + 64 * 64 + 64 * 128 + 32 + 32 + 64 + 64 + 3 * 128 * 64
    bf16_bytes = 2 * (2 * per_layer + 64 + 151936 * 64) + kv + embed
    int8_bytes = tiny_int8_weight_bytes() + kv + embed
    # same bandwidth for both: the rooflines' ratio is the ratio of bytes per step
    assert dec["int8"]["roofline_tok_per_s"] / dec["bfloat16"]["roofline_tok_per_s"] == pytest.approx(
        bf16_bytes / int8_bytes, rel=1e-12)
    bw = report["settings"]["bandwidth"]["read_gbs"]  # rounded to 0.01 GB/s in the report
    assert abs(dec["int8"]["roofline_tok_per_s"] * int8_bytes / 1e9 - bw) <= 0.005 + 1e-9
    wb = report["settings"]["weight_bytes"]
    assert wb["bfloat16"]["qwen3lab"] == wb["bfloat16"]["hf"] and set(wb["int8"]) == {"qwen3lab"}
    # ours' int8 model holds the bf16 embedding plus exactly the int8 weights, scales and norms the roofline counts
    assert wb["int8"]["qwen3lab"] == 151936 * 64 * 2 + tiny_int8_weight_bytes()


def test_generate_bench_no_fast_runs_the_plain_model(tmp_path, capsys, monkeypatch):
    from qwen3lab.bench import generate as G
    from qwen3lab.fast import FastLinear
    from qwen3lab.make_model import make_model

    model = make_model(tmp_path / "tiny", preset="tiny", dtype="float32")
    linears = []
    close = G.OursGenerate.close

    def spy(self):
        linears.append({type(m).__name__ for m in self.lm.model.modules()})
        close(self)

    monkeypatch.setattr(G.OursGenerate, "close", spy)
    common = dict(model=str(model), dtype="float32", prompt_lens="8", batch="1", new_tokens=3, warmups=0, runs=1,
                  quiet=True, no_hf=True, no_roofline=True)
    assert run_bench_command("generate", no_fast=True, **common) == 0
    plain = last_json_line(capsys.readouterr().out)
    assert run_bench_command("generate", **common) == 0
    fast = last_json_line(capsys.readouterr().out)
    assert "FastLinear" not in linears[0] and FastLinear.__name__ in linears[1], linears
    assert plain["settings"]["fast"] is False and plain["settings"]["ours_path"] == "plain eager (--no-fast)"
    assert fast["settings"]["fast"] is True
    # --compare of the fast run against the plain one says which paths it compares
    (tmp_path / "plain.json").write_text(json.dumps(plain))
    run_bench_command("generate", compare=str(tmp_path / "plain.json"), tolerance="1000", **common)
    out = capsys.readouterr().out
    assert "the old report ran ours on the plain eager path (--no-fast), this run on the fast path" in out


def test_dtype_lists_are_checked():
    from qwen3lab.bench.run import parse_dtypes

    assert parse_dtypes("bfloat16, float32,int8,bfloat16", "generate") == ["bfloat16", "float32", "int8"]
    assert parse_dtypes("float16", "attention") == ["float16"]
    assert parse_dtypes("int4,int8", "generate") == ["int4", "int8"]
    with pytest.raises(InputError, match="--dtype 'int3' in --dtype bfloat16,int3: not one of"):
        parse_dtypes("bfloat16,int3", "generate")
    with pytest.raises(InputError, match="int4 is for bench generate"):
        parse_dtypes("int4", "attention")
    with pytest.raises(InputError, match="bench attention takes one dtype"):
        run_bench_command("attention", **{**TINY_ATTN, "dtype": "bfloat16,float32"})
    with pytest.raises(InputError, match="bench moe takes one dtype"):
        run_bench_command("moe", preset="tiny-moe", dtype="float32,bfloat16", warmups=0, runs=1, quiet=True)
    with pytest.raises(InputError, match="int8 is for bench generate"):
        run_bench_command("attention", **{**TINY_ATTN, "dtype": "int8"})
    with pytest.raises(InputError, match="int8 weights need the fast path"):
        run_bench_command("generate", dtype="bfloat16,int8", no_fast=True, warmups=0, runs=1, quiet=True)
    with pytest.raises(InputError, match="--dtype ''"):
        run_bench_command("generate", dtype="", warmups=0, runs=1, quiet=True)


def test_cuda_asked_for_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(InputError, match="CUDA is not available"):
        run_bench_command("attention", device="cuda", **TINY_ATTN)


def test_bad_options_are_typed_errors():
    with pytest.raises(InputError, match="--seqlens has 2 entries but --past has 1"):
        run_bench_command("attention", **{**TINY_ATTN, "past": "4"})
    with pytest.raises(InputError, match="--runs must be >= 1"):
        run_bench_command("attention", **{**TINY_ATTN, "runs": 0})
    with pytest.raises(InputError, match="--dtype"):
        run_bench_command("attention", **{**TINY_ATTN, "dtype": "int3"})
    with pytest.raises(ConfigError, match="qwen3_moe"):
        run_bench_command("moe", preset="tiny", warmups=0, runs=1, quiet=True)
    with pytest.raises(TypeError, match="unknown option"):
        run_bench_command("attention", sequence_lengths="1")


# ---- ours vs HF compute the same thing ---------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_attention_ours_and_hf_agree(preset):
    cfg = preset_config(preset)
    dt, dev = torch.float32, torch.device("cpu")
    shape = A.AttentionShape([5, 3, 4], [6, 0, 2], [1, 4, 7])
    state = layer_state(cfg, "self_attn", 0, dt, dev)
    px, pkv, dx, dkv = A.make_inputs(cfg, shape, dt, dev, 0)
    ours, hf = A.OursAttention(cfg, state, dt, dev), A.HFAttention(cfg, state, dt, dev, "sdpa")
    with torch.inference_mode():
        o_pre = ours.prefill(px, pkv, shape.past)[2]()
        h_pre = hf.prefill(px, pkv, shape.past)[2]()
        o_dec = ours.decode(dx, dkv, shape.decode_past)[2]()
        h_dec = hf.decode(dx, dkv, shape.decode_past)[2]()
    for i, (a, b) in enumerate(zip(o_pre + [o_dec], h_pre + [h_dec], strict=True)):
        diff = (a - b).abs().max().item()
        assert a.shape == b.shape and diff < 1e-5, f"request {i}: max |ours - hf| = {diff}"
    assert A.check_parity("prefill", o_pre, h_pre, dt) < 1e-5
    # the parity check itself fails when the two differ (here: another cached past for one request)
    bad = [o_pre[0], o_pre[1] * 1.01, o_pre[2]]
    with pytest.raises(NumericsError, match="differ on request 1"):
        A.check_parity("prefill", bad, h_pre, dt)


def test_attention_parity_uses_the_cached_past():
    """A past that HF does not see would change the prefill output: the check would catch it."""
    cfg = preset_config("tiny")
    dt, dev = torch.float32, torch.device("cpu")
    shape = A.AttentionShape([4], [6], [3])
    state = layer_state(cfg, "self_attn", 0, dt, dev)
    px, pkv, _, _ = A.make_inputs(cfg, shape, dt, dev, 0)
    zero_kv = [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in pkv]
    with torch.inference_mode():
        a = A.OursAttention(cfg, state, dt, dev).prefill(px, pkv, shape.past)[2]()
        b = A.HFAttention(cfg, state, dt, dev, "sdpa").prefill(px, zero_kv, shape.past)[2]()
    with pytest.raises(NumericsError):
        A.check_parity("prefill", a, b, dt)


# ---- routing statistics against a router with a known answer ---------------------------------------
def test_routing_stats_on_a_router_with_known_output():
    cfg = preset_config("tiny-moe")  # 8 experts, top-2, hidden 64
    E, D = cfg.num_experts, cfg.hidden_size
    state = layer_state(cfg, "mlp", 0, torch.float32, torch.device("cpu"), moe=True)
    # router row e looks at input channel e only: logit_e = 10 * x[e]
    gate = torch.zeros(E, D)
    gate[torch.arange(E), torch.arange(E)] = 10.0
    state["gate.weight"] = gate
    block = our_moe_block(cfg, state)
    # each token: first choice a (x[a] = 1), second choice b (x[b] = 0.5), every other logit 0
    choices = [(0, 1), (0, 2), (0, 3), (1, 2), (4, 0)]
    x = torch.zeros(1, len(choices), D)
    for t, (a, b) in enumerate(choices):
        x[0, t, a], x[0, t, b] = 1.0, 0.5
    idx = M.our_routing(block, x)
    assert idx.tolist() == [list(c) for c in choices]
    s = M.routing_stats(idx, E)
    # by hand: loads [4, 2, 2, 1, 1, 0, 0, 0], mean 10/8 = 1.25,
    # population variance (2.75² + 2·0.75² + 2·0.25² + 3·1.25²) / 8 = 13.5 / 8 = 1.6875
    assert s["tokens_per_expert"] == [4, 2, 2, 1, 1, 0, 0, 0]
    assert s["load_mean"] == 1.25
    assert s["load_cv"] == pytest.approx(math.sqrt(1.6875) / 1.25, rel=1e-12)
    assert s["experts_never_hit"] == 3 and s["never_hit_ids"] == [5, 6, 7]
    assert s["experts_hit"] == 5 and s["load_max"] == 4 and s["max_over_mean"] == pytest.approx(3.2)


def test_routing_stats_even_load_has_zero_cv():
    s = M.routing_stats(torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]]), 4)
    assert s["tokens_per_expert"] == [2, 2, 2, 2] and s["load_cv"] == 0.0 and s["experts_never_hit"] == 0


# ---- --compare ---------------------------------------------------------------------------------------
def _report(**figs) -> dict:
    dev = torch.device("cpu")
    recs = [make_record("generate", "qwen3lab", "decode", "batch=1", dev, "bfloat16", **figs),
            make_record("generate", "hf", "decode", "batch=1", dev, "bfloat16", **figs)]
    return {"bench": "generate", "machine": machine_info(dev), "settings": {}, "results": recs}


def test_compare_knows_which_way_is_better():
    old = _report(tok_per_s=100.0, ttft_ms=50.0, peak_mem_bytes=1000)
    same = copy.deepcopy(old)
    changes, missing = compare_reports(old, same, 0.10)
    assert not missing and not regressions(changes) and {c.status for c in changes} == {"same"}
    # tok/s down 20% and TTFT up 20%: both regressions; memory down: better
    new = _report(tok_per_s=80.0, ttft_ms=60.0, peak_mem_bytes=500)
    by = {(c.record[1], c.figure): c for c in compare_reports(old, new, 0.10)[0]}
    assert by[("qwen3lab", "tok_per_s")].status == "REGRESSION"
    assert by[("qwen3lab", "ttft_ms")].status == "REGRESSION"
    assert by[("qwen3lab", "peak_mem_bytes")].status == "better"
    assert by[("qwen3lab", "tok_per_s")].change == pytest.approx(-0.2)
    # within tolerance: shown as worse, not a regression
    new = _report(tok_per_s=95.0, ttft_ms=52.0, peak_mem_bytes=1000)
    assert not regressions(compare_reports(old, new, 0.10)[0])
    # faster is never a regression, however large the change
    new = _report(tok_per_s=1000.0, ttft_ms=1.0, peak_mem_bytes=1)
    assert not regressions(compare_reports(old, new, 0.10)[0])


def test_compare_and_ratios_match_records_by_dtype():
    dev = torch.device("cpu")

    def rep(bf16: float, int8: float) -> dict:
        recs = [make_record("generate", "qwen3lab", "decode", "batch=1", dev, "bfloat16", tok_per_s=bf16),
                make_record("generate", "hf", "decode", "batch=1", dev, "bfloat16", tok_per_s=10.0),
                make_record("generate", "qwen3lab", "decode", "batch=1", dev, "int8", tok_per_s=int8)]
        return make_report("generate", dev, {}, recs)

    old, new = rep(20.0, 40.0), rep(20.0, 30.0)  # int8 got 25% slower, bf16 unchanged
    assert old["results"][0]["speedup_vs_hf"]["tok_per_s"] == 2.0
    assert "speedup_vs_hf" not in old["results"][2]  # no HF int8 record: no ratio across dtypes
    changes, missing = compare_reports(old, new, 0.10)
    assert not missing
    by = {(c.record[1], c.record[5]): c for c in changes}
    assert by[("qwen3lab", "bfloat16")].status == "same" and by[("qwen3lab", "int8")].status == "REGRESSION"
    assert [c.record[5] for c in regressions(changes)] == ["int8"]


def test_compare_fails_only_on_our_regressions():
    old = _report(tok_per_s=100.0)
    new = copy.deepcopy(old)
    new["results"][1]["tok_per_s"] = 10.0  # HF got slower: the machine, not us
    changes, _ = compare_reports(old, new, 0.10)
    assert [c.status for c in changes if c.record[1] == "hf"] == ["REGRESSION"]
    assert regressions(changes) == []


def test_compare_flags_a_planted_regression_end_to_end(tmp_path, capsys):
    new_json = tmp_path / "new.json"
    assert run_bench_command("attention", dtype="float32", json=str(new_json), **TINY_ATTN) == 0
    capsys.readouterr()
    base = json.loads(new_json.read_text())
    planted = copy.deepcopy(base)  # an "old" run 1000x faster than anything this run can do
    for r in planted["results"]:
        for k in ("tok_per_s",):
            r[k] *= 1000
        for k in ("ttft_ms", "latency_ms", "latency_p90_ms"):
            if k in r:
                r[k] /= 1000
    (tmp_path / "planted.json").write_text(json.dumps(planted))
    rc = run_bench_command("attention", dtype="float32", compare=str(tmp_path / "planted.json"), **TINY_ATTN)
    out = capsys.readouterr().out
    assert rc == 1, out
    report = last_json_line(out)
    assert report["comparison"]["regressions"], report["comparison"]
    assert "REGRESSION" in out
    slow = copy.deepcopy(base)  # an "old" run 1000x slower: nothing regresses
    for r in slow["results"]:
        r["tok_per_s"] /= 1000
        for k in ("ttft_ms", "latency_ms", "latency_p90_ms"):
            if k in r:
                r[k] *= 1000
    (tmp_path / "slow.json").write_text(json.dumps(slow))
    assert run_bench_command("attention", dtype="float32", compare=str(tmp_path / "slow.json"), **TINY_ATTN) == 0


def test_compare_an_unchanged_report_passes_and_tolerance_parses(tmp_path):
    from qwen3lab.bench.run import finish

    rep = _report(tok_per_s=100.0, ttft_ms=5.0)
    opts = {"compare": "old.json", "json": None, "plot": None}
    assert finish(copy.deepcopy(rep), opts, rep, parse_tolerance("10%")) == 0
    worse = _report(tok_per_s=88.0, ttft_ms=5.0)
    assert finish(worse, opts, rep, parse_tolerance(10)) == 1
    assert finish(_report(tok_per_s=88.0, ttft_ms=5.0), opts, rep, parse_tolerance("15")) == 0
    with pytest.raises(InputError, match="--tolerance"):
        parse_tolerance("ten")


def test_load_report_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_report(tmp_path / "missing.json")
    p = tmp_path / "x.json"
    p.write_text("just a table\n")
    with pytest.raises(InputError, match="no JSON line"):
        load_report(p)
    p.write_text('{"bench": "moe"}\n')
    with pytest.raises(InputError, match="no 'results' list"):
        load_report(p)
    p.write_text("table\n" + json.dumps(_report(tok_per_s=1.0)) + "\n")  # captured stdout works too
    assert load_report(p)["bench"] == "generate"


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "p.png"
    plot_report(_report(tok_per_s=10.0, ttft_ms=3.0, peak_mem_bytes=2**20), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- harness pieces ----------------------------------------------------------------------------------
def test_timing_marks_and_percentiles():
    calls = []
    samples = run_timed(lambda mark: (mark(), mark()), torch.device("cpu"), warmups=2, runs=3,
                          setup=lambda: calls.append(1))
    assert len(samples) == 3 and len(calls) == 5  # setup before warmups and runs alike
    for s in samples:
        assert len(s.marks) == 2 and 0 <= s.marks[0] <= s.marks[1] <= s.total
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and percentile([7.0], 90) == 7.0
    assert percentile([0.0, 10.0], 90) == pytest.approx(9.0)


def test_peak_memory_sees_a_large_allocation():
    # In a fresh process: RSS is resident pages, and memory an earlier test freed may still be resident
    # and get reused without raising it.
    import subprocess
    import sys

    code = """
import torch
from qwen3lab.bench.memory import PeakMemory
dev = torch.device("cpu")
with PeakMemory(dev) as base:
    pass
with PeakMemory(dev) as pm:
    x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, every page touched
    del x
with PeakMemory(dev) as after:
    pass
print(base.peak_bytes, pm.peak_bytes, after.peak_bytes, pm.reset_ok)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    base, peak, after, reset_ok = int(out[0]), int(out[1]), int(out[2]), out[3] == "True"
    assert peak >= base + (60 << 20), (base, peak)
    if reset_ok:  # the high-water mark was reset: the 64 MiB are gone from the next phase's peak
        assert after < peak - (48 << 20), (peak, after)


# ---- bandwidth and roofline by hand -----------------------------------------------------------------
def test_decode_bytes_by_hand():
    cfg = preset_config("tiny")  # D 64, I 128, 2 layers, Hq 4, Hkv 2, Dh 32, V 151936, tied
    per_layer = 128 * 64 + 64 * 64 + 64 * 64 + 64 * 128 + 32 + 32 + 64 + 64 + 3 * 128 * 64
    weights = 2 * per_layer + 64 + 151936 * 64  # + final norm + lm_head (the tied embedding, read fully)
    b = decode_bytes(cfg, "float32", context=10, batch=3)
    assert b["weights_bytes"] == 4 * weights
    assert b["kv_bytes"] == 3 * 2 * 2 * 2 * 32 * 10 * 4  # batch * (k, v) * layers * Hkv * Dh * ctx * 4 bytes
    assert b["embed_bytes"] == 3 * 64 * 4
    assert decode_bytes(cfg, "bfloat16", 10)["weights_bytes"] == 2 * weights
    r = roofline_tok_per_s(cfg, "float32", 10.0, context=10, batch=3)
    assert r == pytest.approx(3 * 10e9 / (4 * weights + b["kv_bytes"] + b["embed_bytes"]))


def test_int8_decode_bytes_by_hand():
    cfg = preset_config("tiny")
    b = decode_bytes(cfg, "int8", context=10, batch=3)
    assert b["weights_bytes"] == tiny_int8_weight_bytes()
    assert b["kv_bytes"] == decode_bytes(cfg, "bfloat16", context=10, batch=3)["kv_bytes"]  # KV stays bf16
    assert b["embed_bytes"] == 3 * 64 * 2
    # tiny-moe (untied, 8 experts of I 32, top-2): the router [8, 64] stays bfloat16, the experts are int8 and
    # counted at the fraction hit (2 of 8 for one token)
    moe = preset_config("tiny-moe")

    def q(rows, cols):
        return rows * cols + 4 * rows

    attn = q(128, 64) + q(64, 64) + q(64, 64) + q(64, 128)
    norms = 2 * (32 + 32 + 64 + 64)
    router = 8 * 64 * 2
    experts = 8 * (q(32, 64) + q(32, 64) + q(64, 32)) * 2 / 8
    want = 2 * (attn + norms + router + experts) + 2 * 64 + q(151936, 64)
    assert decode_bytes(moe, "int8", context=1, batch=1)["weights_bytes"] == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="int3"):
        decode_bytes(cfg, "int3", context=1)


def test_int4_decode_bytes_by_hand():
    # tiny-moe: half a byte a weight + a float32 scale per group; 128 does not divide the experts' K = 32... nor
    # 64, so the group is 32 (fast/quant.py's fallback); on Qwen3-0.6B's shapes it is 128
    moe = preset_config("tiny-moe")

    def q(rows, cols, group=32):
        return rows * cols / 2 + 4 * rows * cols // group

    attn = q(128, 64) + q(64, 64) + q(64, 64) + q(64, 128)
    norms = 2 * (32 + 32 + 64 + 64)
    router = 8 * 64 * 2
    experts = 8 * (q(32, 64) + q(32, 64) + q(64, 32)) * 2 / 8
    want = 2 * (attn + norms + router + experts) + 2 * 64 + q(151936, 64)
    assert decode_bytes(moe, "int4", context=1, batch=1)["weights_bytes"] == pytest.approx(want, rel=1e-12)
    big = preset_config("qwen3-0.6b")  # D 1024, I 3072, 28 layers, Hq 16, Hkv 8, Dh 128, tied
    layer = q(4096, 1024, 128) + q(1024, 2048, 128) + q(6144, 1024, 128) + q(1024, 3072, 128) + 2 * (128 + 128
                                                                                                      + 1024 + 1024)
    want = 28 * layer + 2 * 1024 + q(151936, 1024, 128)
    assert decode_bytes(big, "int4", context=1, batch=1)["weights_bytes"] == pytest.approx(want, rel=1e-12)


def test_moe_decode_reads_only_the_experts_hit():
    cfg = preset_config("tiny-moe")  # 8 experts, top-2
    assert expected_experts_hit(8, 2, 1) == pytest.approx(2.0)
    assert expected_experts_hit(8, 2, 2) == pytest.approx(8 * (1 - 0.75**2))
    one, many = decode_bytes(cfg, "float32", 1, 1), decode_bytes(cfg, "float32", 1, 1000)
    experts = 2 * 8 * 3 * 32 * 64 * 4  # layers * experts * 3 matrices * I * D * 4 bytes
    assert many["weights_bytes"] - one["weights_bytes"] == pytest.approx(experts * (1 - 2 / 8), rel=1e-9)


def test_paired_fraction_by_hand():
    # two steps of 10 ms reading 1e8 and 2e8 bytes; reads of 1e8 bytes took 2, 4 and 2 ms around them: step 0
    # at 1e8 / 3 ms = 33.3 GB/s (roofline time 3 ms, 30 %), step 1 at 1e8 / 3 ms too (roofline time 6 ms, 60 %)
    frac, gbs = paired_fraction([0.010, 0.010], [0.002, 0.004, 0.002], [1e8, 2e8], int(1e8))
    assert frac == pytest.approx((0.3 + 0.6) / 2) and gbs == pytest.approx(1e8 / 0.003 / 1e9)
    with pytest.raises(AssertionError):
        paired_fraction([0.01], [0.002], [1e8], int(1e8))  # a step needs a read on each side


def test_paired_probe_reads_its_buffer():
    probe = PairedProbe(torch.device("cpu"), nbytes=8 << 20)
    assert probe.nbytes == 8 << 20 and probe.read_seconds() > 0
    probe.close()
    assert not hasattr(probe, "src")  # the buffer goes with the probe, before the next phase's memory is measured


def test_measure_bandwidth_is_positive():
    bw = measure_bandwidth(torch.device("cpu"), nbytes=8 << 20, repeats=2)
    assert bw.read_gbs > 0 and bw.copy_gbs > 0 and bw.nbytes == 8 << 20


def test_benchmark_script_prints_table_then_one_json_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_attention.py"
    args = ["--preset", "tiny", "--seqlens", "4", "--past", "2", "--decode-past", "3", "--decode-repeat", "2",
            "--warmups", "0", "--runs", "1", "--no-hf", "--quiet", "--dtype", "float32"]
    p = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert "qwen3lab bench attention" in lines[0]
    report = json.loads(lines[-1])
    assert {r["impl"] for r in report["results"]} == {"qwen3lab"} and report["settings"]["hf"] is False
    bad = subprocess.run([sys.executable, str(script), *args, "--device", "cuda:7"], capture_output=True, text=True,
                         timeout=120)
    if torch.cuda.device_count() <= 7:  # no such device here
        assert bad.returncode == 2 and "error: --device cuda:7" in bad.stderr, bad.stderr


def test_busy_warning_discounts_the_bench_itself():
    rep = _report(tok_per_s=1.0)
    rep["machine"].update(cores=2, torch_threads=2, loadavg=[2.3, 1.0, 1.0])
    rep["settings"] = {"device": "cpu", "loadavg_start": [0.1, 0.1, 0.1]}
    assert busy_warning(rep) is None  # 2 of the 2.3 are this bench's own threads
    rep["settings"]["loadavg_start"] = [1.8, 1.0, 1.0]
    assert "other work shared the CPU" in busy_warning(rep)
    rep["settings"]["device"] = "cuda"
    assert busy_warning(rep) is None


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
def test_peak_memory_growth_counts_what_the_phase_allocated():
    import mmap

    import numpy as np
    import torch

    from qwen3lab.bench.memory import PeakMemory

    # An anonymous mapping gets fresh pages from the kernel. A malloc'd buffer (torch.ones) may instead
    # reuse memory an earlier test freed but the allocator kept resident: then RSS does not grow at all
    # (seen in CI: peak == start after a 64 MiB torch.ones).
    n = 64 << 20
    with PeakMemory(torch.device("cpu")) as pm:
        buf = mmap.mmap(-1, n)
        np.frombuffer(buf, dtype=np.uint8)[:] = 1  # touch every page: resident
        buf.close()  # unmapped before the phase ends: only the high-water mark still sees it
    assert pm.reset_ok and pm.growth_over(n) is not None
    assert 0.95 <= pm.growth_over(n) <= 1.3, (pm.peak_bytes, pm.start_bytes)

    with PeakMemory(torch.device("cpu")) as quiet:  # the reset forgets the previous phase's peak
        pass
    assert quiet.growth_over(n) < 0.05, (quiet.peak_bytes, quiet.start_bytes)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
def test_peak_memory_counts_heap_memory_an_earlier_phase_freed():
    import torch

    from qwen3lab.bench.memory import PeakMemory
    from qwen3lab.pages import trim_heap

    if not trim_heap():
        pytest.skip("no glibc malloc_trim here")
    # 100 kB blocks live on the C heap (below glibc's mmap threshold); freed, they stay resident in the heap
    # unless trimmed, and a phase that allocates them again would not grow RSS at all (growth read as 0).
    b, count = 100_000, 2000
    blocks = [torch.ones(b, dtype=torch.uint8) for _ in range(count)]
    pin = torch.ones(b, dtype=torch.uint8)  # noqa: F841  (keeps the heap top from shrinking by itself)
    del blocks
    with PeakMemory(torch.device("cpu")) as pm:
        again = [torch.ones(b, dtype=torch.uint8) for _ in range(count)]
        del again
    assert 0.95 <= pm.growth_over(b * count) <= 1.3, (pm.peak_bytes, pm.start_bytes)
