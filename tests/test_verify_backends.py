"""verify with every kind of backend spec: dump files (incl. one written byte by byte, as a program in any
language would), user plugins (`file.py:Class`, `module:Class`), layer filters, streaming, decode."""

from __future__ import annotations

import hashlib
import json
import struct
import textwrap
from pathlib import Path

import numpy as np
import pytest

from qwen3lab import runspec
from qwen3lab import taps as T
from qwen3lab.errors import InputError, Qwen3LabError
from qwen3lab.fast import build
from qwen3lab.make_model import make_model
from qwen3lab.models.numpy_ref import NumpyBackend
from qwen3lab.verify import verify
from qwen3lab.verify.bugzoo import BUGS, BuggyBackend
from qwen3lab.verify.side import Side, decode_by_recompute

IDS = [5, 17, 300, 2, 99, 41, 7]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    # the tiny preset with a small vocabulary: every code path, a fraction of the time
    return make_model(tmp_path_factory.mktemp("m") / "tiny", preset="tiny", vocab_size=512, seed=1)


@pytest.fixture(scope="module")
def oracle(model_dir):
    return NumpyBackend.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def torch32(model_dir):
    from qwen3lab.models.torch_model import TorchBackend

    return TorchBackend.from_pretrained(model_dir, dtype="float32")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- dumps -----------------------------------------------------------------------------------------------
def test_dump_candidate_passes_and_cannot_graft(model_dir, torch32, tmp_path):
    taps = torch32.run(IDS, taps="all").taps
    dump = T.write_dump(tmp_path / "port.safetensors", taps, backend="myport", dtype="float32", input_ids=IDS,
                        config_sha256=sha(model_dir / "config.json"))
    rep = verify("numpy", f"dump:{dump}", model_path=model_dir)  # no ids given: the dump's own are used
    assert rep.input_ids == IDS and rep.overall_success, rep.sentence()
    assert rep.problems == [] and len(rep.compared) == len(T.tap_sites(torch32.cfg))
    assert rep.isolation == "not needed: no tap failed"


def test_dump_problems_are_reported_per_tap(model_dir, torch32, tmp_path):
    taps = torch32.run(IDS, taps="all").taps
    del taps["layers.1.q_norm"]
    taps["layers.0.attn"] = taps["layers.0.attn"].reshape(len(IDS), -1)  # [T, Hq*Dh]: wrong layout
    taps["layers.1.up"] = taps["layers.1.up"] * 1.01
    dump = T.write_dump(tmp_path / "bad.safetensors", taps, backend="myport", dtype="bfloat16", input_ids=IDS,
                        config_sha256="0" * 64)
    rep = verify("numpy", f"dump:{dump}", model_path=model_dir, dtype="float32")
    res = {r.name: r for r in rep.results}
    assert res["layers.1.q_norm"].status == "missing"
    assert res["layers.0.attn"].status == "shape_mismatch" and res["layers.0.attn"].candidate_shape == [7, 128]
    assert rep.tolerance.name == "bfloat16"  # the dump's dtype decides the tolerance
    assert res["layers.1.up"].passed  # 1% is within bfloat16's tolerance ...
    assert not rep.overall_success and rep.first_divergence.name == "layers.0.attn"  # ... a wrong shape is not
    assert "cannot run on grafted" in rep.isolation and res["layers.0.attn"].origin == "op"
    text = " | ".join(rep.problems)
    assert "config_sha256 000000000000..." in text and "does not match" in text
    assert "dump dtype 'bfloat16' differs from --dtype 'float32'" in text


def test_dump_for_other_input_ids_is_an_input_error(model_dir, torch32, tmp_path):
    dump = T.write_dump(tmp_path / "d.safetensors", torch32.run(IDS, taps="all").taps, backend="x",
                        dtype="float32", input_ids=IDS)
    with pytest.raises(InputError, match=r"made for input_ids \[5, 17, 300, 2, 99, 41, 7\] but verify was asked "
                                         r"for \[1, 2, 3\]"):
        verify("numpy", f"dump:{dump}", [1, 2, 3], model_path=model_dir)


