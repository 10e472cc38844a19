"""A port in "another language": a small NumPy port (the float64 oracle's code run in float32, with planted bugs)
that writes llama.cpp-style dumps: ggml node names, dims listed in reversed (ne) order, three nodes named
`Qcur-i` told apart by their op, probs padded to a 256-slot KV cache, o_proj unnamed. Verified through the
built-in `--map llama.cpp` (and a user TOML map), with and without an `--isolated` twin made from
`--export-reference`: the planted bug is named `op` at its own tap and `inherited` after it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qwen3lab.errors import InputError
from qwen3lab.make_model import make_model
from qwen3lab.models.numpy_ref import NumpyBackend
from qwen3lab.taps import read_dump, split_name, tap_sites, write_dump
from qwen3lab.verify import verify
from qwen3lab.verify.command import run_verify_command
from qwen3lab.verify.export import export_reference

IDS = [5, 17, 300, 2, 99, 41]
KV_SLOTS = 256  # llama.cpp pads the attended positions to its KV-cache size
GGML = {"embed": "inp_embd", "attn_in": "attn_norm", "q": "Qcur", "k": "Kcur", "v": "Vcur", "q_norm": "Qcur_normed",
        "k_norm": "Kcur_normed", "q_rot": "Qcur", "k_rot": "Kcur", "probs": "kq_soft_max", "attn": "kqv_out",
        "resid_mid": "ffn_inp", "mlp_in": "ffn_norm", "gate": "ffn_gate", "up": "ffn_up", "act": "ffn_swiglu",
        "router_logits": "ffn_moe_logits", "topk_idx": "ffn_moe_topk", "topk_weight": "ffn_moe_weights_norm",
        "mlp_out": "ffn_out", "resid_post": "l_out", "final_norm": "result_norm", "logits": "result_output"}
OPS = {"q": "MUL_MAT", "k": "MUL_MAT", "v": "MUL_MAT", "q_rot": "ROPE", "k_rot": "ROPE"}


def ggml_view(a: np.ndarray) -> np.ndarray:
    """The same bytes with the dims listed fastest first, as a ggml tensor's ne."""
    return np.ascontiguousarray(a).reshape(a.shape[::-1])


def write_llama_dump(path: Path, taps: dict, ids, name_o_proj: bool = False) -> Path:
    out, ops, seen = {}, {}, {}

    def put(name: str, arr, op: str):
        k = seen[name] = seen.get(name, -1) + 1
        key = f"{name}#{k}"
        out[key], ops[key] = arr, op

    for tap, arr in taps.items():
        _, layer, site = split_name(tap)
        arr = np.asarray(arr)
        if site == "attn_out" and not name_o_proj:
            continue  # llama.cpp leaves o_proj's output unnamed
        base = GGML.get(site, site)
        name = base if layer is None else f"{base}-{layer}"
        if site in ("q", "k", "v"):
            put(name, ggml_view(arr.reshape(arr.shape[0], -1)), "MUL_MAT")  # the projection, [H*Dh, T]
            put(name, ggml_view(arr), "RESHAPE")  # the same values viewed [Dh, H, T]: a duplicate name
        elif site == "probs":
            pad = np.zeros(arr.shape[:2] + (KV_SLOTS,), arr.dtype)
            pad[..., :arr.shape[2]] = arr
            put(name, ggml_view(pad), "SOFT_MAX")
        elif site == "topk_idx":
            put(name, ggml_view(arr.astype(np.int32)), "ARGSORT")
        elif site == "topk_weight":
            put(name, ggml_view(arr[..., None]), "GET_ROWS")
        else:
            put(name, ggml_view(arr), OPS.get(site, "OTHER"))
    return write_dump(path, out, backend="llama.cpp-like numpy port", dtype="float32", input_ids=ids,
                      positions=list(range(len(ids))), extra={"ops": json.dumps(ops)})


