"""The fast CPU path from the command line: `generate` / `chat` with --dtype int8, --quant, --no-fast, --threads;
`verify --candidate torch-fast` at float32 / bfloat16 / int8 (labels, tolerances, decode steps), int8 refused
for the other backends; `qwen3lab.load(backend="torch-fast")`; the sweep's torch-fast rows.

Which model actually ran is checked on the loaded object itself (a spy on Qwen3ForCausalLM.from_pretrained),
not only on what the command prints: the fast path has FastLinear / Int8Linear modules, the plain one none.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import qwen3lab
from qwen3lab.cli import main
from qwen3lab.errors import InputError
from qwen3lab.fast import FastLinear, Int4Linear, Int8Linear, build
from qwen3lab.make_model import make_model
from qwen3lab.qwen3 import Qwen3ForCausalLM

pytestmark = pytest.mark.kernels


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("fast") / "tiny", preset="tiny", dtype="float32", seed=5)


def invoke(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)


@pytest.fixture
def spy(monkeypatch):
    """Every model the CLI loads, and every generate result, in order."""
    seen = {"lm": [], "results": []}
    load, gen = Qwen3ForCausalLM.from_pretrained.__func__, Qwen3ForCausalLM.generate

    def from_pretrained(cls, *a, **kw):
        lm = load(cls, *a, **kw)
        seen["lm"].append(lm)
        return lm

    def generate(self, *a, **kw):
        res = gen(self, *a, **kw)
        seen["results"].append(res)
        return res

    monkeypatch.setattr(Qwen3ForCausalLM, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(Qwen3ForCausalLM, "generate", generate)
    return seen


def kinds(lm) -> set[type]:
    return {type(m) for m in lm.model.modules()} & {FastLinear, Int8Linear, torch.nn.Linear}


def loading_line(res) -> str:
    return next(ln for ln in res.stderr.splitlines() if ln.startswith("loading "))


# ---- generate / chat ---------------------------------------------------------------------------------
def test_fast_and_plain_float32_give_the_same_greedy_tokens(tiny_dir, spy):
    fast = invoke("generate", "--model", tiny_dir, "--dtype", "float32", "--max-steps", 8, "Hello there")
    plain = invoke("generate", "--model", tiny_dir, "--dtype", "float32", "--max-steps", 8, "--no-fast",
                   "Hello there")
    assert fast.exit_code == 0 and plain.exit_code == 0, fast.output + plain.output
    lm_fast, lm_plain = spy["lm"]
    # the leaves run the compiled kernels where they can be built; without them the same modules run PyTorch ops
    assert FastLinear in kinds(lm_fast)
    assert (lm_fast.model.model.norm.kernel is not None) == (build.kernels() is not None)
    assert kinds(lm_plain) == {torch.nn.Linear} and lm_plain.model.model.norm.kernel is None
    assert "fast kernels: " in loading_line(fast) and "plain eager path" in loading_line(plain)
    a, b = (r.token_ids for r in spy["results"])
    assert len(a) == 8 and a == b, f"fast {a} vs plain {b}"
    assert fast.stdout == plain.stdout


@pytest.mark.parametrize("args,act,what", [
    (["--dtype", "int8"], torch.bfloat16, "int8 weights, bfloat16 activations"),
    (["--dtype", "float32", "--quant", "int8"], torch.float32, "int8 weights, float32 activations"),
    (["--dtype", "bfloat16", "--quant", "int8"], torch.bfloat16, "int8 weights, bfloat16 activations"),
], ids=["dtype-int8", "quant-fp32", "quant-bf16"])
def test_int8_generate_loads_int8_weights(tiny_dir, spy, args, act, what):
    res = invoke("generate", "--model", tiny_dir, *args, "--max-steps", 4, "Hello")
    assert res.exit_code == 0, res.output
    lm = spy["lm"][0]
    assert lm.model.quant == "int8" and lm.model.dtype == act and lm.dtype == "int8"
    assert Int8Linear in kinds(lm) and lm.model.model.layers[0].mlp.down_proj.weight.dtype == torch.int8
    assert what in loading_line(res)
    assert len(spy["results"][0].token_ids) == 4 and "tok/s" in res.stderr


@pytest.mark.parametrize("args,act,group", [
    (["--dtype", "int4"], torch.bfloat16, 32),  # the default: 128 does not divide the tiny model's hidden 64
    (["--dtype", "float32", "--quant", "int4", "--group-size", "32"], torch.float32, 32),
], ids=["dtype-int4", "quant-fp32"])
def test_int4_generate_loads_int4_weights(tiny_dir, spy, args, act, group):
    res = invoke("generate", "--model", tiny_dir, *args, "--max-steps", 4, "Hello")
    assert res.exit_code == 0, res.output
    lm = spy["lm"][0]
    assert lm.model.quant == "int4" and lm.model.dtype == act and lm.dtype == "int4"
    down = lm.model.model.layers[0].mlp.down_proj
    assert isinstance(down, Int4Linear) and down.weight.dtype == torch.uint8 and down.group_size == group
    assert down.weight.shape[1] * 2 == down.in_features and down.scales.shape[1] == down.in_features // group
    asked = " (groups of 32)" if "--group-size" in args else ""  # the line says what was asked; kernels: what ran
    assert f"int4 weights{asked}, {str(act).removeprefix('torch.')} activations" in loading_line(res)
    assert f"-int4-g{group}" in next(ln for ln in res.stderr.splitlines() if ln.startswith("kernels: linear"))
    assert len(spy["results"][0].token_ids) == 4


def test_int4_group_that_does_not_divide_k_is_one_line(tiny_dir, spy):
    res = invoke("generate", "--model", tiny_dir, "--dtype", "int4", "--group-size", "128", "Hello")  # hidden 64
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert res.stderr.strip().splitlines()[-1] == (
        "error: int4: group size 128 does not fit weight of shape [128, 64]: it must be one of 32, 128 and divide "
        "K = 64"), res.stderr


def test_threads_option_sets_torchs_threads(tiny_dir, spy):
    before = torch.get_num_threads()
    want = 2 if before != 2 else 1
    try:
        res = invoke("generate", "--model", tiny_dir, "--dtype", "float32", "--threads", want, "--max-steps", 2, "Hi")
        assert res.exit_code == 0, res.output
        assert torch.get_num_threads() == want
        assert f"{want} thread" in loading_line(res)
    finally:
        torch.set_num_threads(before)


def test_chat_takes_the_same_options(tiny_dir, spy):
    res = invoke("chat", "--model", tiny_dir, "--dtype", "int8", "--threads", 1, "--max-steps", 3,
                 input="Hello\n/exit\n")
    assert res.exit_code == 0, res.output
    assert "qwen3>" in res.output and spy["lm"][0].model.quant == "int8"
    res = invoke("chat", "--model", tiny_dir, "--dtype", "float32", "--no-fast", "--max-steps", 2, input="Hi\n/exit\n")
    assert res.exit_code == 0 and kinds(spy["lm"][1]) == {torch.nn.Linear}, res.output


@pytest.mark.parametrize("args,msg", [
    (["--dtype", "int8", "--device", "cuda"],
     "--dtype int8: int8 weights run on the CPU fast path only, got --device cuda"),
    (["--quant", "int8", "--device", "cuda:0"], "--quant int8: int8 weights run on the CPU fast path only"),
    (["--dtype", "float16", "--quant", "int8"],
     "--quant int8 needs --dtype float32 or bfloat16 activations, got --dtype float16"),
    (["--dtype", "float64", "--quant", "int8"], "got --dtype float64"),
    (["--threads", 0], "--threads must be >= 1, got 0"),
    (["--dtype", "int8", "--no-fast"], "int8 weights need the fast path; drop --no-fast"),
    (["--dtype", "bfloat16", "--quant", "int8", "--no-fast"], "--quant int8: int8 weights need the fast path"),
    (["--dtype", "int4", "--no-fast"], "--dtype int4: int4 weights need the fast path; drop --no-fast"),
    (["--dtype", "bfloat16", "--group-size", "32"], "--group-size 32 is for int4 weights only"),
], ids=["int8-cuda", "quant-cuda", "quant-fp16", "quant-fp64", "threads-0", "int8-plain", "quant-plain",
        "int4-plain", "group-no-int4"])
def test_bad_combinations_are_one_line_exit_2(tiny_dir, spy, args, msg):
    for cmd in (["generate", "--model", tiny_dir, *args, "Hi"], ["chat", "--model", tiny_dir, *args]):
        res = invoke(*cmd, input="/exit\n")
        assert res.exit_code == 2, res.output
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], res.stderr
        assert "Traceback" not in res.output and not spy["lm"]  # refused before loading anything


def test_unknown_dtype_is_refused_by_click(tiny_dir):
    res = invoke("generate", "--model", tiny_dir, "--dtype", "int3", "Hi")
    assert res.exit_code == 2 and "'int3' is not one of" in res.output


# ---- verify --candidate torch-fast ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [("float32", "float32"), ("bfloat16", "bfloat16"), ("int8", "int8"),
                                       ("int4", "int4")])
def test_verify_torch_fast_passes_with_its_label_and_tolerance(tiny_dir, tmp_path, dtype, tol):
    out = tmp_path / "r.json"
    res = invoke("verify", "--model-path", tiny_dir, "--candidate", "torch-fast", "--dtype", dtype,
                 "--decode-steps", 2, "--output", out)
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert rep["candidate"] == f"torch-fast ({dtype}, cpu)"
    assert rep["dtype"] == dtype and rep["tolerance"]["name"] == tol
    assert rep["overall_success"] is True and rep["first_divergence"] is None and rep["decode_steps"] == 2
    taps = [t for layer in rep["layer_results"] for t in layer["taps"]]
    assert taps and all(t["passed"] for t in taps)
    steps = {t["name"].split(".")[0] for t in taps if t["name"].startswith("step")}
    assert steps == {"step0", "step1"}, steps  # the decode steps were compared too


@pytest.mark.parametrize("backend", ["numpy", "torch", "hf"])
def test_verify_int8_is_refused_for_other_backends(tiny_dir, backend):
    res = invoke("verify", "--model-path", tiny_dir, "--candidate", backend, "--dtype", "int8")
    assert res.exit_code == 2, res.output
    assert f"backend {backend!r} has no int8 dtype" in res.stderr and "torch-fast" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output


def test_verify_torch_fast_on_cuda_is_refused(tiny_dir):
    res = invoke("verify", "--model-path", tiny_dir, "--candidate", "torch-fast", "--device", "cuda")
    assert res.exit_code == 2 and "backend 'torch-fast' runs on the CPU only" in res.stderr, res.output


def test_load_torch_fast(tiny_dir):
    b = qwen3lab.load(tiny_dir, backend="torch-fast", dtype="int8")
    assert b.dtype == "int8" and b.model.quant == "int8" and b.model.dtype == torch.bfloat16
    b = qwen3lab.load(tiny_dir, backend="torch-fast", quant="int8")  # float32 activations
    assert b.dtype == "int8" and b.model.dtype == torch.float32
    b = qwen3lab.load(tiny_dir, backend="torch-fast")
    assert b.dtype == "float32" and b.model.quant is None
    assert (b.model.model.norm.kernel is not None) == (build.kernels() is not None)
    assert qwen3lab.load(tiny_dir, backend="torch").model.model.norm.kernel is None
    with pytest.raises(InputError, match="backend 'torch' has no int8 dtype"):
        qwen3lab.load(tiny_dir, backend="torch", dtype="int8")
    with pytest.raises(InputError, match="backend 'numpy' has no quant option"):
        qwen3lab.load(tiny_dir, backend="numpy", quant="int8")


def test_sweep_has_torch_fast_rows(tiny_dir):
    from rich.console import Console

    from qwen3lab.verify.sweep import run_sweep

    console = Console(record=True, width=160)
    cells = run_sweep(tiny_dir, devices=["cpu"], dtypes=("float32",), console=console)
    got = [(c.backend, c.dtype) for c in cells]
    assert got == [("torch", "float32"), ("torch-fast", "float32"), ("torch-fast", "bfloat16"),
                   ("torch-fast", "int8"), ("torch-fast", "int4")], got
    assert all(c.report is not None and c.report.overall_success for c in cells), [c.error for c in cells]
    for c, q in zip(cells[-2:], ("int8", "int4"), strict=True):
        assert c.report.tolerance.name == q and c.report.candidate == f"torch-fast ({q}, cpu)"
    assert "torch-fast" in console.export_text()


def test_accuracy_script_compares_each_fast_path_with_the_oracle(tiny_dir):
    """benchmarks/accuracy_fast.py: a table, then one JSON line; fp32 matches the float64 oracle to float32
    rounding, and every path's clear-winner counts are out of the same oracle positions."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "accuracy_fast.py"
    p = subprocess.run([sys.executable, str(script), "--model", str(tiny_dir), "--text", "Hello there, tiny model!"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[1].startswith("| path | logit cosine") and len(lines) == 9, lines
    rep = json.loads(lines[-1])
    res = rep["results"]
    assert set(res) == {"fp32 fast", "bf16 fast", "bf16 eager", "int8 fast", "int4 fast"}
    assert res["fp32 fast"]["cos_min"] > 1 - 1e-6 and res["fp32 fast"]["top1"] == 1.0
    assert all(0.9 < r["cos_min"] <= r["cos_mean"] <= 1 + 1e-9 for k, r in res.items() if k != "int4 fast"), res
    assert 0.5 < res["int4 fast"]["cos_min"] <= res["int4 fast"]["cos_mean"] <= 1 + 1e-9, res  # int4 tolerance
    totals = {m: {r["top1_clear"][m][1] for r in res.values()} for m in ("0.05", "0.2")}
    assert all(len(t) == 1 for t in totals.values()), totals  # same oracle, same clear positions