def write_safetensors_by_hand(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """The safetensors layout written with struct only: u64 little-endian header size, a JSON header
    {name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then the raw little-endian bytes."""
    header, blobs, off = {"__metadata__": metadata}, [], 0
    for name, arr in tensors.items():
        b = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)  # the header may be padded with spaces to keep the data aligned
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_dump_written_without_any_library(model_dir, oracle, tmp_path):
    full = oracle.run(IDS, taps="all").taps
    keep = {n: full[n] for n in ("embed", "layers.0.attn_in", "layers.0.q", "layers.1.resid_post", "logits")}
    keep["layers.0.q"] = keep["layers.0.q"] * 1.1  # a wrong q projection
    path = tmp_path / "cpp_engine.safetensors"
    write_safetensors_by_hand(path, keep, {"format": "qwen3lab.taps", "version": "1", "backend": "my-cpp-engine",
                                           "dtype": "float32", "input_ids": json.dumps(IDS),
                                           "config_sha256": sha(model_dir / "config.json")})
    rep = verify("numpy", f"dump:{path}", model_path=model_dir)
    assert rep.problems == []
    assert [r.name for r in rep.compared] == list(keep)
    assert rep.first_divergence.name == "layers.0.q"
    assert rep.first_divergence.metrics.relative_error == pytest.approx(0.1, rel=1e-5)
    assert len(rep.missing) == len(T.tap_sites(oracle.cfg)) - len(keep)


# ---- plugins ---------------------------------------------------------------------------------------------
PLUGIN = '''
import contextlib
from qwen3lab.models import numpy_ref
from qwen3lab.models.numpy_ref import NumpyBackend


@contextlib.contextmanager
def silu_on_up():
    """A port that applies SiLU to the up projection instead of the gate."""
    orig = numpy_ref.mlp

    def mlp(x, w_gate, w_up, w_down, name=None):
        gate = numpy_ref._t(name, "gate", numpy_ref.linear(x, w_gate))
        up = numpy_ref._t(name, "up", numpy_ref.linear(x, w_up))
        act = numpy_ref._t(name, "act", gate * numpy_ref.silu(up))
        return numpy_ref.linear(act, w_down)

    numpy_ref.mlp = mlp
    try:
        yield
    finally:
        numpy_ref.mlp = orig


class Port:
    dtype = "float32"

    def __init__(self, model_path, dtype=None):
        self.b = NumpyBackend.from_pretrained(model_path, dtype="float32")

    def run(self, input_ids, graft=None):
        with silu_on_up():
            return self.b.run(input_ids, taps="all", graft=graft).taps


class NoGraftPort(Port):
    def run(self, input_ids):
        return super().run(input_ids)
'''


@pytest.fixture
def plugin_file(tmp_path) -> Path:
    p = tmp_path / "myport.py"
    p.write_text(textwrap.dedent(PLUGIN))
    return p


def test_plugin_file_class_is_isolated_to_its_culprit(model_dir, plugin_file):
    rep = verify("numpy", f"{plugin_file}:Port", IDS, model_path=model_dir)
    assert rep.candidate == f"{plugin_file}:Port (float32)" and rep.tolerance.name == "float32"
    assert rep.first_divergence.name == "layers.0.act" and rep.culprit.name == "layers.0.act", rep.sentence()
    res = {r.name: r for r in rep.results}
    assert res["layers.0.mlp_out"].origin == "inherited" and res["layers.1.act"].origin == "op"


def test_plugin_module_class_without_graft(model_dir, plugin_file, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_file.parent))
    rep = verify("numpy", "myport:NoGraftPort", IDS, model_path=model_dir)
    assert rep.first_divergence.name == "layers.0.act" and rep.culprit is None
    assert rep.isolation == "the candidate myport:NoGraftPort cannot run on grafted reference taps"
    assert "Isolation not run" in rep.sentence()