class Port:
    """The oracle's code in float32 with its weights edited (the planted bug)."""

    def __init__(self, model: Path, bug=None):
        self.b = NumpyBackend.from_pretrained(model, dtype="float32")
        if bug is not None:
            bug(self.b.weights)
        self.names = tap_sites(self.b.cfg, probs=True)

    def dumps(self, tmp: Path, ref_file: Path | None = None, **kw) -> tuple[Path, Path | None]:
        plain = write_llama_dump(tmp / "port.safetensors", self.b.run(IDS, taps=self.names).taps, IDS, **kw)
        if ref_file is None:
            return plain, None
        ref, _ = read_dump(ref_file)
        iso = self.b.run(IDS, taps=self.names, graft=ref).taps  # every op on the reference's input
        return plain, write_llama_dump(tmp / "port-isolated.safetensors", iso, IDS, **kw)


def down_x(layer: int, f: float):
    def bug(w):
        w[f"model.layers.{layer}.mlp.down_proj.weight"] *= f
    return bug


def q_norm_ones(w):
    w["model.layers.0.self_attn.q_norm.weight"][:] = 1.0


def swap_router_rows(w):
    g = w["model.layers.0.mlp.gate.weight"]
    g[[0, 1]] = g[[1, 0]]


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("m") / "tiny", preset="tiny", vocab_size=512, seed=2)


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("m") / "tiny-moe", preset="tiny-moe", vocab_size=512, seed=3)


def _ref(model: Path, tmp: Path) -> Path:
    path, n = export_reference(tmp / "ref.safetensors", model_path=model, input_ids=IDS, probs=True)
    taps, meta = read_dump(path)
    assert n == len(taps) == len(tap_sites(NumpyBackend.from_pretrained(model).cfg, probs=True))
    assert meta["input_ids"] == IDS and meta["positions"] == list(range(len(IDS))) and meta["role"] == "reference"
    return path


def test_clean_port_passes_through_the_llama_cpp_map_and_says_what_it_left_out(dense, tmp_path):
    plain, _ = Port(dense).dumps(tmp_path)
    rep = verify("numpy", f"dump:{plain}", model_path=dense, name_map="llama.cpp", probs=True)
    notes = " ".join(rep.notes)
    assert rep.overall_success, rep.sentence()
    compared = {r.name for r in rep.results if r.passed}
    assert "layers.1.probs" in compared and "layers.0.q" in compared and "layers.0.q_rot" in compared
    assert {r.name for r in rep.results if r.status == "missing"} == {"layers.0.attn_out", "layers.1.attn_out"}
    assert "Qcur-0#1" in notes and "no rule of the map" in notes, notes  # the RESHAPE duplicate, said why


@pytest.mark.parametrize("bug, culprit, after", [
    (down_x(1, 1.5), "layers.1.mlp_out", "layers.1.resid_post"),
    (q_norm_ones, "layers.0.q_norm", "layers.0.q_rot"),
])
def test_planted_bug_is_labelled_op_then_inherited_with_the_isolated_twin(dense, tmp_path, bug, culprit, after):
    ref = _ref(dense, tmp_path)
    plain, iso = Port(dense, bug).dumps(tmp_path, ref, name_o_proj=True)
    alone = verify("numpy", f"dump:{plain}", model_path=dense, name_map="llama.cpp")
    assert alone.first_divergence.name == culprit and alone.culprit is None, alone.sentence()
    rep = verify("numpy", f"dump:{plain}", model_path=dense, name_map="llama.cpp", isolated=f"dump:{iso}")
    by = {r.name: r for r in rep.results}
    assert rep.isolation == "ran" and rep.culprit.name == culprit, (rep.isolation, rep.sentence())
    assert by[culprit].origin == "op" and by[after].origin == "inherited" and by["logits"].origin == "inherited"


def test_moe_router_rows_swapped_is_the_routers_op_and_topk_idx_fails(moe, tmp_path):
    ref = _ref(moe, tmp_path)
    plain, iso = Port(moe, swap_router_rows).dumps(tmp_path, ref, name_o_proj=True)
    rep = verify("numpy", f"dump:{plain}", model_path=moe, name_map="llama.cpp", isolated=f"dump:{iso}")
    by = {r.name: r for r in rep.results}
    assert rep.culprit.name == "layers.0.router_logits" and by["layers.0.router_logits"].origin == "op"
    differ = round((1 - by["layers.0.topk_idx"].metrics.match_fraction) * len(IDS))
    if differ:  # a wrong choice is never excused as a near tie once the router itself fails
        assert by["layers.0.topk_idx"].status == "fail" and by["layers.0.topk_idx"].origin == "inherited"


