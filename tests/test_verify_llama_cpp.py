"""llama.cpp as a verify candidate (`--candidate llama.cpp[:F.gguf]`) and its GGUF bug zoo.

- everywhere: the llama.cpp name map's inverse (what a graft writes back into a ggml node) round-trips every
  rule, and the candidate without `make peer` is one line naming it;
- where `make peer` has built llama.cpp (CI never does; skipped with the reason otherwise): llama.cpp runs for
  real on tiny checkpoints converted by its own converter; float32 with a float32 KV cache passes every tap
  against the float64 oracle, prefill and decode steps through llama.cpp's KV cache; the default f16 KV cache
  passes with only the taps after the cache loosened; planted GGUF bugs are named at their tap with `op`, and
  what follows them `inherited`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from qwen3lab.backends import gguf as peer
from qwen3lab.backends.namemap import NameMap, _layout
from qwen3lab.errors import InputError
from qwen3lab.taps import canonical_shape
from qwen3lab.verify.runner import verify

IDS = [9707, 11, 419, 374, 264, 1273, 1946]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from qwen3lab.make_model import make_model

    return make_model(tmp_path_factory.mktemp("m") / "tiny", preset="tiny", vocab_size=512, seed=2)


@pytest.fixture(scope="module")
def tiny_cfg(tiny_model):
    from qwen3lab.config import Qwen3Config

    return Qwen3Config.from_file(tiny_model)


def test_map_inverse_round_trips_every_rule(tiny_cfg):
    """to_foreign(canonical) then the map's own layout gives the canonical array back, for every rule and both
    a prefill and a decode step (probs padded to a KV-cache size and cut back)."""
    nmap = NameMap.load("llama.cpp")
    rng = np.random.default_rng(0)
    P = 5
    for rule in nmap.rules:
        tap = rule.tap.format(layer=1)
        if "router" in tap or "topk" in tap or "expert" in tap:
            continue  # MoE taps: the dense tiny config has no experts
        for step in (None, 0):
            name = tap if step is None else f"step{step}.{tap}"
            T, S = (P, P) if step is None else (1, P + 1)
            want = rng.standard_normal(canonical_shape(tiny_cfg, name, T, S))
            foreign_rows = want.reshape(-1).size
            shape = _foreign_shape(rule, want, tiny_cfg, name, P)
            foreign = nmap.to_foreign(want, rule, shape, name, tiny_cfg, P)
            assert foreign.shape == shape and foreign.size >= foreign_rows
            back = _layout(foreign, rule, "x", name, tiny_cfg, P, Path("x")).reshape(want.shape)
            np.testing.assert_array_equal(back, want, err_msg=f"{rule.where}: {name}")


def _foreign_shape(rule, want, cfg, name, P):
    """The ggml ne (fastest first) a node of this rule would have, the layout steps undone on the canonical
    shape: a sliced axis padded to 256 KV slots, a permutation inverted, a reshape back to the projection's
    [T, H*Dh], the dims listed in reverse."""
    shape = list(want.shape)
    for step in reversed(rule.layout):
        op, _, arg = step.partition(":")
        if op == "slice":
            shape[int(arg.split(":")[0])] = 256
        elif op == "permute":
            perm = [int(x) for x in arg.split(",")]
            before = [0] * len(shape)
            for i, p in enumerate(perm):
                before[p] = shape[i]
            shape = before
        elif op == "reshape":
            shape = [shape[0], int(np.prod(shape[1:]))]
        else:  # reverse
            shape = shape[::-1]
    return tuple(shape)


def test_candidate_without_the_peer_is_one_line(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN3LAB_PEERS", str(tmp_path / "none"))
    with pytest.raises(InputError, match="make peer"):
        verify("numpy", "llama.cpp", [5, 17, 300], model_path=tiny_model)


needs_peer = pytest.mark.skipif(peer.missing(library=True) is not None,
                                reason=str(peer.missing(library=True)))


@pytest.fixture(scope="module")
def f32_models(tmp_path_factory):
    from qwen3lab.make_model import make_model

    root = tmp_path_factory.mktemp("llama")
    dense = make_model(root / "tiny", preset="tiny", dtype="float32")
    moe = make_model(root / "tiny-moe", preset="tiny-moe", dtype="float32")
    return dense, moe


@pytest.mark.slow
@needs_peer
def test_float32_gguf_passes_every_tap_prefill_and_decode(f32_models):
    dense, _ = f32_models
    rep = verify("numpy", "llama.cpp", IDS, model_path=dense, dtype="float32", decode_steps=2, probs=True,
                 candidate_opts=["kv=f32"])
    missing = [t.name for t in rep.results if t.status == "missing"]
    assert rep.overall_success, rep.sentence()
    assert not missing, missing  # attn_out (o_proj's unnamed node) and probs included
    steps = {t.step for t in rep.results}
    assert steps == {None, 0, 1}
    cache = {t.name for t in rep.results if t.name.endswith(("k_cache", "v_cache"))}  # llama.cpp's KV cache read
    assert {"layers.0.k_cache", "step1.layers.1.v_cache"} <= cache, sorted(cache)
    assert "llama.cpp" in rep.candidate and "kv f32" in rep.candidate


@pytest.mark.slow
@needs_peer
def test_f16_kv_cache_loosens_only_the_taps_after_it(f32_models):
    dense, _ = f32_models
    rep = verify("numpy", "llama.cpp", IDS, model_path=dense, dtype="float32", decode_steps=1)
    assert rep.overall_success, rep.sentence()
    strict = verify("numpy", "llama.cpp", IDS, model_path=dense, dtype="float32", decode_steps=1,
                    kv_dtype="float32")
    worst = max((t for t in strict.results if t.metrics), key=lambda t: t.metrics.relative_error)
    # the f16 cache's rounding is real and above float32's bar somewhere after the cache, never before it
    assert not strict.overall_success, f"f16 KV cache at float32 bar: {worst.name} {worst.metrics.relative_error}"
    before = [t.name for t in strict.results if t.passed is False and t.name.split(".")[-1] in
              ("embed", "attn_in", "q", "k", "v", "q_norm", "k_norm", "q_rot", "k_rot") and "step" not in t.name
              and t.name.startswith("layers.0.")]
    assert not before, before


@pytest.mark.slow
@needs_peer
@pytest.mark.parametrize("bug", ["ffn_down x1.02 (layer 1)", "k heads 0 and 1 swapped",
                                 "router rows swapped (a used expert)"])
def test_gguf_bug_named_with_op_then_inherited(f32_models, bug):
    from qwen3lab.verify import gguf_zoo

    b = next(x for x in gguf_zoo.BUGS if x.name == bug)
    dense, moe = f32_models
    model = moe if b.moe else dense
    with tempfile.TemporaryDirectory() as tmp:
        row = gguf_zoo.run_bug(b, model, peer.gguf(model, "float32", print), Path(tmp), IDS)
    assert row.found, (row.culprit, row.dump_culprit, row.sentence)
    assert row.labels[row.culprit] == "op"
    # the same runs written as a port's dumps (ggml names, plain + isolated twin) through --map llama.cpp
    assert row.dump_culprit == row.culprit and row.dump_labels[row.dump_culprit] == "op", row.dump_labels
    later = [n for n, lab in row.labels.items() if n != row.culprit]
    assert later and all(row.labels[n] == "inherited" for n in later if n in ("final_norm", "logits")), row.labels


@pytest.mark.slow
@needs_peer
def test_bad_options_and_wrong_model_are_refused(f32_models):
    dense, moe = f32_models
    with pytest.raises(InputError, match="kv='f8'"):
        verify("numpy", "llama.cpp", IDS, model_path=dense, candidate_opts=["kv=f8"])
    with pytest.raises(InputError, match="takes kv="):
        verify("numpy", "llama.cpp", IDS, model_path=dense, candidate_opts=["batch=4"])
    with pytest.raises(InputError, match="qwen3moe"):
        verify("numpy", f"llama.cpp:{peer.gguf(moe, 'float32', print)}", IDS, model_path=dense)