@pytest.mark.parametrize("spec,msg", [
    ("nosuchmodule_xyz:Port", "cannot import module 'nosuchmodule_xyz'"),
    ("{file}:Nope", "has no attribute 'Nope'"),
    ("/no/such/file.py:Port", "file /no/such/file.py not found"),
    ("frobnicate", "unknown backend 'frobnicate'"),
])
def test_bad_specs_are_one_line_errors(model_dir, plugin_file, spec, msg):
    with pytest.raises(Qwen3LabError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        verify("numpy", spec.format(file=plugin_file), IDS, model_path=model_dir)


# ---- layer filter, streaming, decode ---------------------------------------------------------------------
def test_layer_filter_isolates_inside_the_selected_layer(oracle, torch32):
    from qwen3lab.models.torch_model import TorchBackend

    bug = next(b for b in BUGS if b.key == "q_norm_skipped")
    cand = BuggyBackend(TorchBackend(oracle.cfg, {k: __import__("torch").from_numpy(v) for k, v in
                                                  oracle.weights.items()}, dtype="float64"), bug)
    rep = verify(oracle, cand, IDS, layers="1")
    assert {r.layer for r in rep.results} == {None, 1}
    # layer 1's input (layer 0's resid_post) was grafted too: the culprit is layer 1's own q_norm
    assert rep.culprit.name == "layers.1.q_norm", rep.sentence()
    assert rep.first_divergence.name == "embed" or rep.first_divergence.layer == 1


def test_streaming_gives_the_same_numbers_and_cleans_up(oracle, torch32, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    bug = next(b for b in BUGS if b.key == "silu_on_up")
    from qwen3lab.models.torch_model import TorchBackend

    cand = BuggyBackend(TorchBackend(oracle.cfg, {k: __import__("torch").from_numpy(v) for k, v in
                                                  oracle.weights.items()}, dtype="float32"), bug)
    a = verify(oracle, cand, IDS, stream=False)
    b = verify(oracle, cand, IDS, stream=True)
    assert [r.name for r in a.results] == [r.name for r in b.results]
    for x, y in zip(a.results, b.results, strict=True):
        assert (x.status, x.origin, x.isolated_status) == (y.status, y.origin, y.isolated_status), x.name
        assert x.metrics.relative_error == y.metrics.relative_error, x.name
    assert b.culprit.name == "layers.0.act"
    assert list(tmp_path.iterdir()) == []  # the spilled reference taps are gone
    d = verify(oracle, cand, IDS, stream=True, decode_steps=1)  # decode runs keep whole dicts in memory
    assert d.culprit.name == "layers.0.act", d.sentence()
    assert list(tmp_path.iterdir()) == []  # and leave no empty temp dir behind either


def test_decode_by_recompute_matches_the_oracles_run_decode(oracle):
    class NoDecode:  # a backend with run() only
        cfg, dtype, name = oracle.cfg, "float64", "nodecode"

        def run(self, input_ids, taps=None, graft=None):
            return oracle.run(input_ids, taps=taps, graft=graft)

    names = T.tap_sites(oracle.cfg, probs=True)
    got = decode_by_recompute(Side(NoDecode(), "nodecode"), IDS, 3, names).taps
    want = oracle.run_decode(IDS, 3, taps=names).taps
    assert sorted(got) == sorted(want)
    for n, arr in want.items():
        np.testing.assert_allclose(got[n], arr, rtol=1e-10, atol=1e-13, err_msg=n)


def test_decode_steps_input_errors(model_dir, plugin_file):
    with pytest.raises(InputError, match="--decode-steps must be in 0..6"):
        verify("numpy", "numpy", IDS, model_path=model_dir, decode_steps=7)
    with pytest.raises(InputError, match="has no KV-cache decode"):
        verify("numpy", f"{plugin_file}:Port", IDS, model_path=model_dir, decode_steps=2)


def test_decode_dump_and_dump_as_reference(model_dir, torch32, tmp_path):
    """A KV-cache run dumped with its step{j}. taps verifies against the oracle's full recompute; a dump can
    also be the reference (two ports compared with each other, neither in Python)."""
    dec = torch32.run_decode(IDS, 2, taps="all")
    dump = T.write_dump(tmp_path / "dec.safetensors", dec.taps, backend="myport", dtype="float32", input_ids=IDS,
                        config_sha256=sha(model_dir / "config.json"))
    rep = verify("numpy", f"dump:{dump}", model_path=model_dir, decode_steps=2)
    assert rep.overall_success, rep.sentence()
    assert {r.step for r in rep.results} == {None, 0, 1} and rep.problems == []
    other = {k: (v * 1.001 if k == "step1.layers.1.v" else v) for k, v in dec.taps.items()}
    dump2 = T.write_dump(tmp_path / "other.safetensors", other, backend="otherport", dtype="float32",
                         input_ids=IDS, config_sha256=sha(model_dir / "config.json"))
    rep = verify(f"dump:{dump}", f"dump:{dump2}", model_path=model_dir, decode_steps=2)
    assert rep.first_divergence.name == "step1.layers.1.v" and rep.reference.startswith("dump dec.safetensors")


# ---- the fast path as a spec ---------------------------------------------------------------------------
@pytest.mark.kernels
@pytest.mark.parametrize("dtype,tol", [(None, "float32"), ("bfloat16", "bfloat16"), ("int8", "int8")])
def test_torch_fast_spec_label_and_tolerance(model_dir, oracle, dtype, tol):
    from qwen3lab.verify.side import BUILTIN, resolve

    assert "torch-fast" in BUILTIN
    side = resolve("torch-fast", model_dir, device="cpu", dtype=dtype)
    assert side.label == f"torch-fast ({dtype or 'float32'}, cpu)"
    assert (side.backend.model.model.norm.kernel is not None) == (build.kernels() is not None)
    rep = verify(oracle, "torch-fast", IDS, model_path=model_dir, dtype=dtype)
    assert rep.candidate == side.label and rep.tolerance.name == tol and rep.overall_success, rep.summary
    # the report names the kernels the candidate ran: the build's path, the weight type the dtype asks for
    path = build.kernels().PATH if build.kernels() is not None else None
    weights = {None: "f32", "bfloat16": "bf16", "int8": "int8"}[dtype]
    if weights == "bf16" and getattr(build.kernels(), "BF16_DOT", False):
        weights = "bf16dot"  # AVX512-BF16's vdpbf16ps (kernels.cpp Bf16Dot)
    # the distance the CPU table (or QWEN3LAB_PREFETCH) gives these weights, not the module's own setting
    dist = runspec.stream_prefetch()[1 if weights == "f32" else 0] if path else 0
    pf = f"+pf{dist}" if dist else ""
    want = f"{path}-{weights}{pf}" if path else "torch" if weights != "int8" else "torch-int8"
    assert rep.kernels["linear"] == want
    assert rep.kernels["norm"] == rep.kernels["rope"] == (path or "torch")


@pytest.mark.hf
def test_report_names_kernels_only_for_our_torch_model(model_dir, oracle):
    """An HF candidate also holds a `.model` (transformers'): the report must not describe it as ours."""
    assert verify(oracle, "hf", IDS, model_path=model_dir).kernels is None
    plain = verify(oracle, "torch", IDS, model_path=model_dir).kernels
    assert plain == {"linear": "torch", "norm": "torch", "rope": "torch", "silu_mul": "torch", "attention": "sdpa"}


@pytest.mark.hf
def test_int8_gets_its_own_tolerance_and_other_backends_refuse_it(model_dir):
    from qwen3lab.verify.tolerances import DTYPE_DEFAULTS, tolerance_for

    assert tolerance_for("int8") == DTYPE_DEFAULTS["int8"]
    assert tolerance_for("int8", "float32") == DTYPE_DEFAULTS["int8"]  # the looser side decides
    assert tolerance_for("bfloat16", "int8") == DTYPE_DEFAULTS["int8"]
    for spec in ("numpy", "torch", "hf"):
        with pytest.raises(InputError, match=f"backend '{spec}' has no int8 dtype"):
            verify("numpy", spec, IDS, model_path=model_dir, dtype="int8")