def test_user_map_with_a_transpose_and_the_cli(dense, tmp_path, capsys):
    """A port that keeps q head-major [Hq, T, Dh] under its own names, mapped by a user TOML file; the CLI
    reads --map / --isolated / --export-reference."""
    taps = NumpyBackend.from_pretrained(dense, dtype="float32").run(IDS, taps="all").taps
    mine = {("my_q_" + str(split_name(k)[1]) if split_name(k)[2] == "q" else k):
            (np.swapaxes(v, 0, 1) if split_name(k)[2] == "q" else v) for k, v in taps.items()}
    dump = write_dump(tmp_path / "mine.safetensors", mine, backend="mine", dtype="float32", input_ids=IDS)
    (tmp_path / "map.toml").write_text(
        '[[tap]]\nname = \'my_q_(?P<layer>\\d+)\'\ntap = "layers.{layer}.q"\nlayout = ["permute:1,0,2"]\n')
    rc = run_verify_command(model_path=str(dense), candidate=f"dump:{dump}", name_map=str(tmp_path / "map.toml"))
    out = capsys.readouterr().out
    assert rc == 0 and "PASS" in out, out
    assert run_verify_command(model_path=str(dense), export_reference=str(tmp_path / "r.safetensors"),
                              ids=",".join(map(str, IDS))) == 0
    assert read_dump(tmp_path / "r.safetensors")[1]["input_ids"] == IDS


def test_bad_maps_positions_and_extra_layers_are_named(dense, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[tap]]\nname = "x"\ntap = "layers.{layer}.q"\n')
    with pytest.raises(InputError, match="rule 1.*no group"):
        verify("numpy", "dump:nothing", model_path=dense, name_map=bad)
    with pytest.raises(InputError, match="built-in map"):
        verify("numpy", "dump:nothing", model_path=dense, name_map="vllm")
    taps = NumpyBackend.from_pretrained(dense, dtype="float32").run(IDS, taps="all").taps
    shifted = write_dump(tmp_path / "s.safetensors", taps, backend="p", dtype="float32", input_ids=IDS,
                         positions=[p + 1 for p in range(len(IDS))])
    with pytest.raises(InputError, match="positions' row 0 is 1"):
        verify("numpy", f"dump:{shifted}", model_path=dense)
    # a 4-layer port's dump against the 2-layer model: no rows for layers 2 and 3, a note naming them
    extra = dict(taps, **{k.replace("layers.1.", "layers.3."): v for k, v in taps.items() if "layers.1." in k})
    four = write_dump(tmp_path / "f.safetensors", extra, backend="p", dtype="float32", input_ids=IDS)
    rep = verify("numpy", f"dump:{four}", model_path=dense)
    assert rep.overall_success and not any(r.layer == 3 for r in rep.results)
    assert any("layer 3 does not exist" in n for n in rep.notes), rep.notes
    with pytest.raises(InputError, match="for dumps"):
        verify("numpy", "torch", model_path=dense, isolated="dump:x")


def test_baseline_flags_a_tap_whose_error_grew_and_jsonl_has_every_tap(dense, tmp_path, capsys):
    """A port's CI: the baseline of a clean float32 dump; then the port with ffn_down x1.00001, still inside
    float32's tolerance (1e-5 < 1e-4) but 10x its clean error: the baseline names the tap that grew."""
    clean, _ = Port(dense).dumps(tmp_path)
    base, jl = tmp_path / "base.json", tmp_path / "taps.jsonl"
    kw = dict(model_path=str(dense), name_map="llama.cpp")
    assert run_verify_command(candidate=f"dump:{clean}", save_baseline=str(base), jsonl=str(jl), **kw) == 0
    lines = [json.loads(x) for x in jl.read_text().splitlines()]
    assert {x["name"] for x in lines} >= {"embed", "layers.1.mlp_out", "logits"}
    assert run_verify_command(candidate=f"dump:{clean}", baseline=str(base), **kw) == 0
    (tmp_path / "w").mkdir()
    worse, _ = Port(dense, down_x(1, 1.00001)).dumps(tmp_path / "w")
    assert verify("numpy", f"dump:{worse}", model_path=dense, name_map="llama.cpp").overall_success
    capsys.readouterr()
    assert run_verify_command(candidate=f"dump:{worse}", baseline=str(base), **kw) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "regressed since the baseline: layers.1.mlp_out" in out, out


PLUGIN = '''
from qwen3lab.models.numpy_ref import NumpyBackend


class Port:
    def __init__(self, model_path, scale="1.0"):
        self.b = NumpyBackend.from_pretrained(model_path, dtype="float32")
        self.b.weights["model.layers.1.mlp.down_proj.weight"] *= float(scale)
        self.dtype = "float32"

    def run(self, input_ids, graft=None):
        return self.b.run(input_ids, taps="all", graft=graft).taps
'''


def test_candidate_opt_reaches_a_plugins_constructor(dense, tmp_path):
    plug = tmp_path / "port.py"
    plug.write_text(PLUGIN)
    ok = verify("numpy", f"{plug}:Port", IDS, model_path=dense, candidate_opts=["scale=1.0"])
    bad = verify("numpy", f"{plug}:Port", IDS, model_path=dense, candidate_opts={"scale": "1.5"})
    assert ok.overall_success and bad.culprit.name == "layers.1.mlp_out", (ok.sentence(), bad.sentence())
    with pytest.raises(InputError, match="no such option.*takes scale"):
        verify("numpy", f"{plug}:Port", IDS, model_path=dense, candidate_opts=["threads=2"])
    with pytest.raises(InputError, match="key=value"):
        verify("numpy", f"{plug}:Port", IDS, model_path=dense, candidate_opts=["threads"])


@pytest.mark.slow  # runs the script in a subprocess
def test_repro_script_reproduces_the_culprit_with_numpy_alone(dense, tmp_path):
    """--repro on the ffn_down x1.5 port: the script's formula gives the reference's output to ~1e-15 and the
    candidate's output is 0.5 relative off it (the planted factor): run as a subprocess, NumPy only."""
    import subprocess
    import sys

    ref = _ref(dense, tmp_path)
    plain, iso = Port(dense, down_x(1, 1.5)).dumps(tmp_path, ref, name_o_proj=True)
    rc = run_verify_command(model_path=str(dense), candidate=f"dump:{plain}", isolated=f"dump:{iso}",
                            name_map="llama.cpp", repro=str(tmp_path / "r"))
    assert rc == 1
    out = subprocess.run([sys.executable, "repro.py"], cwd=tmp_path / "r", capture_output=True, text=True,
                         check=True).stdout
    formula, cand = (float(line.rsplit(":", 1)[1]) for line in out.splitlines())
    assert formula < 1e-12 and abs(cand - 0.5) < 1e-5, out


@pytest.mark.slow  # one subprocess per op
@pytest.mark.parametrize("tap", ["layers.1.q", "layers.1.q_norm", "layers.1.q_rot", "layers.1.k_rot",
                                 "layers.1.probs", "layers.1.attn", "layers.1.act", "layers.1.mlp_out",
                                 "layers.0.attn_in", "logits"])
def test_repro_formula_of_every_covered_op_matches_the_oracle(dense, tmp_path, tap):
    """Each covered op's script recomputes the oracle's own output from the oracle's inputs to ~1e-15 (RoPE with
    the model's tables, causal GQA attention, silu*up, ...), and measures a candidate 2 % off as 0.02."""
    import subprocess
    import sys
    from types import SimpleNamespace

    from qwen3lab.verify.repro import write_repro

    b = NumpyBackend.from_pretrained(dense)
    ref = b.run(IDS, taps=[tap]).taps[tap]
    rep = SimpleNamespace(culprit_arrays=(tap, ref * 1.02, ref), divergence_arrays=None, input_ids=IDS, cfg=b.cfg)
    said = write_repro(rep, tmp_path / "r", dense)
    assert "wrote" in said, said
    out = subprocess.run([sys.executable, "repro.py"], cwd=tmp_path / "r", capture_output=True, text=True,
                         check=True).stdout
    formula, cand = (float(line.rsplit(":", 1)[1]) for line in out.splitlines())
    assert formula < 1e-12 and abs(cand - 0.02) < 1e-9, out
